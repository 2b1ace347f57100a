"""The interactive query browser of notebook 5 (ipywidgets).

Pick a query by its thumbnail; see the top-k of two methods side by side,
correct results framed green (paper Fig. 9); change the number of scales, the
layers and the region weighting and watch the rankings and mAP change.

The widgets change only the pooling, never the CNN: the browser runs the
backbone once, when it is built, and keeps the feature maps of layers 1 and 2
of every database and query image (:class:`~remap_lib.describe.shared_pass.FeatureMaps`:
in memory up to ``max_map_bytes``, 1 GiB by default, beyond that in
memory-mapped files in a temporary folder).  Every widget change re-pools those
maps with the new head (well under a second on the demo set at 320 px,
``benchmarks/browser.py``), and descriptors are cached per configuration, so
going back to a setting is instant.

Fine-tuned models.  ``checkpoints={"rmac": "…/model.pt", "remap": model}``
shows a trained model in a row instead of the ImageNet head the widgets build
(the ``model.pt`` that ``remap train`` or ``benchmarks/finetune_landmarks.py``
writes, read by :meth:`RetrievalModel.load <remap_lib.describe.model.RetrievalModel.load>`,
or a model in memory).  A trained model is more than a pooling setting: its
backbone weights, region weights α, layer weights and whitening FC were learned
together, so

* its maps come from its own backbone: one more pass per *distinct* backbone
  (weights fingerprint; a model trained with a frozen backbone shares the
  ImageNet pass), kept the same way, and it is described with its own
  :meth:`~remap_lib.describe.model.RetrievalModel.pool_maps` and
  :meth:`~remap_lib.describe.model.RetrievalModel.from_pooled` (α, layer weights,
  whitening);
* the widgets leave it alone (changing its S or layers would throw away what
  was learned for its 40 regions and its layers): its ranking is fixed, its row
  says "fine-tuned", and a widget that acts on no row left is disabled;
* it is described at the browser's ``image_size`` (one size, no enlarging),
  like the other row, whatever size it was trained at (its label says): the two
  rows then differ by what was learned, not by the picture size.
  ``benchmarks/finetune_landmarks.py`` also scores models trained at 320 px on
  1024 px images.

Learned proposals.  ``checkpoints={"rpn": "runs/train-rpn-landmarks-cpu/model.pt"}``
adds a third row: R-MAC pooled over the top-k regions of a trained region
proposal network (a ``regions: rpn`` model of ``remap train-rpn``, Gordo et
al. 2016; :mod:`remap_lib.layers.proposals`) instead of the grid.  It is a trained
model like the fine-tuned ones (its own backbone pass unless its backbone is
the ImageNet one, which ``remap train-rpn`` keeps frozen; the scales and
layers widgets leave it alone), but one setting stays free: the number of
proposals ``k`` it pools (a dropdown, :meth:`QueryBrowser.set_proposals`).

The results are plain HTML (``<div class="remap-results" data-ranking="...">``),
so that a browser test can read what is shown.
"""

from __future__ import annotations

import base64
import io
import os
import time
from typing import Mapping

import numpy as np

from ..config import ModelConfig
from ..data.datasets import RetrievalDataset
from ..data.images import load_thumbnail
from ..describe.shared_pass import DEFAULT_MAP_MEMORY, SharedBackbone
from ..evaluation.evaluate import score
from ..evaluation.metrics import rank_database

__all__ = ["QueryBrowser", "load_fine_tuned"]

COLOURS = {"ok": "#1a9641", "wrong": "#d7191c", "junk": "#999999"}
HEADS = {"rmac": "R-MAC", "remap": "REMAP"}  # the two rows, in display order
ROWS = {**HEADS, "rpn": "R-MAC over learned proposals"}  # and the optional third, shown when its checkpoint is given
PROPOSAL_COUNTS = (8, 16, 32, 64, 128, 256)  # what the k dropdown of the proposals row offers


def _thumb_png(spec, size: int = 120) -> bytes:
    buf = io.BytesIO()
    load_thumbnail(spec, size).save(buf, "PNG")
    return buf.getvalue()


def load_fine_tuned(source, head: str):
    """The trained model for the ``head`` row: a :class:`RetrievalModel` as it is, or a ``model.pt`` path loaded.

    ``head`` is ``"rmac"``, ``"remap"`` or ``"rpn"`` (the learned-proposals
    row: a ``regions: rpn`` model with a trained RPN).  Errors name the row and
    the file: a missing file, a file that is not a remap model (damaged, a
    training state ``checkpoint.pt`` instead of the ``model.pt`` beside it, NaN
    weights), or a model of another head or other regions.
    """
    from ..describe.model import RetrievalModel

    if head not in ROWS:
        raise ValueError(f"no {head!r} row in the browser; checkpoints can fill {', '.join(ROWS)}")
    name = ROWS[head]
    if isinstance(source, RetrievalModel):
        model = source
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{name} checkpoint {path}: no such file (from {os.getcwd()}). A fine-tuned model.pt is written "
                "by `remap train --config FILE` (into its out_dir) or `python benchmarks/finetune_landmarks.py` "
                "(runs/finetune_landmarks/<row>/train/model.pt); a proposals model.pt by `remap train-rpn --config "
                "configs/train_rpn_landmarks_cpu.yaml` (runs/train-rpn-landmarks-cpu/model.pt)")
        try:
            model = RetrievalModel.load(path)
        except ValueError as exc:
            raise ValueError(f"{name} checkpoint: {exc} (give the model.pt a training run writes at its end, "
                             "not its checkpoint.pt)") from exc
    else:
        raise TypeError(f"{name} checkpoint: expected a model.pt path or a RetrievalModel, got {type(source).__name__}")
    regions = model.config.regions
    if head == "rpn":
        if regions != "rpn":
            raise ValueError(f"the {name} row shows a regions: rpn model (`remap train-rpn`); this checkpoint pools "
                             f"the {regions} regions of a {model.config.head} head: give it to the "
                             f"{HEADS.get(model.config.head, model.config.head)} row")
        if not bool(model.streams[model.layers[0]].rpn.trained):
            raise ValueError(f"{name} checkpoint: its region proposal network was never trained; train it with "
                             "`remap train-rpn` and give the model.pt it writes")
    elif model.config.head != head:
        raise ValueError(f"the {name} row shows a {head} model; this checkpoint has a {model.config.head} head "
                         f"({HEADS.get(model.config.head, model.config.head)}): give it to its own row")
    elif regions == "rpn":
        raise ValueError(f"the {name} row shows the grid; this checkpoint pools learned proposals (regions: rpn): "
                         "give it as checkpoints={'rpn': ...}, the third row")
    if model.whiten is not None and not bool(model.whitening_learned):
        raise ValueError(f"{name} checkpoint: its whitening layer was never learned (a trained model.pt has it)")
    return model


def _at_size(model, size: int):
    """``model`` (sharing its backbone and every weight) describing images at one size, ``size`` px, never enlarged."""
    from ..describe.model import RetrievalModel

    cfg = ModelConfig.from_dict({**model.config.to_dict(), "image_sizes": [size], "scale_weights": [1.0],
                                 "upscale": False})
    twin = RetrievalModel(cfg, model.backbone)
    twin.load_state_dict(model.state_dict())
    return twin.eval()


class QueryBrowser:
    """``QueryBrowser(dataset).widget`` is the whole browser; ``select`` / ``set_scales`` drive it in code.

    Args:
        dataset: the benchmark to browse (its primary protocol frames the results).
        image_size: longer side of the images for the descriptors (every row).
        kl_weights: optional :class:`~remap_lib.training.klw.KLWeights` for the "KL" weighting.
        top_k: results shown per method.
        backbone: a built backbone for the widget rows (default: EfficientNet-Lite0, ImageNet weights).
        engine, precision, device: how the backbone passes run (:func:`remap_lib.describe.engine.create_engine`).
        max_map_bytes: feature maps kept in memory per backbone; the rest go to disk (see the module docstring).
        checkpoints: ``{"rmac" | "remap": model.pt path or RetrievalModel}``: rows shown as fine-tuned
            models, fixed, instead of built by the widgets (see the module docstring); a ``None``
            value leaves its row to the widgets.  ``"rpn"``: a ``regions: rpn`` model, shown in a
            third row (R-MAC over its top-k learned proposals; ``k`` from a dropdown).

    ``build_seconds`` is how long the backbone passes took; ``head_maps`` the kept maps each row pools.
    """

    LAYERS = (1, 2)  # the layers the widgets can choose from: their maps are kept

    def __init__(self, dataset: RetrievalDataset, image_size: int = 320, kl_weights=None, top_k: int = 5,
                 backbone=None, engine: str = "auto", precision: str = "f32", device: str = "auto",
                 max_map_bytes: int = DEFAULT_MAP_MEMORY, checkpoints: Mapping[str, object] | None = None):
        from ..describe.model import weights_fingerprint
        from ..nets.backbones import build_backbone

        self.dataset, self.image_size, self.kl, self.top_k = dataset, image_size, kl_weights, top_k
        # checkpoints first: a wrong path fails before minutes of backbone pass
        trained = {head: load_fine_tuned(source, head) for head, source in (checkpoints or {}).items()
                   if source is not None}
        self.trained_sizes = {head: list(m.config.image_sizes) for head, m in trained.items()}
        self.fine_tuned = {head: _at_size(m, image_size) for head, m in trained.items()}
        self.widget_heads = [h for h in HEADS if h not in self.fine_tuned]
        self.rows = [h for h in ROWS if h in HEADS or h in self.fine_tuned]
        self.proposals = self.fine_tuned["rpn"].config.proposals if "rpn" in self.fine_tuned else None
        self.backbone = backbone or (build_backbone("efficientnet_lite0") if self.widget_heads else None)
        self.cache: dict = {}
        self._thumbs: dict[tuple, str] = {}
        self.query = 0
        self.scales, self.layers, self.weighting = 4, "1+2", "uniform"

        # one pass per distinct backbone (name + weights), over the union of the layers its rows read
        passes: dict[tuple, tuple] = {}  # key -> (backbone, layer names, heads)
        wants = [(h, self.backbone, self.backbone.resolve_layers(self.LAYERS)) for h in self.widget_heads]
        wants += [(h, m.backbone, m.layers) for h, m in self.fine_tuned.items()]
        for head, net, layers in wants:
            key = (net.name, weights_fingerprint(net))
            net, have, heads = passes.get(key, (net, set(), []))
            passes[key] = (net, have | set(layers), heads + [head])
        t = time.perf_counter()
        specs = dataset.images if dataset.query_is_database else dataset.images + dataset.queries
        self.head_maps = {}
        for net, layers, heads in passes.values():
            shared = SharedBackbone(net, device, engine, precision)
            self.device = shared.device
            maps = shared.keep_maps(specs, [image_size], [n for n in net.layer_names if n in layers],
                                    max_bytes=max_map_bytes)
            self.head_maps.update({head: maps for head in heads})
        self.fine_tuned = {head: m.to(self.device) for head, m in self.fine_tuned.items()}
        self.build_seconds = time.perf_counter() - t
        # the ImageNet maps the widgets re-pool (None when both rows are fine-tuned)
        self.maps = self.head_maps[self.widget_heads[0]] if self.widget_heads else None
        self._build_widgets()

    # ---------------------------------------------------------------- descriptors
    def _setting(self, head: str) -> tuple[int, tuple[int, ...], str]:
        """What the widgets set for ``head``: (scales, layers, weighting); R-MAC is layer 1, uniform."""
        if head == "rmac":
            return self.scales, (1,), "uniform"
        return self.scales, (1,) if self.layers == "1" else (1, 2), self.weighting

    def _key(self, head: str) -> tuple:
        """The cache key of ``head``'s descriptors: a fine-tuned row has one whatever the widgets say (proposals: one per k)."""
        if head == "rpn":
            return head, "fine-tuned", self.proposals
        return (head, "fine-tuned") if head in self.fine_tuned else (head, *self._setting(head))

    def model(self, head: str):
        """The model of the ``head`` row now (``"rmac"``, ``"remap"``, ``"rpn"``): trained (proposals at k) or the widgets'."""
        from ..describe.model import RetrievalModel

        if head == "rpn":
            model = self.fine_tuned[head]
            model.set_proposal_count(self.proposals)
            return model
        if head in self.fine_tuned:
            return self.fine_tuned[head]
        scales, layers, weighting = self._setting(head)
        model = RetrievalModel(ModelConfig(head=head, layers=list(layers), levels=scales,
                                           image_sizes=[self.image_size]), self.backbone)
        if weighting == "KL":
            if self.kl is None:
                raise ValueError("no KL weights were given to the browser")
            if self.kl.model["levels"] != scales:
                raise ValueError(f"the KL weights are for S = {self.kl.model['levels']} scales")
            model.set_region_weights({layer: self.kl.weights[layer] for layer in model.layers})
        return model.to(self.device)

    def descriptors(self, head: str) -> tuple[np.ndarray, np.ndarray, float]:
        """``(database, queries, mAP)`` under the current settings, pooled from the kept maps (no backbone)."""
        key = self._key(head)
        if key not in self.cache:
            rows = self.head_maps[head].describe(self.model(head))
            n = len(self.dataset.images)
            db, q = rows[:n], (rows[:n] if self.dataset.query_is_database else rows[n:])
            self.cache[key] = (db, q, score(self.dataset, db, q)[self.dataset.primary]["map"])
        return self.cache[key]

    def ranking(self, head: str) -> list[int]:
        db, q, _ = self.descriptors(head)
        return rank_database(q[self.query:self.query + 1], db, self.top_k)[0].tolist()

    def label(self, head: str) -> str:
        """The row's title: the method, and what the widgets set or how the fine-tuned model was built."""
        if head not in self.fine_tuned:
            return HEADS[head] if head == "rmac" else f"REMAP (layers {self.layers}, {self.weighting})"
        m = self.fine_tuned[head]
        paper = m.backbone.paper_layers
        layers = "+".join(str(paper.index(n) + 1) if n in paper else n for n in m.layers)
        regions = f"top {self.proposals} proposals" if head == "rpn" else f"S = {m.config.levels}"
        parts = [regions, f"layer{'s' if len(m.layers) > 1 else ''} {layers}"]
        if m.whiten is not None:
            parts.append(f"whitened {m.output_dim}-D")
        if self.trained_sizes[head] != [self.image_size]:
            parts.append(f"trained at {'/'.join(map(str, self.trained_sizes[head]))} px")
        if head == "rpn":
            return f"{ROWS[head]} (RPN, {', '.join(parts)})"
        return f"{HEADS[head]} fine-tuned ({', '.join(parts)})"

    # ---------------------------------------------------------------- rendering
    def _img(self, spec, border: str | None = None, size: int = 120) -> str:
        key = (spec.key, size)
        if key not in self._thumbs:
            self._thumbs[key] = base64.b64encode(_thumb_png(spec, size)).decode()
        style = f"border:4px solid {border};" if border else "border:4px solid transparent;"
        return f'<img src="data:image/png;base64,{self._thumbs[key]}" style="{style}margin:2px;height:90px">'

    def results_html(self) -> str:
        from .plots import result_status

        rows = []
        rankings = {}
        for head in self.rows:
            ranking = self.ranking(head)
            rankings[head] = ranking
            _, _, m = self.descriptors(head)
            cells = "".join(self._img(self.dataset.images[i],
                                      COLOURS[result_status(self.dataset, self.dataset.primary, self.query, i)])
                            for i in ranking)
            rows.append(f'<div><b>{self.label(head)}</b> — mAP {100 * m:.1f}<br>{cells}</div>')
        data = ";".join(f"{h}:{','.join(map(str, r))}" for h, r in rankings.items())
        return (f'<div class="remap-results" data-query="{self.query}" data-scales="{self.scales}" '
                f'data-ranking="{data}"><div>query {self.query} ({self.scales} scales)</div>'
                f'{self._img(self.dataset.queries[self.query], "#2b83ba")}{"".join(rows)}</div>')

    # ---------------------------------------------------------------- widgets
    def _build_widgets(self):
        import ipywidgets as W

        thumbs = []
        for i, spec in enumerate(self.dataset.queries):
            button = W.Button(description=f"query {i}", layout=W.Layout(width="110px"))
            button.on_click(lambda _b, i=i: self.select(i))
            thumbs.append(W.VBox([W.Image(value=_thumb_png(spec, 100), width=100), button]))
        # a control that would act on no row (every row it sets is fine-tuned) is shown disabled
        remap_fixed = "remap" in self.fine_tuned
        self.scales_slider = W.IntSlider(value=self.scales, min=2, max=5, description="scales S",
                                         disabled=not self.widget_heads)
        self.layers_toggle = W.ToggleButtons(options=["1", "1+2"], value=self.layers, description="layers",
                                             disabled=remap_fixed)
        self.weighting_toggle = W.ToggleButtons(options=["uniform", "KL"] if self.kl and not remap_fixed
                                                else ["uniform"], value=self.weighting, description="weights",
                                                disabled=remap_fixed)
        counts = sorted({*PROPOSAL_COUNTS, self.proposals}) if self.proposals else list(PROPOSAL_COUNTS)
        self.proposals_dropdown = W.Dropdown(options=counts, value=self.proposals or counts[-1],
                                             description="proposals k", disabled=self.proposals is None,
                                             layout=W.Layout(width="180px"))
        self.scales_slider.observe(lambda ch: self.set_scales(ch["new"]), names="value")
        self.proposals_dropdown.observe(lambda ch: self.set_proposals(ch["new"]), names="value")
        self.layers_toggle.observe(lambda ch: self._set(layers=ch["new"]), names="value")
        self.weighting_toggle.observe(lambda ch: self._set(weighting=ch["new"]), names="value")
        self.output = W.HTML()
        self.widget = W.VBox([W.HBox(thumbs, layout=W.Layout(flex_flow="row wrap")),
                              W.HBox([self.scales_slider, self.layers_toggle, self.weighting_toggle]
                                     + ([self.proposals_dropdown] if self.proposals else [])), self.output])
        self.refresh()

    def refresh(self):
        self.output.value = '<div class="remap-busy">computing…</div>'
        self.output.value = self.results_html()

    def select(self, query: int):
        self.query = query
        self.refresh()

    def set_scales(self, scales: int):
        if self.kl is not None and self.weighting == "KL" and self.kl.model["levels"] != scales:
            self.weighting = "uniform"
            self.weighting_toggle.value = "uniform"
        self.scales = scales
        self.refresh()

    def set_proposals(self, k: int):
        """Pool the top ``k`` learned proposals in the proposals row (re-pooled from the kept maps)."""
        if self.proposals is None:
            raise ValueError("the browser has no proposals row: give checkpoints={'rpn': model.pt of remap train-rpn}")
        self.proposals = int(k)
        self.refresh()

    def _set(self, **kw):
        for k, v in kw.items():
            setattr(self, k, v)
        self.refresh()
