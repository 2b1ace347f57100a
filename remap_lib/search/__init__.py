"""Stage 5, search: faiss indexes of descriptors and query expansion.

``index``      :class:`RetrievalIndex`: Flat, PQ, IVF-PQ, OPQ, fast-scan, refine; checked files
``expansion``  α-query expansion and database-side augmentation (DBA)
"""
