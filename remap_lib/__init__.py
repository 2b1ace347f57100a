"""remap: instance-level image retrieval with the REMAP global descriptor (Husain & Bober, TIP 2019).

The package follows the pipeline:

=====================  ==========================================================
``backbones``          CNNs with a layer access function (paper Eq. 1)
``functional``         region grid, ROI max-pool, MAC/SPoC/GeM/R-MAC math
``pooling``            thin modules over it; REMAP streams with region weights α
``whitening``          PCA-whitening, the FC layer's initialisation
``model``              backbone + streams + whitening → L2-normalised descriptors
``engine``             inference engines: torch, OpenVINO (CPU)
``shared_pass``        one backbone pass pooled by many heads (evaluate, browser)
``images``/``extract`` robust image loading; resumable descriptor extraction
``klw``                KL-divergence region weights (paper §III-B)
``train``              end-to-end fine-tuning: triplets, hard negatives, resume, DDP
``verification``       SIFT + RANSAC inlier counts: verified training pairs
``proposals``          learned region proposals (RPN) pooled as R-MAC (Gordo et al.)
``landmark_boxes``     landmark boxes from the inliers of verified pairs (RPN targets)
``train_rpn``          training of the region proposal network (resumes)
``evaluate``           descriptors of a benchmark; mAP (``metrics``) by the protocols
``index``              faiss indexes (flat, PQ, IVF-PQ, refine, on disk) with checks
``config``             one plain-data description of a model
``cli``                the ``remap`` command
=====================  ==========================================================

``RetrievalModel`` is imported on first use, so that ``remap`` answers a bad
command-line option without loading torch first.
"""

from .config import ModelConfig

__version__ = "0.1.0"
__all__ = ["ModelConfig", "RetrievalModel", "__version__"]


def __getattr__(name):
    if name == "RetrievalModel":
        from .model import RetrievalModel

        return RetrievalModel
    raise AttributeError(f"module 'remap_lib' has no attribute {name!r}")
