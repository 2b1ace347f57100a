"""Stage 6, evaluation: the protocols' scores and the methods × datasets tables.

``metrics``   AP/mAP with junk (revisitop semantics), mP@k, UKBench 4×R@4, Recall@k
``evaluate``  descriptors of a benchmark per method (one shared backbone pass) → tables, per-query APs
"""
