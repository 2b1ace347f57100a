"""Extraction: batching, bad images, resume, the CLI (remap_lib.extract, remap_lib.cli)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from remap_lib.cli import main
from remap_lib.config import PAPER_MULTISCALE, ModelConfig
from remap_lib.extract import extract_descriptors, learn_whitening, load_descriptors
from remap_lib.images import ImageLoadError, load_image, resize_longer_side, to_tensor
from remap_lib.model import RetrievalModel


@pytest.fixture()
def rmac_model(lite0):
    return RetrievalModel(ModelConfig(head="rmac", levels=2, image_sizes=[96]), backbone=lite0)


def test_descriptors_equal_the_model_on_each_image(photo_dir, rmac_model):
    res = extract_descriptors(rmac_model, photo_dir, batch_size=4, num_workers=0, progress=False)
    assert len(res.paths) == 6 and res.descriptors.shape == (6, 1280) and res.descriptors.dtype == np.float32
    assert np.allclose(np.linalg.norm(res.descriptors, axis=1), 1, atol=1e-5)
    for path, row in zip(res.paths, res.descriptors):
        x = to_tensor(resize_longer_side(load_image(path), 96))[None]
        with torch.no_grad():
            assert np.allclose(rmac_model(x)[0].numpy(), row, atol=1e-5)


def test_multiscale_extraction_follows_eq_3(photo_dir, lite0):
    cfg = ModelConfig(head="mac", image_sizes=[64, 96], scale_weights=[2.0, 1.4])
    model = RetrievalModel(cfg, backbone=lite0)
    path = str(photo_dir / "chelsea.png")
    row = extract_descriptors(model, [path], num_workers=0, progress=False).descriptors[0]
    img = load_image(path)
    with torch.no_grad():
        a, b = (model(to_tensor(resize_longer_side(img, s))[None])[0] for s in (64, 96))
    expected = (2.0 * a + 1.4 * b) / (2.0 * a + 1.4 * b).norm()
    assert np.allclose(row, expected.numpy(), atol=1e-5)
    assert PAPER_MULTISCALE == {"image_sizes": (1024, 1280), "scale_weights": (2.0, 1.4)}


def test_bad_images_are_skipped_and_listed_or_raise(tmp_path, photo_dir, rmac_model):
    (tmp_path / "corrupt.jpg").write_bytes(b"nope")
    good = sorted(str(p) for p in photo_dir.glob("*.png"))[:2]
    images = [good[0], str(tmp_path / "corrupt.jpg"), str(tmp_path / "missing.jpg"), good[1]]
    out = tmp_path / "out"
    res = extract_descriptors(rmac_model, images, out, num_workers=0, progress=False)
    assert res.paths == good and [p for p, _ in res.failed] == images[1:3]
    failed = [json.loads(line) for line in (out / "failed.jsonl").read_text().splitlines()]
    assert [f["path"] for f in failed] == images[1:3]
    assert failed[0]["reason"].startswith("not an image") and failed[1]["reason"] == "file not found"
    assert [json.loads(line) for line in (out / "paths.jsonl").read_text().splitlines()] == good

    out2 = tmp_path / "out2"
    with pytest.raises(ImageLoadError, match="corrupt.jpg"):
        extract_descriptors(rmac_model, images, out2, num_workers=0, progress=False, on_error="raise",
                            save_every=1)
    parts = list((out2 / "parts").glob("part-*.npz"))
    assert len(parts) == 1  # the image before the bad one is kept on disk


class _Interrupt(Exception):
    pass


def test_interrupted_run_resumes_without_redoing_finished_images(tmp_path, photo_dir, rmac_model):
    full = extract_descriptors(rmac_model, photo_dir, num_workers=0, progress=False, batch_size=1)
    out = tmp_path / "out"
    calls = {"n": 0}
    original = rmac_model.multiscale

    def flaky(batches):
        calls["n"] += 1
        if calls["n"] == 4:
            raise _Interrupt()
        return original(batches)

    rmac_model.multiscale = flaky
    try:
        with pytest.raises(_Interrupt):
            extract_descriptors(rmac_model, photo_dir, out, num_workers=0, progress=False, batch_size=1,
                                save_every=2, engine="torch")
        assert not (out / "descriptors.npy").exists()
        calls["n"] = -100  # no more interruptions; count the images recomputed
        res = extract_descriptors(rmac_model, photo_dir, out, num_workers=0, progress=False, batch_size=1,
                                  engine="torch")
    finally:
        del rmac_model.multiscale
    assert calls["n"] == -100 + 3  # 3 of 6 were done (the 3rd flushed when interrupted)
    assert res.paths == full.paths
    assert np.allclose(res.descriptors, full.descriptors, atol=1e-6)
    again = load_descriptors(out)
    assert again.paths == full.paths and np.array_equal(again.descriptors, res.descriptors)


def test_a_folder_of_another_model_is_refused(tmp_path, photo_dir, rmac_model, lite0):
    out = tmp_path / "out"
    extract_descriptors(rmac_model, [str(photo_dir / "chelsea.png")], out, num_workers=0, progress=False)
    other = RetrievalModel(ModelConfig(head="mac", image_sizes=[96]), backbone=lite0)
    with pytest.raises(RuntimeError, match="different model"):
        extract_descriptors(other, [str(photo_dir / "chelsea.png")], out, num_workers=0, progress=False)


def test_worker_processes_give_the_same_result(photo_dir, rmac_model):
    a = extract_descriptors(rmac_model, photo_dir, num_workers=0, progress=False)
    b = extract_descriptors(rmac_model, photo_dir, num_workers=2, progress=False)
    assert a.paths == b.paths and np.allclose(a.descriptors, b.descriptors, atol=1e-6)


def test_learn_whitening_installs_an_fc_layer(photo_dir, lite0):
    model = RetrievalModel(ModelConfig(head="mac", image_sizes=[64]), backbone=lite0)
    w = learn_whitening(model, photo_dir, dim=4, num_workers=0, progress=False)
    assert w.output_dim == 4 and model.output_dim == 4
    res = extract_descriptors(model, photo_dir, num_workers=0, progress=False)
    assert res.descriptors.shape == (6, 4)


def test_cli_extract_whiten_extract(tmp_path, photo_dir, capsys):
    out = tmp_path / "desc"
    args = ["extract", str(photo_dir), "-o", str(out), "--head", "gem", "--image-size", "64", "-q",
            "--workers", "0"]
    assert main(args) == 0
    assert np.load(out / "descriptors.npy").shape == (6, 1280)
    assert json.loads((out / "extraction.json").read_text())["model"]["head"] == "gem"
    assert main(["whiten", str(out), "-o", str(tmp_path / "w.npz"), "--dim", "5"]) == 0
    out2 = tmp_path / "white"
    assert main(args[:3] + [str(out2)] + args[4:] + ["--whitening", str(tmp_path / "w.npz")]) == 0
    assert np.load(out2 / "descriptors.npy").shape == (6, 5)
    # the whitened CLI output equals whitening applied to the plain descriptors
    from remap_lib.whitening import PCAWhitening

    w = PCAWhitening.load(tmp_path / "w.npz")
    assert np.allclose(np.load(out2 / "descriptors.npy"), w.apply(np.load(out / "descriptors.npy")), atol=1e-4)
    shutil.rmtree(out)
    assert main(["whiten", str(out), "-o", str(tmp_path / "x.npz")]) == 2
    assert "not a folder written by `remap extract`" in capsys.readouterr().err


def test_small_images_are_not_enlarged_unless_asked():
    from remap_lib.extract import scaled_sizes

    assert scaled_sizes(2000, [1024], False) == [1024]
    assert scaled_sizes(800, [1024], False) == [800]  # a cropped query keeps its scale
    assert scaled_sizes(800, [1024], True) == [1024]
    assert scaled_sizes(2000, [1024, 1280], False) == [1024, 1280]
    assert scaled_sizes(800, [1024, 1280], False) == [800, 1000]  # Eq. 3's ratio kept


def test_query_crop_is_described_at_its_own_scale(tmp_path, photo_dir, lite0):
    from remap_lib.images import ImageSpec

    model = RetrievalModel(ModelConfig(head="mac", image_sizes=[128]), backbone=lite0)
    spec = ImageSpec(str(photo_dir / "chelsea.png"), box=(10, 10, 74, 58))
    row = extract_descriptors(model, [spec], num_workers=0, progress=False).descriptors[0]
    crop = load_image(spec.path).crop((10, 10, 74, 58))  # 64x48: kept, not enlarged to 128
    with torch.no_grad():
        assert np.allclose(model(to_tensor(crop)[None])[0].numpy(), row, atol=1e-5)
