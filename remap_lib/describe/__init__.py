"""Stage 4, describing images: the model, the engines that run it, and extraction to disk.

``model``             backbone + streams + whitening → L2-normalised ``(N, D)`` descriptors
``engine``            where the backbone runs: torch or OpenVINO, f32 or bf16
``shared_pass``       one backbone pass pooled by many heads (evaluation, the query browser)
``extract``           images → descriptors on disk: resumable, parallel loading, bad images reported
``extraction_files``  the extraction folder's manifest and output checks (torch-free)
"""
