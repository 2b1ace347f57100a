"""The interactive query browser of notebook 5 (ipywidgets).

Pick a query by its thumbnail; see the top-k of two methods side by side,
correct results framed green (paper Fig. 9); change the number of scales, the
layers and the region weighting and watch the rankings and mAP change.
Descriptors are computed on demand and cached per configuration.

The results are plain HTML (``<div class="remap-results" data-ranking="...">``),
so that a browser test can read what is shown.
"""

from __future__ import annotations

import base64
import io

import numpy as np

from .config import ModelConfig
from .datasets import RetrievalDataset
from .evaluate import describe, score
from .images import load_thumbnail
from .metrics import rank_database

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
    """

    def __init__(self, dataset: RetrievalDataset, image_size: int = 320, kl_weights=None, top_k: int = 5,
                 backbone=None):
        from .backbones import build_backbone

        self.dataset, self.image_size, self.kl, self.top_k = dataset, image_size, kl_weights, top_k
        self.backbone = backbone or build_backbone("efficientnet_lite0")
        self.cache: dict = {}
        self._thumbs: dict[tuple, str] = {}
        self.query = 0
        self.scales, self.layers, self.weighting = 4, "1+2", "uniform"
        self._build_widgets()

    # ---------------------------------------------------------------- descriptors
    def _descriptors(self, head: str):
        layers = [1] if head == "rmac" or self.layers == "1" else [1, 2]
        weighting = self.weighting if head == "remap" else "uniform"
        key = (head, self.scales, tuple(layers), weighting)
        if key not in self.cache:
            from .model import RetrievalModel

            cfg = ModelConfig(head=head, layers=layers, levels=self.scales, image_sizes=[self.image_size])
            model = RetrievalModel(cfg, self.backbone)
            if weighting == "KL":
                if self.kl is None:
                    raise ValueError("no KL weights were given to the browser")
                if self.kl.model["levels"] != self.scales:
                    raise ValueError(f"the KL weights are for S = {self.kl.model['levels']} scales")
                model.set_region_weights({layer: self.kl.weights[layer] for layer in model.layers})
            db, q = describe(model, self.dataset, None, progress=False)
            self.cache[key] = (db, q, score(self.dataset, db, q)[self.dataset.primary]["map"])
        return self.cache[key]

    def ranking(self, head: str) -> list[int]:
        db, q, _ = self._descriptors(head)
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
            _, _, m = self._descriptors(head)
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
