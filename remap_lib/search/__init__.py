"""Stage 5, search: faiss indexes of descriptors and query expansion.

``index``       :class:`RetrievalIndex`: Flat, PQ, IVF-PQ, OPQ, fast-scan, refine; checked files
``sources``     what an index is built from: :class:`DescriptorSource` (extraction folders, streamed), distractors
``index_file``  the checked index file format: header, checksums, packed image paths, ``.ivfdata`` checks
``on_disk``     the sharded, parallel build of an IVF index whose inverted lists live on disk
``expansion``   α-query expansion and database-side augmentation (DBA)
"""
