"""Stage 1, the data: benchmarks, their ground truth, and robust image loading.

``datasets``   benchmarks as :class:`RetrievalDataset` (Revisited Oxford/Paris, Oxford5k/Paris6k,
               Holidays, UKBench, folders/CSV of groups, the demo set); the revisited protocols
``images``     image files → RGB arrays/tensors: EXIF rotation, odd modes, size limits, clear errors
``demo_data``  builds the embedded demo benchmark from pinned PyPI archives
``download``   fetches the standard benchmarks (online users)
"""
