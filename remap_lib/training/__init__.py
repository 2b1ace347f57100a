"""Learning from data: region weights, fine-tuning, region proposals, and their training pairs.

``klw``             KL-divergence region weights α from matching / non-matching pairs (paper §III-B)
``triplet``         end-to-end fine-tuning: triplet loss, hard negatives, resume, DDP (``remap train``)
``rpn``             training of the region proposal network (``remap train-rpn``)
``verification``    local features and geometry: RootSIFT, ratio test, RANSAC inliers
``pairs``           verified training pairs per group: sampling, noise cleaning, cache (``remap verify-pairs``)
``landmark_boxes``  landmark boxes from the inliers of verified pairs (the RPN's targets)
"""
