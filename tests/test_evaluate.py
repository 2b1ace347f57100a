"""Evaluation (remap_lib.evaluation.evaluate), plots and `remap evaluate`."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from remap_lib.app.cli import main
from remap_lib.config import ModelConfig
from remap_lib.data.datasets import RetrievalDataset, load_folder_groups
from remap_lib.evaluation.evaluate import COLOUR_HISTOGRAM, colour_histograms, evaluate, format_table, score
from remap_lib.data.images import ImageSpec
from remap_lib.app.plots import activation_maps, plot_query_results, plot_region_grid, result_status


def test_colour_histogram_of_solid_colours(tmp_path):
    # 256 px: the histogram's own working size, so no resampling blends the colours
    Image.new("RGB", (256, 256), (255, 0, 0)).save(tmp_path / "red.png")
    half = Image.new("RGB", (256, 256), (0, 0, 255))
    half.paste((0, 255, 0), (0, 0, 256, 128))
    half.save(tmp_path / "half.png")
    h = colour_histograms([ImageSpec(str(tmp_path / "red.png")), ImageSpec(str(tmp_path / "half.png"))])
    red_bin = (7 * 8 + 0) * 8 + 0  # (r, g, b) bins (7, 0, 0)
    assert h[0, red_bin] == pytest.approx(1.0) and h[0].sum() == pytest.approx(1.0)
    green_bin, blue_bin = (0 * 8 + 7) * 8 + 0, 7
    # each half: sqrt(0.5) / norm -> 1/sqrt(2)
    assert h[1, green_bin] == pytest.approx(2**-0.5) and h[1, blue_bin] == pytest.approx(2**-0.5)


def _toy_dataset():
    images = [ImageSpec(f"db{i}.jpg") for i in range(4)]
    queries = [ImageSpec("q0.jpg"), ImageSpec("q1.jpg")]
    gnd = {"map": [{"ok": [1], "junk": [0]}, {"ok": [2, 3], "junk": []}]}
    return RetrievalDataset("toy", images, queries, gnd)


def test_score_hand_computed():
    ds = _toy_dataset()
    db = np.eye(4, dtype=np.float32)
    # q0 ranks db 0 (junk), 2, 1 -> after junk removal the positive is 2nd: AP = (1/1... ) see below
    q = np.array([[0.9, 0.5, 0.6, 0.0], [0.0, 0.1, 0.8, 0.7]], dtype=np.float32)
    s = score(ds, db, q)["map"]
    # q0: ranking [0, 2, 1, 3]; without junk [2, 1, 3]; positive at position 1:
    #     AP = (P_before + P_at)/2 = (0/1 + 1/2)/2 = 0.25
    # q1: ranking [2, 3, 1, 0]; positives at 0 and 1: AP = 1
    assert s["aps"] == pytest.approx([0.25, 1.0])
    assert s["map"] == pytest.approx(0.625)
    assert s["mp@k"][1] == pytest.approx(0.5)  # q0 P@1 = 0, q1 P@1 = 1


def test_evaluate_saves_table_configs_and_per_query_aps(tmp_path, photo_dir, lite0):
    groups = tmp_path / "groups"
    for g, names in {"moto": ["motorcycle_left", "motorcycle_right"], "cat": ["chelsea"],
                     "misc": ["coffee", "rocket"]}.items():
        (groups / g).mkdir(parents=True)
        for n in names:
            (groups / g / f"{n}.png").write_bytes((photo_dir / f"{n}.png").read_bytes())
    ds = load_folder_groups(groups)
    methods = {"mac": ModelConfig(head="mac", image_sizes=[96]), "colour": COLOUR_HISTOGRAM}
    res = evaluate(methods, {"g": ds}, tmp_path / "out", progress=False)
    assert [r.method for r in res] == ["mac", "colour"]
    rows = list(csv.DictReader(open(tmp_path / "out" / "results.csv")))
    assert [(r["method"], r["dataset"], r["protocol"]) for r in rows] == [("mac", "g", "map"), ("colour", "g", "map")]
    blob = json.loads((tmp_path / "out" / "results.json").read_text())
    assert blob[0]["config"]["head"] == "mac" and blob[0]["config_digest"] == methods["mac"].digest()
    aps = blob[0]["scores"]["map"]["aps"]
    assert len(aps) == 5 and float(rows[0]["map"]) == pytest.approx(100 * np.nanmean(aps), abs=0.01)
    # chelsea is alone in its group: NaN AP, left out of the mean
    assert np.isnan(aps[[i.path.endswith("chelsea.png") for i in ds.queries].index(True)])
    table = format_table(res)
    assert "g/map" in table and table.splitlines()[1].startswith("mac")


def test_five_heads_on_one_backbone_run_the_cnn_once_and_equal_the_per_method_path(tmp_path, photo_dir):
    import torch

    from remap_lib.nets.backbones import build_backbone
    from remap_lib.evaluation.evaluate import describe
    from remap_lib.describe.model import RetrievalModel

    torch.manual_seed(0)
    backbone = build_backbone("efficientnet_lite0", weights="random")
    calls = [0]
    backbone.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    photos = [ImageSpec(str(p)) for p in sorted(photo_dir.glob("*.png"))]
    queries = [ImageSpec(photos[1].path, box=(10, 5, 110, 80)), photos[4]]  # a crop of chelsea, a motorcycle
    ds = RetrievalDataset("photos", photos, queries, {"map": [{"ok": [1], "junk": []}, {"ok": [3], "junk": [4]}]})
    methods = {h: RetrievalModel(ModelConfig(head=h, weights="random", levels=3, image_sizes=[96]), backbone)
               for h in ("mac", "spoc", "gem", "rmac", "remap")}
    methods["colour"] = COLOUR_HISTOGRAM
    cache = tmp_path / "cache"
    res = evaluate(methods, {"photos": ds}, cache_dir=cache, progress=False, engine="torch")
    one_pass = calls[0]
    # database: a 96×96 batch and a 96×64 batch; queries: the crop (96×70) and the motorcycle (96×64)
    assert one_pass == 4
    calls[0] = 0
    for r in res:
        method = methods[r.method]
        db, q = describe(method, ds, None, "cpu", progress=False, engine="torch")
        np.testing.assert_allclose(r.descriptors[0], db, atol=1e-6)
        np.testing.assert_allclose(r.descriptors[1], q, atol=1e-6)
        assert r.scores["map"]["map"] == pytest.approx(score(ds, db, q)["map"]["map"], abs=1e-6)
    assert calls[0] == 5 * one_pass  # what evaluate paid before: one pass per head
    # the shared pass wrote each head's extraction folder: describe() and evaluate() read it back, no CNN
    calls[0] = 0
    db, q = describe(methods["remap"], ds, cache, "cpu", progress=False, engine="torch")
    np.testing.assert_array_equal(db, res[4].descriptors[0])
    again = evaluate(methods, {"photos": ds}, cache_dir=cache, progress=False, engine="torch")
    assert calls[0] == 0
    assert [r.scores for r in again] == [r.scores for r in res]


def test_plot_marks_correct_results(tmp_path, photo_dir):
    ds = _toy_dataset()
    ds = RetrievalDataset("toy", [ImageSpec(str(p)) for p in sorted(photo_dir.glob("*.png"))[:4]],
                          [ImageSpec(str(photo_dir / "chelsea.png"))] * 2, ds.gnd)
    assert [result_status(ds, "map", 0, i) for i in range(4)] == ["junk", "ok", "wrong", "wrong"]
    db = np.eye(4, dtype=np.float32)
    q = np.array([[0.9, 0.5, 0.6, 0.0], [0.0, 0.1, 0.8, 0.7]], dtype=np.float32)
    fig = plot_query_results(ds, {"m": (db, q)}, [0, 1], top_k=3, path=tmp_path / "fig.png")
    assert (tmp_path / "fig.png").stat().st_size > 1000
    frame = [ax.spines["top"].get_edgecolor() for ax in fig.axes[1:4]]  # q0: 0 (junk), 2 (wrong), 1 (ok)
    assert [tuple(round(c, 2) for c in f[:3]) for f in frame] == [(0.6, 0.6, 0.6), (0.84, 0.1, 0.11),
                                                                 (0.1, 0.59, 0.25)]


def test_cli_evaluate(tmp_path, photo_dir, capsys):
    csv_path = tmp_path / "groups.csv"
    csv_path.write_text("image,group\n" + "".join(
        f"{photo_dir / n}.png,{g}\n" for n, g in [("motorcycle_left", "m"), ("motorcycle_right", "m"),
                                                  ("coffee", "c"), ("rocket", "r")]))
    out = tmp_path / "out"
    code = main(["evaluate", "-d", f"mine={csv_path}", "-m", "gem", "colour", "--image-size", "64", "-o", str(out),
                 "-q"])
    assert code == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {r["method"] for r in rows} == {"gem", "colour histogram"} and rows[0]["dataset"] == "mine"
    assert "mine/map" in capsys.readouterr().out
    assert main(["evaluate", "-d", str(csv_path), "-m", "vlad"]) == 2


def test_download_offline_fails_fast_with_instructions(tmp_path, monkeypatch, capsys):
    import socket
    import time

    def no_network(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(socket, "create_connection", no_network)
    t = time.perf_counter()
    assert main(["download", "rparis6k", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert time.perf_counter() - t < 5
    assert "paris_1-v1.tgz" in err and str(tmp_path / "rparis6k" / "archives") in err


def test_download_resumes_a_partial_file(tmp_path, monkeypatch):
    """A local HTTP server with Range support: a half-written .part is completed, not restarted."""
    import http.server
    import threading

    from remap_lib.data.download import download_file

    payload = bytes(range(256)) * 400
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            rng = self.headers.get("Range")
            seen.append(rng)
            start = int(rng.split("=")[1].rstrip("-")) if rng else 0
            self.send_response(206 if rng else 200)
            self.send_header("Content-Length", str(len(payload) - start))
            self.end_headers()
            self.wfile.write(payload[start:])

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        dest = tmp_path / "file.bin"
        (tmp_path / "file.bin.part").write_bytes(payload[:30000])
        download_file(f"http://127.0.0.1:{server.server_port}/file.bin", dest)
    finally:
        server.shutdown()
    assert seen == ["bytes=30000-"] and dest.read_bytes() == payload


def test_figure_png_is_a_png_of_the_figure_and_closes_it():
    import io

    import matplotlib.pyplot as plt
    from PIL import Image

    from remap_lib.app.plots import figure_png

    fig, ax = plt.subplots(figsize=(4, 3))
    ax.imshow(np.zeros((30, 40)))
    data = figure_png(fig, dpi=50)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(data)) as img:
        assert img.width <= 200 and img.height <= 150 and img.width > img.height  # bbox-tight 4x3 in at 50 dpi
    assert not plt.fignum_exists(fig.number)


def test_region_grid_has_one_panel_per_scale_with_translucent_regions_and_one_outlined(photo_dir):
    from remap_lib.layers.functional import rmac_regions

    fig = plot_region_grid(ImageSpec(str(photo_dir / "coffee.png")), 4, map_size=(24, 32))
    _, scale_of = rmac_regions(24, 32, 4, return_levels=True)
    counts = [int((scale_of == s).sum()) for s in range(1, 5)]
    assert counts == [2, 6, 12, 20] and len(fig.axes) == 4
    for scale, (ax, n) in enumerate(zip(fig.axes, counts), start=1):
        fills = [p for p in ax.patches if p.get_fill()]
        outlines = [p for p in ax.patches if not p.get_fill()]
        assert len(fills) == n and all(p.get_alpha() == pytest.approx(0.2) for p in fills)
        assert len(outlines) == 2  # the highlighted region: a dark halo under a coloured line
        assert ax.get_title().startswith(f"scale {scale} of 4: {n} regions")
    # the region outlined at scale 4 is 9 of the map's 32 columns wide (side floor(2 * 24 / 5))
    assert outlines[0].get_width() == pytest.approx(9 / 32 * Image.open(photo_dir / "coffee.png").width)
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_activation_summaries_and_why_max_is_not_the_default(photo_dir, lite0):
    import torch

    from remap_lib.data.images import resize_longer_side, to_tensor
    from remap_lib.describe.model import RetrievalModel

    model = RetrievalModel(ModelConfig(head="remap", layers=[1, 2]), lite0)
    img = Image.open(photo_dir / "astronaut.png")
    with torch.no_grad():
        maps = model.feature_maps(to_tensor(resize_longer_side(img, 256))[None])
    got = {s: activation_maps(model, img, 256, s) for s in ("max", "mean", "l2")}
    for layer, m in maps.items():
        np.testing.assert_allclose(got["l2"][layer], m[0].norm(dim=0).numpy(), rtol=1e-5)
        np.testing.assert_allclose(got["mean"][layer], m[0].mean(0).numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got["max"][layer], m[0].amax(0).numpy())
    top, norm = got["max"]["head"], got["l2"]["head"]
    assert top.shape == (8, 8) and (top >= 6).mean() > 0.8  # layer 1 ends in ReLU6: the max is capped almost everywhere
    assert norm.std() / norm.mean() > 5 * top.std() / top.mean()  # the L2 norm still varies across the image
    with pytest.raises(ValueError, match="summary"):
        activation_maps(model, img, 256, "median")


def test_a_fine_tuned_twin_never_reads_the_imagenet_models_cache(tmp_path, photo_dir):
    """Same config, other weights (a fine-tuned checkpoint): another cache key, a fresh pass, other numbers."""
    import copy

    import torch

    from remap_lib.nets.backbones import build_backbone
    from remap_lib.evaluation.evaluate import _cache_folder
    from remap_lib.describe.model import RetrievalModel

    torch.manual_seed(0)
    photos = [ImageSpec(str(p)) for p in sorted(photo_dir.glob("*.png"))]
    ds = RetrievalDataset("photos", photos, [photos[1], photos[4]],
                          {"map": [{"ok": [1], "junk": []}, {"ok": [4], "junk": []}]})
    base = RetrievalModel(ModelConfig(head="rmac", weights="random", levels=2, image_sizes=[64]),
                          build_backbone("efficientnet_lite0", weights="random"))
    twin = copy.deepcopy(base)
    with torch.no_grad():
        next(twin.backbone.parameters()).mul_(1.5)
    assert twin.config.digest() == base.config.digest()
    assert _cache_folder(tmp_path, ds, twin, "f32", "db") != _cache_folder(tmp_path, ds, base, "f32", "db")
    cache = tmp_path / "cache"
    first = evaluate({"rmac": base}, {"photos": ds}, cache_dir=cache, progress=False, engine="torch")
    calls = [0]
    twin.backbone.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    second = evaluate({"rmac": twin}, {"photos": ds}, cache_dir=cache, progress=False, engine="torch")
    assert calls[0] > 0  # described again, not read from the ImageNet model's cache
    assert np.abs(second[0].descriptors[0] - first[0].descriptors[0]).max() > 1e-4
