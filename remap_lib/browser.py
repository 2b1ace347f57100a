"""The interactive query browser of notebook 5 (ipywidgets).

Pick a query by its thumbnail; see the top-k of two methods side by side,
correct results framed green (paper Fig. 9); change the number of scales, the
layers and the region weighting and watch the rankings and mAP change.

The widgets change only the pooling, never the CNN: the browser runs the
backbone once, when it is built, and keeps the feature maps of layers 1 and 2
of every database and query image (:class:`~remap_lib.shared_pass.FeatureMaps`:
in memory up to ``max_map_bytes``, 1 GiB by default, beyond that in
memory-mapped files in a temporary folder).  Every widget change re-pools those
maps with the new head (well under a second on the demo set at 320 px,
``benchmarks/browser.py``), and descriptors are cached per configuration, so
going back to a setting is instant.

The results are plain HTML (``<div class="remap-results" data-ranking="...">``),
so that a browser test can read what is shown.
"""

from __future__ import annotations

import base64
import io
import time

import numpy as np

from .config import ModelConfig
from .datasets import RetrievalDataset
from .evaluate import score
from .images import load_thumbnail
from .metrics import rank_database
from .shared_pass import DEFAULT_MAP_MEMORY, SharedBackbone

__all__ = ["QueryBrowser"]

COLOURS = {"ok": "#1a9641", "wrong": "#d7191c", "junk": "#999999"}


def _thumb_png(spec, size: int = 120) -> bytes:
    buf = io.BytesIO()
    load_thumbnail(spec, size).save(buf, "PNG")
    return buf.getvalue()


class QueryBrowser:
    """``QueryBrowser(dataset).widget`` is the whole browser; ``select`` / ``set_scales`` drive it in code.

    Args:
        dataset: the benchmark to browse (its primary protocol frames the results).
        image_size: longer side of the images for the descriptors.
        kl_weights: optional :class:`~remap_lib.klw.KLWeights` for the "KL" weighting.
        top_k: results shown per method.
        backbone: a built backbone (default: EfficientNet-Lite0, ImageNet weights).
        engine, precision, device: how the one backbone pass runs (:func:`remap_lib.engine.create_engine`).
        max_map_bytes: feature maps kept in memory; the rest go to disk (see the module docstring).

    ``build_seconds`` is how long the backbone pass took.
    """

    LAYERS = (1, 2)  # the layers the widgets can choose from: their maps are kept

    def __init__(self, dataset: RetrievalDataset, image_size: int = 320, kl_weights=None, top_k: int = 5,
                 backbone=None, engine: str = "auto", precision: str = "f32", device: str = "auto",
                 max_map_bytes: int = DEFAULT_MAP_MEMORY):
        from .backbones import build_backbone

        self.dataset, self.image_size, self.kl, self.top_k = dataset, image_size, kl_weights, top_k
        self.backbone = backbone or build_backbone("efficientnet_lite0")
        self.cache: dict = {}
        self._thumbs: dict[tuple, str] = {}
        self.query = 0
        self.scales, self.layers, self.weighting = 4, "1+2", "uniform"
        t = time.perf_counter()
        shared = SharedBackbone(self.backbone, device, engine, precision)
        specs = dataset.images if dataset.query_is_database else dataset.images + dataset.queries
        self.maps = shared.keep_maps(specs, [image_size], self.LAYERS, max_bytes=max_map_bytes)
        self.build_seconds = time.perf_counter() - t
        self._build_widgets()

    # ---------------------------------------------------------------- descriptors
    def _setting(self, head: str) -> tuple[int, tuple[int, ...], str]:
        """What the widgets set for ``head``: (scales, layers, weighting); R-MAC is layer 1, uniform."""
        if head == "rmac":
            return self.scales, (1,), "uniform"
        return self.scales, (1,) if self.layers == "1" else (1, 2), self.weighting

    def model(self, head: str):
        """The model the widgets ask for now (``"rmac"`` or ``"remap"``)."""
        from .model import RetrievalModel

        scales, layers, weighting = self._setting(head)
        model = RetrievalModel(ModelConfig(head=head, layers=list(layers), levels=scales,
                                           image_sizes=[self.image_size]), self.backbone)
        if weighting == "KL":
            if self.kl is None:
                raise ValueError("no KL weights were given to the browser")
            if self.kl.model["levels"] != scales:
                raise ValueError(f"the KL weights are for S = {self.kl.model['levels']} scales")
            model.set_region_weights({layer: self.kl.weights[layer] for layer in model.layers})
        return model

    def descriptors(self, head: str) -> tuple[np.ndarray, np.ndarray, float]:
        """``(database, queries, mAP)`` under the current settings, pooled from the kept maps (no backbone)."""
        key = (head, *self._setting(head))
        if key not in self.cache:
            rows = self.maps.describe(self.model(head))
            n = len(self.dataset.images)
            db, q = rows[:n], (rows[:n] if self.dataset.query_is_database else rows[n:])
            self.cache[key] = (db, q, score(self.dataset, db, q)[self.dataset.primary]["map"])
        return self.cache[key]

    def ranking(self, head: str) -> list[int]:
        db, q, _ = self.descriptors(head)
        return rank_database(q[self.query:self.query + 1], db, self.top_k)[0].tolist()

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
        for head, label in (("rmac", "R-MAC"), ("remap", f"REMAP (layers {self.layers}, {self.weighting})")):
            ranking = self.ranking(head)
            rankings[head] = ranking
            _, _, m = self.descriptors(head)
            cells = "".join(self._img(self.dataset.images[i],
                                      COLOURS[result_status(self.dataset, self.dataset.primary, self.query, i)])
                            for i in ranking)
            rows.append(f'<div><b>{label}</b> — mAP {100 * m:.1f}<br>{cells}</div>')
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
        self.scales_slider = W.IntSlider(value=self.scales, min=2, max=5, description="scales S")
        self.layers_toggle = W.ToggleButtons(options=["1", "1+2"], value=self.layers, description="layers")
        self.weighting_toggle = W.ToggleButtons(options=["uniform", "KL"] if self.kl else ["uniform"],
                                                value=self.weighting, description="weights")
        self.scales_slider.observe(lambda ch: self.set_scales(ch["new"]), names="value")
        self.layers_toggle.observe(lambda ch: self._set(layers=ch["new"]), names="value")
        self.weighting_toggle.observe(lambda ch: self._set(weighting=ch["new"]), names="value")
        self.output = W.HTML()
        self.widget = W.VBox([W.HBox(thumbs, layout=W.Layout(flex_flow="row wrap")),
                              W.HBox([self.scales_slider, self.layers_toggle, self.weighting_toggle]), self.output])
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

    def _set(self, **kw):
        for k, v in kw.items():
            setattr(self, k, v)
        self.refresh()
