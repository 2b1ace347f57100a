"""remap: instance-level image retrieval with the REMAP global descriptor (Husain & Bober, TIP 2019).

The package follows the pipeline, one folder a stage (each folder's
``__init__`` lists its modules):

================  ==================================================================
``data/``         benchmarks and their ground truth, robust image loading, the demo set
``nets/``         CNN backbones with a layer access function (paper Eq. 1)
``layers/``       region grid and pooling math, the heads, region proposals, whitening
``describe/``     model = backbone + streams + whitening; engines (torch, OpenVINO); extraction
``search/``       faiss indexes with checked files; query expansion
``evaluation/``   mAP by the protocols; methods × datasets tables
``training/``     KL region weights, triplet fine-tuning, the RPN, verified training pairs
``app/``          the ``remap`` command, the query browser, the notebooks runner, plots
``config.py``     one plain-data description of a model (:class:`ModelConfig`)
================  ==================================================================

A stage imports only from the stages above it in this table (``training``
and ``app`` use everything; ``data`` and ``nets`` nothing of the package).

The names used most are importable from the top, e.g.
``from remap_lib import RetrievalModel, load_dataset, RetrievalIndex``.  They
are imported on first use, so that ``remap`` answers a bad command-line option
without loading torch first.
"""

from importlib import import_module

from .config import ModelConfig

__version__ = "0.1.0"

# name -> the module (under remap_lib) that defines it
_EXPORTS = {
    "load_dataset": "data.datasets",
    "RetrievalDataset": "data.datasets",
    "load_image": "data.images",
    "FeatureBackbone": "nets.backbones",
    "learn_pca_whitening": "layers.whitening",
    "RetrievalModel": "describe.model",
    "create_engine": "describe.engine",
    "extract_descriptors": "describe.extract",
    "load_descriptors": "describe.extract",
    "RetrievalIndex": "search.index",
    "mean_average_precision": "evaluation.metrics",
    "revisited_map": "evaluation.metrics",
    "evaluate": "evaluation.evaluate",
    "KLWeights": "training.klw",
    "estimate_kl_weights": "training.klw",
    "TrainConfig": "training.triplet",
    "train": "training.triplet",
    "verify_pairs": "training.pairs",
    "load_pairs": "training.pairs",
    "QueryBrowser": "app.browser",
}

__all__ = ["ModelConfig", "__version__", *_EXPORTS]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # the next access skips this function
        return value
    raise AttributeError(f"module 'remap_lib' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
