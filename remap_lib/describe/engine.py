"""Where the backbone runs: torch or OpenVINO, f32 or bf16.  The heads always run in torch.

An :class:`InferenceEngine` computes what :meth:`RetrievalModel.multiscale
<remap_lib.describe.model.RetrievalModel.multiscale>` computes: per scale the backbone's
feature maps, the pooling streams and the optional whitening FC, a weighted
sum, L2.  Only the backbone changes hands; pooling (REMAP, R-MAC, GeM ...) and
whitening stay in torch (``model.pool_maps`` / ``model.from_pooled``), so new
region weights α or a new whitening need no re-export.

* ``"torch"``: the model as it is, on its device; ``"bf16"`` runs the backbone
  under ``torch.autocast``.
* ``"openvino"``: the backbone exported once to OpenVINO and compiled for the
  CPU: 4-6× the images per second of torch on a 2-core machine, 3× end to end
  on rParis including the export (``benchmarks/engines.py``).
  The export has a dynamic input ``(N, 3, H, W)``: one compiled model serves
  every image size (:class:`~remap_lib.nets.backbones.TraceableFeatures` makes
  EfficientNet-Lite's TF "SAME" padding size-independent).
* ``"auto"``: OpenVINO on a CPU, torch on a GPU (and torch on a CPU when
  OpenVINO is not installed).

Precision.  OpenVINO computes in bf16 on CPUs that support it unless told
otherwise, so the hint is always set: ``"f32"`` (the default) equals the torch
path to ~1e-6 per descriptor component; ``"bf16"`` must be asked for, and on a
CPU without bf16 the engine says so and runs f32 (``engine.precision`` tells
what runs).

Stale exports.  An export is keyed by :func:`~remap_lib.describe.model.weights_fingerprint`
of the backbone, the layers and the precision; compiled models are kept in
memory for this process, exported ones on disk under
``$REMAP_CACHE_DIR/openvino`` (default ``~/.cache/remap/openvino``).  Every
call checks that the backbone's tensors are the ones exported (their identity
and in-place version counters, ~0.3 ms) and re-exports when they changed.
Writes through ``tensor.data`` bypass the version counter: change weights with
``load_state_dict`` or in place under ``torch.no_grad()``, as training does.

Damaged exports.  The fingerprint in a file's name says which weights were
exported, not that the file still holds them: a flipped bit in the ``.bin``
loads without complaint and gives wrong descriptors.  So each export is a
folder (``model.xml``, ``model.bin`` and ``sha256.json``, the SHA-256 of both
taken when they were written) published by one rename, and a load reads both
files into memory, hashes them and builds the model from those very bytes.
Anything unproven (a changed byte, a truncated or missing file, a missing
record) is deleted with one warning and exported again.  The price, once per
process and model (later calls use the compiled model in memory), measured on
the 2-core development machine: EfficientNet-Lite0's 13.4 MB ``.bin`` (layers
1+2) hashes in ~12 ms and is read and checked in ~25 ms, against ~7 ms for
OpenVINO's own unchecked memory-mapped read (ResNet-50's 94 MB: ~85 and
~140 ms); compiling costs more than either.  Exports of older formats (``-x1``:
a bare ``.xml``/``.bin`` without a record) are never read: they are exported
again, quietly, and the old files can be deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import torch

from ..layers import functional as RF
from ..nets.backbones import FeatureBackbone, TraceableFeatures
from .model import RetrievalModel, weights_fingerprint

__all__ = ["ENGINES", "PRECISIONS", "InferenceEngine", "OpenVINOEngine", "TorchEngine", "create_engine",
           "export_openvino", "export_path", "openvino_cache_dir"]

log = logging.getLogger(__name__)

ENGINES = ("auto", "torch", "openvino")
PRECISIONS = ("f32", "bf16")

# Bump when the exported graph (TraceableFeatures, conversion options) or its layout on disk changes: old exports
# are never read.  1: bare .xml/.bin; 2: a folder with model.xml, model.bin and their SHA-256 in sha256.json.
EXPORT_FORMAT = 2
_RECORD = "sha256.json"  # beside model.xml in each export's folder
# What bf16 costs against f32, measured by benchmarks/engines.py (EfficientNet-Lite0 REMAP, the 250 photos of the
# rParis subset at 1024 px, OpenVINO 2026.4 on a 2-core AMD EPYC with bf16).
BF16_COST = ("descriptors keep a mean cosine of 0.999 with f32 (min 0.989 over the rParis subset at 1024 px) and "
             "mAP drops by 0.3-0.5 points (Easy/Medium/Hard); precision='f32' gives the torch numbers")
_MEMORY_SLOTS = 4  # compiled models kept in memory (a fine-tuning loop exports after every change)
_COMPILED: OrderedDict[tuple, object] = OrderedDict()
_bf16_noted = False


class InferenceEngine:
    """Describes images with a :class:`RetrievalModel`; subclasses say where its backbone runs.

    Attributes:
        name: ``"torch"`` or ``"openvino"``: what actually runs.
        precision: ``"f32"`` or ``"bf16"``: what actually runs.
    """

    name = "torch"
    precision = "f32"

    def __init__(self, model: RetrievalModel):
        self.model = model

    def feature_maps(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{layer: (N, C, h, w)}`` float32 maps of RGB ``images`` in ``[0, 1]``, like ``model.feature_maps``."""
        raise NotImplementedError

    @torch.no_grad()
    def describe(self, images_per_scale: Sequence[torch.Tensor]) -> torch.Tensor:
        """Paper Eq. 3 as :meth:`RetrievalModel.multiscale`: ``L2(Σ_s w_s · from_pooled(pool_maps(maps_s)))``."""
        model = self.model
        weights = model.config.scale_weights
        if len(images_per_scale) != len(weights):
            raise ValueError(f"{len(images_per_scale)} scales given, config has {len(weights)}")
        if self.precision == "bf16":
            _note_bf16()
        total = sum(w * model.from_pooled(model.pool_maps(self.feature_maps(x)))
                    for w, x in zip(weights, images_per_scale))
        return RF.l2n(total)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, precision={self.precision!r})"


class TorchEngine(InferenceEngine):
    """The model as it is, on ``device``; ``precision="bf16"`` runs the backbone under ``torch.autocast``."""

    name = "torch"

    def __init__(self, model: RetrievalModel, precision: str = "f32", device: torch.device | str = "cpu"):
        super().__init__(model)
        self.device = torch.device(device)
        if model.device.type != self.device.type:
            raise ValueError(f"the model is on {model.device} but the engine on {self.device}; "
                             f"move it first: model.to({str(self.device)!r})")
        if precision == "bf16" and not _torch_bf16_supported(self.device):
            log.warning("this %s has no bf16 support in torch; running f32", self.device.type)
            precision = "f32"
        self.precision = precision

    def feature_maps(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        images = images.to(self.device)
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.precision == "bf16"
                    else contextlib.nullcontext())
        with torch.no_grad(), autocast:
            maps = self.model.feature_maps(images)
        return {layer: m.float() for layer, m in maps.items()}


class OpenVINOEngine(InferenceEngine):
    """The backbone compiled by OpenVINO for the CPU; heads and whitening in torch.

    Not thread-safe: one engine holds one inference request.
    """

    name = "openvino"

    def __init__(self, model: RetrievalModel, precision: str = "f32",
                 cache_dir: str | os.PathLike | None | bool = None):
        super().__init__(model)
        if model.device.type != "cpu":
            raise ValueError(f"OpenVINO runs the backbone on the CPU, but the model is on {model.device}; "
                             "move it with model.to('cpu') or use engine='torch'")
        _openvino()
        if precision == "bf16" and "BF16" not in _core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            log.warning("this CPU has no bf16 support (OpenVINO's OPTIMIZATION_CAPABILITIES); running f32")
            precision = "f32"
        self.precision = precision
        self.cache_dir = None if cache_dir is False else Path(cache_dir) if cache_dir else openvino_cache_dir()
        self._state: tuple | None = None  # identity + version of every backbone tensor when last checked
        self._key: tuple | None = None
        self._compiled = None
        self._request = None

    def key(self) -> tuple:
        """``(backbone, weights fingerprint, layers, precision)`` of the compiled model this engine needs now."""
        backbone = self.model.backbone
        return backbone.name, weights_fingerprint(backbone), tuple(self.model.layers), self.precision

    def compiled(self):
        """The ``openvino.CompiledModel`` for the backbone's current weights (exported and compiled if needed)."""
        state = _tensor_state(self.model.backbone)
        if state != self._state or self._compiled is None:
            key = self.key()
            if key != self._key:
                self._compiled = _compile(self.model.backbone, key, self.cache_dir)
                self._request = self._compiled.create_infer_request()
                self._key = key
            self._state = state
        return self._compiled

    def feature_maps(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        self.compiled()
        x = images.detach().to("cpu", torch.float32).contiguous().numpy()
        out = self._request.infer([x], share_inputs=True, share_outputs=False)
        return {layer: torch.from_numpy(out[i]) for i, layer in enumerate(self.model.layers)}


def create_engine(model: RetrievalModel, engine: str = "auto", precision: str = "f32",
                  device: torch.device | str = "cpu", *,
                  cache_dir: str | os.PathLike | None | bool = None) -> InferenceEngine:
    """An inference engine for ``model`` (no gradients: training uses the model itself).

    Args:
        model: the descriptor model, already on ``device``.
        engine: ``"auto"`` (OpenVINO on a CPU, torch on a GPU), ``"torch"`` or ``"openvino"``.
        precision: ``"f32"`` (equal to the torch path) or ``"bf16"`` (faster, approximate; f32 with a
            warning where the hardware has none).
        device: where the model is; ``"auto"`` means CUDA when available.
        cache_dir: OpenVINO exports on disk (default :func:`openvino_cache_dir`; ``False``: memory only).
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if engine == "openvino" and device.type != "cpu":
        raise ValueError(f"engine 'openvino' runs on the CPU, not on {device}; use engine='torch' (or 'auto') "
                         "on a GPU, or device='cpu'")
    if engine == "auto":
        engine = "torch"
        if device.type == "cpu":
            try:
                _openvino()
                engine = "openvino"
            except ImportError as exc:
                log.info("%s; describing with torch", exc)
    if engine == "openvino":
        return OpenVINOEngine(model, precision, cache_dir)
    return TorchEngine(model, precision, device)


# --------------------------------------------------------------------------- export


def openvino_cache_dir() -> Path:
    """``$REMAP_CACHE_DIR/openvino``, by default ``~/.cache/remap/openvino``."""
    root = os.environ.get("REMAP_CACHE_DIR") or Path.home() / ".cache" / "remap"
    return Path(root) / "openvino"


def export_path(cache_dir: str | os.PathLike, key: tuple) -> Path:
    """The ``model.xml`` of the export for ``key`` (:meth:`OpenVINOEngine.key`).

    Its folder is named after the backbone, weights, layers and versions and
    also holds ``model.bin`` and ``sha256.json``.  The precision is a
    compilation setting, not part of the files.
    """
    name, fingerprint, layers, _ = key
    version = _openvino().__version__.split("-")[0]
    folder = f"{name}-{fingerprint}-{'+'.join(layers)}-ov{version}-x{EXPORT_FORMAT}"
    return Path(cache_dir) / folder / "model.xml"


def export_openvino(backbone: FeatureBackbone, layers: Sequence[str]):
    """``backbone``'s maps of ``layers`` as an ``openvino.Model`` with input ``(N, 3, H, W)`` of any size.

    Traced with a small example image; :class:`TraceableFeatures` makes the
    graph independent of its size.  Outputs are named after the layers.
    """
    ov = _openvino()
    if next(backbone.parameters()).device.type != "cpu":
        raise ValueError("export the backbone from the CPU")
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # OpenVINO's own tracing would run the model twice (check_trace); its input is ours anyway.
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.trace", category=FutureWarning)
            traced = torch.jit.trace(TraceableFeatures(backbone, layers), torch.rand(1, 3, 64, 64),
                                     check_trace=False, strict=False)
            model = ov.convert_model(traced, input=[ov.PartialShape([-1, 3, -1, -1])])
    finally:
        backbone.train(was_training)
    model.inputs[0].get_tensor().set_names({"images"})
    for output, layer in zip(model.outputs, layers):
        output.get_tensor().set_names({layer})
    return model


def _compile(backbone: FeatureBackbone, key: tuple, cache_dir: Path | None):
    """The compiled model for ``key``: from memory, else from disk, else exported now."""
    if key in _COMPILED:
        _COMPILED.move_to_end(key)
        return _COMPILED[key]
    name, fingerprint, layers, precision = key
    t = time.perf_counter()
    path = None if cache_dir is None else export_path(cache_dir, key)
    model = None if path is None else _read_verified(path)
    source = "exported" if model is None else f"read from {path.parent}"
    if model is None:
        model = export_openvino(backbone, layers)
        if path is not None:
            _save(model, path)
    loaded = time.perf_counter()
    # The hint is always explicit: left alone, OpenVINO runs bf16 on CPUs that have it.
    compiled = _core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision,
                                                    "PERFORMANCE_HINT": "LATENCY"})
    log.info("OpenVINO: %s (layers %s, weights %s) %s in %.1f s, compiled for %s in %.1f s", name,
             ", ".join(layers), fingerprint, source, loaded - t, precision, time.perf_counter() - loaded)
    _COMPILED[key] = compiled
    while len(_COMPILED) > _MEMORY_SLOTS:
        _COMPILED.popitem(last=False)
    return compiled


def _read_verified(path: Path):
    """The ``openvino.Model`` at ``path`` if its files are byte for byte the ones exported, else None.

    Both files are read into memory once (the weights straight into a tensor
    of OpenVINO's), hashed, and the model is built from those very bytes: what
    is checked is what runs, even if another process replaces the folder
    meanwhile.  An export that cannot prove itself (a changed byte, a
    truncated or missing file, no record) is deleted with one warning, and the
    caller exports again; no folder at all is a first export.
    """
    folder = path.parent
    if not folder.exists():
        return None
    try:
        xml, weights = path.read_bytes(), _read_tensor(path.with_suffix(".bin"))
        problem = _mismatch(json.loads((folder / _RECORD).read_text()), {path.name: xml,
                                                                          path.with_suffix(".bin").name: weights.data})
        if problem is None:
            return _core().read_model(xml.decode(), weights)
    except Exception as exc:  # a missing or unreadable file or record; OpenVINO refusing what was exported
        problem = f"cannot read it: {exc}"
    log.warning("the OpenVINO export in %s is not the one written (%s); deleting it and exporting again",
                folder, problem)
    _discard(folder)
    return None


def _read_tensor(path: Path):
    """The bytes of ``path`` in an ``openvino.Tensor`` that owns them (no copy, and no numpy buffer to outlive)."""
    ov = _openvino()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        tensor = ov.Tensor(ov.Type.u8, ov.Shape([size]))
        if f.readinto(tensor.data) != size:
            raise OSError(f"{path.name} shrank while being read")
    return tensor


def _mismatch(record: dict, files: dict[str, object]) -> str | None:
    """Why ``files`` (``{name: bytes}``) are not the ones whose SHA-256 ``record`` holds; None when they are."""
    recorded = record.get("sha256", {})
    for name, data in files.items():
        if name not in recorded:
            return f"{_RECORD} has no SHA-256 of {name}"
        if _sha256(data) != recorded[name]:
            return f"{name} differs from the SHA-256 recorded at export"
    return None


def _sha256(data) -> str:
    return hashlib.sha256(data).hexdigest()


def _save(model, path: Path) -> None:
    """Write the export into a private folder, then publish it with one rename: never half an export.

    The folder holds ``model.xml``, ``model.bin`` and ``sha256.json``: the
    SHA-256 of both files as they lie on the disk, which every later load
    checks.  When several processes export the same model the first rename
    wins and the others keep theirs in memory only: their ``.xml`` files differ
    in OpenVINO's generated node names, so files of two writers must not mix.
    """
    ov = _openvino()
    folder = path.parent
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)  # left behind by a killed process with our pid
        tmp.mkdir(parents=True)
        xml, weights = tmp / path.name, tmp / path.with_suffix(".bin").name
        ov.save_model(model, str(xml), compress_to_fp16=False)  # the default would halve the weights
        record = {"format": EXPORT_FORMAT, "sha256": {f.name: _sha256(f.read_bytes()) for f in (xml, weights)}}
        (tmp / _RECORD).write_text(json.dumps(record, indent=1) + "\n")
        _publish(tmp, folder)
    except OSError as exc:  # a read-only home: the export still works, from memory
        log.warning("cannot cache the OpenVINO export in %s (%s); set REMAP_CACHE_DIR to a writable folder",
                    folder.parent, exc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, folder: Path) -> None:
    """Rename the complete ``tmp`` folder to ``folder``, unless another process published it first."""
    try:
        os.rename(tmp, folder)  # fails when ``folder`` exists with files in it, on POSIX and Windows alike
    except OSError:
        if not folder.is_dir():
            raise
        log.info("OpenVINO: %s was written by another process meanwhile; keeping that one", folder)


def _discard(folder: Path) -> None:
    """Delete a damaged export: renamed away first, so that no reader meets half of it."""
    trash = folder.with_name(f".{folder.name}.{os.getpid()}.trash")
    shutil.rmtree(trash, ignore_errors=True)
    try:
        os.rename(folder, trash)
    except OSError:  # gone already (another process discarded it) or a read-only cache
        return
    shutil.rmtree(trash, ignore_errors=True)


# --------------------------------------------------------------------------- helpers


def _openvino():
    try:
        import openvino
    except ImportError as exc:
        raise ImportError("OpenVINO is not installed (pip install openvino)") from exc
    return openvino


_core_instance = None


def _core():
    global _core_instance
    if _core_instance is None:
        _core_instance = _openvino().Core()
    return _core_instance


def _tensor_state(module: torch.nn.Module) -> tuple:
    """Identity, storage and in-place version of every tensor of ``module``: changes whenever a weight does."""
    return tuple((id(t), t.data_ptr(), t._version) for m in module.modules()
                 for d in (m._parameters, m._buffers) for t in d.values() if t is not None)


def _torch_bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _note_bf16() -> None:
    global _bf16_noted
    if not _bf16_noted:
        log.info("bf16: %s", BF16_COST)
        _bf16_noted = True
