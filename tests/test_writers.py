"""Writers that are interrupted or run twice, and the model behind a result (issue 17, items 5-10).

The subprocess tests run the real ``remap`` command (``python -m remap_lib.app.cli``)
with the torch engine at 64 px so that they stay a few seconds each.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from remap_lib.app.cli import main
from remap_lib.config import ModelConfig
from remap_lib.describe.extract import (ExtractionLockedError, _output_lock, extract_descriptors, load_descriptors)
from remap_lib.describe.model import RetrievalModel

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "remap_lib.app.cli"]
FAST = ["--head", "mac", "--image-size", "64", "--engine", "torch", "-q", "--workers", "0"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return env


@pytest.fixture()
def mac_model(lite0):
    return RetrievalModel(ModelConfig(head="mac", image_sizes=[64]), backbone=lite0)


def _extract(model, images, out, **kw):
    kw = {"num_workers": 0, "progress": False, "engine": "torch", **kw}
    return extract_descriptors(model, images, out, **kw)


# ---------------------------------------------------------------------- item 5: the model behind a result
def test_extraction_records_the_weights_fingerprint_and_refuses_other_weights(tmp_path, photo_dir, mac_model, lite0):
    out = tmp_path / "out"
    _extract(mac_model, photo_dir, out)
    settings = json.loads((out / "extraction.json").read_text())
    assert settings["weights_fingerprint"] == mac_model.fingerprint()
    twin = RetrievalModel(ModelConfig(head="mac", image_sizes=[64]), backbone=lite0)
    import copy

    twin = copy.deepcopy(twin)
    with torch.no_grad():
        next(twin.backbone.parameters()).mul_(1.01)  # a "fine-tuned" twin: same config, other weights
    assert twin.config.digest() == mac_model.config.digest() and twin.fingerprint() != mac_model.fingerprint()
    with pytest.raises(RuntimeError, match="different model.*weights_fingerprint"):
        _extract(twin, photo_dir, out)


def test_fingerprint_follows_in_place_changes(mac_model):
    import copy

    model = copy.deepcopy(mac_model)
    before = model.fingerprint()
    assert model.fingerprint() == before  # cached, stable
    with torch.no_grad():
        model.backbone.stages[next(iter(model.backbone.stages))].apply(
            lambda m: m.weight.add_(1e-3) if isinstance(m, torch.nn.Conv2d) else None)
    assert model.fingerprint() != before


def _klw_file(path, model, seed=0):
    from remap_lib.training.klw import KLWeights

    rng = np.random.default_rng(seed)
    weights = {layer: rng.uniform(0.1, 2.0, len(alpha)).astype(np.float32)
               for layer, alpha in model.region_weights().items()}
    KLWeights(weights, model.config.to_dict(), {"note": "test"}).save(path)


def _rankings(text: str) -> list[tuple[str, str]]:
    """``(score, path)`` of every result line of ``remap index search``."""
    return [tuple(line.split()[1:3]) for line in text.splitlines() if line.startswith("  ")]


def test_index_search_by_image_rebuilds_the_whole_model(tmp_path, photo_dir, capsys):
    model_args = ["--head", "remap", "--levels", "2", "--image-size", "64", "--engine", "torch", "-q",
                  "--workers", "0"]
    klw = tmp_path / "k.json"
    _klw_file(klw, RetrievalModel(ModelConfig(head="remap", levels=2, image_sizes=[64], weights="random")))
    plain = tmp_path / "plain"
    assert main(["extract", str(photo_dir), "-o", str(plain), "--klw", str(klw)] + model_args) == 0
    assert main(["whiten", str(plain), "-o", str(tmp_path / "w.npz"), "--dim", "5"]) == 0
    desc = tmp_path / "desc"
    built = ["--klw", str(klw), "--whitening", str(tmp_path / "w.npz")]
    assert main(["extract", str(photo_dir), "-o", str(desc)] + built + model_args) == 0
    index = str(tmp_path / "i.remap")
    assert main(["index", "build", str(desc), "-o", index]) == 0
    capsys.readouterr()

    query = str(photo_dir / "coffee.png")
    qdesc = tmp_path / "q"
    assert main(["extract", query, "-o", str(qdesc)] + built + model_args) == 0
    capsys.readouterr()
    assert main(["index", "search", index, "--descriptors", str(qdesc), "-k", "6"]) == 0
    expected = _rankings(capsys.readouterr().out)
    # by image, with no model option: the index's recorded files are used and verified
    assert main(["index", "search", index, query, "-k", "6", "--engine", "torch"]) == 0
    got = _rankings(capsys.readouterr().out)
    assert got == expected and len(got) == 6
    assert got[0][1].endswith("coffee.png") and float(got[0][0]) == pytest.approx(1.0, abs=1e-5)

    # another checkpoint (same config, other weights) is refused
    m = RetrievalModel(ModelConfig(head="remap", levels=2, image_sizes=[64]))
    from remap_lib.training.klw import KLWeights
    from remap_lib.layers.whitening import PCAWhitening

    KLWeights.load(klw).apply(m)
    m.set_whitening(PCAWhitening.load(tmp_path / "w.npz"))
    with torch.no_grad():
        next(m.backbone.parameters()).mul_(0.99)
    m.save(tmp_path / "other.pt")
    assert main(["index", "search", index, query, "--checkpoint", str(tmp_path / "other.pt"),
                 "--engine", "torch"]) == 2
    err = capsys.readouterr().err
    assert "other weights" in err and "--klw" in err
    # another KLW file: refused too
    _klw_file(tmp_path / "k2.json", m, seed=1)
    assert main(["index", "search", index, query, "--klw", str(tmp_path / "k2.json"), "--engine", "torch"]) == 2
    assert "other weights" in capsys.readouterr().err
    # the recorded files are gone: a message, not a traceback or another model
    os.remove(klw)
    assert main(["index", "search", index, query, "--engine", "torch"]) == 2
    assert "no longer exist" in capsys.readouterr().err


# ---------------------------------------------------------------------- items 6-9: writers
def test_a_second_writer_is_refused_naming_the_holder(tmp_path, photo_dir, mac_model):
    out = tmp_path / "out"
    with _output_lock(out):
        with pytest.raises(ExtractionLockedError, match=f"process {os.getpid()}"):
            _extract(mac_model, photo_dir, out)
        assert not (out / "extraction.json").exists()  # nothing written by the refused run
    _extract(mac_model, photo_dir, out)  # released: works


def test_a_kill_between_the_final_files_is_detected_and_repaired(tmp_path, photo_dir, mac_model, monkeypatch):
    import remap_lib.describe.extract as E

    out = tmp_path / "out"
    full = _extract(mac_model, photo_dir, out)
    real = E._atomic_write

    def dies_before_the_manifest(path, data):
        if Path(path).name == "manifest.json":
            raise KeyboardInterrupt  # killed after descriptors.npy and paths.jsonl, before the manifest
        return real(path, data)

    monkeypatch.setattr(E, "_atomic_write", dies_before_the_manifest)
    with pytest.raises(KeyboardInterrupt):
        _extract(mac_model, sorted(map(str, photo_dir.glob("*.png")))[:3], out)
    with pytest.raises(FileNotFoundError, match="no complete result"):
        load_descriptors(out)
    monkeypatch.setattr(E, "_atomic_write", real)
    again = _extract(mac_model, photo_dir, out)
    assert again.paths == full.paths and np.array_equal(load_descriptors(out).descriptors, full.descriptors)
    # a pair that disagrees with its manifest is refused
    (out / "paths.jsonl").write_text((out / "paths.jsonl").read_text().replace("coffee", "coffeX"))
    with pytest.raises(ValueError, match="do not match manifest.json"):
        load_descriptors(out)


@contextlib.contextmanager
def _counting_described(model):
    """Counts the images ``model`` describes while the block runs (``calls["n"]``)."""
    calls = {"n": 0}
    original = model.multiscale

    def counting(x):
        calls["n"] += len(x[0])
        return original(x)

    model.multiscale = counting
    try:
        yield calls
    finally:
        del model.multiscale


def test_parts_are_named_by_range_and_a_deleted_part_is_recomputed_alone(tmp_path, photo_dir, mac_model):
    out = tmp_path / "out"
    full = _extract(mac_model, photo_dir, out, save_every=2)
    parts = sorted(p.name for p in (out / "parts").glob("part-*.npz"))
    assert parts == ["part-000000000-000000001.npz", "part-000000002-000000003.npz",
                     "part-000000004-000000005.npz"]
    (out / "parts" / parts[1]).unlink()
    with _counting_described(mac_model) as calls:
        res = _extract(mac_model, photo_dir, out, save_every=2, batch_size=1)
        assert calls["n"] == 2  # exactly the two images of the deleted part
        assert sorted(p.name for p in (out / "parts").glob("part-*.npz")) == parts
        res2 = _extract(mac_model, photo_dir, out, save_every=2, batch_size=1)
        assert calls["n"] == 2  # converged: nothing left to do
    assert res.paths == res2.paths == full.paths
    assert np.allclose(res.descriptors, full.descriptors, atol=1e-6)


def test_any_file_name_survives(tmp_path, photo_dir, mac_model):
    folder = tmp_path / "odd"
    folder.mkdir()
    names = ["new\nline.png", "tab\there.png", "plain.png", "ünï cödé.png"]
    for name in names:
        shutil.copy(photo_dir / "chelsea.png", folder / name)
    (folder / "bad\nname.png").write_bytes(b"corrupt")
    out = tmp_path / "out"
    res = _extract(mac_model, folder, out)
    loaded = load_descriptors(out)
    assert loaded.paths == res.paths == sorted(str(folder / n) for n in names)
    assert loaded.failed == [(str(folder / "bad\nname.png"), loaded.failed[0][1])]


def test_a_retry_that_succeeds_clears_the_failure_list(tmp_path, photo_dir, mac_model):
    folder = tmp_path / "imgs"
    shutil.copytree(photo_dir, folder)
    (folder / "zz.png").write_bytes(b"not yet an image")
    out = tmp_path / "out"
    assert len(_extract(mac_model, folder, out).failed) == 1 and (out / "failed.jsonl").exists()
    shutil.copy(photo_dir / "coffee.png", folder / "zz.png")  # the user repairs the file
    res = _extract(mac_model, folder, out)
    assert res.failed == [] and not (out / "failed.jsonl").exists()
    assert len(res.paths) == 7 and load_descriptors(out).failed == []


def test_broken_symlinks_are_listed_as_failed(tmp_path, photo_dir, mac_model):
    folder = tmp_path / "imgs"
    shutil.copytree(photo_dir, folder)
    os.symlink(tmp_path / "gone.png", folder / "link.png")
    res = _extract(mac_model, folder, tmp_path / "out")
    assert len(res.paths) == 6
    assert res.failed == [(str(folder / "link.png"), f"broken symbolic link (to {tmp_path / 'gone.png'})")]


# ---------------------------------------------------------------------- kill test and concurrent runs
def _extract_cmd(folder, out):
    return CLI + ["extract", str(folder), "-o", str(out), "--save-every", "7", "--batch-size", "4"] + FAST


@pytest.mark.slow
def test_killed_extraction_reruns_to_the_uninterrupted_result(tmp_path, write_collection):
    folder = write_collection(tmp_path / "photos", 200)
    ref = tmp_path / "ref"
    t = time.perf_counter()
    subprocess.run(_extract_cmd(folder, ref), check=True, env=_env(), capture_output=True)
    duration = time.perf_counter() - t
    expected = load_descriptors(ref)
    assert len(expected.paths) == 200 and expected.failed == []

    out = tmp_path / "out"
    rng = np.random.default_rng(17)
    for moment in rng.uniform(0.2, 1.0, 10) * duration:
        proc = subprocess.Popen(_extract_cmd(folder, out), env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(moment)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = subprocess.run(_extract_cmd(folder, out), env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    got = load_descriptors(out)
    assert got.paths == expected.paths
    assert np.array_equal(got.descriptors, expected.descriptors)


@pytest.mark.slow
def test_two_concurrent_runs_the_second_is_refused(tmp_path, write_collection, lite0):
    folder = write_collection(tmp_path / "photos", 120)
    out = tmp_path / "out"
    slow = ["--image-size", "320", "--upscale"]  # a first run long enough for the second to meet it
    first = subprocess.Popen(_extract_cmd(folder, out) + slow, env=_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (out / ".lock-holder.json").exists():
        assert time.time() < deadline and first.poll() is None, "the first run never took the lock"
        time.sleep(0.05)
    second = subprocess.run(_extract_cmd(folder, out) + slow, env=_env(), capture_output=True, text=True)
    assert first.poll() is None, "the first run ended before the second started: make it longer"
    assert second.returncode == 2
    assert second.stderr.startswith("error: ") and f"process {first.pid}" in second.stderr
    assert "Traceback" not in second.stderr and second.stderr.count("\n") == 1
    assert first.wait(300) == 0
    got = load_descriptors(out)  # complete and consistent with its manifest
    assert got.paths == sorted(str(p) for p in folder.glob("*.png")) and got.failed == []
    model = RetrievalModel(ModelConfig(head="mac", image_sizes=[320], upscale=True), backbone=lite0)
    ref = _extract(model, got.paths[:5], None)
    assert np.allclose(got.descriptors[:5], ref.descriptors, atol=1e-6)


# ---------------------------------------------------------------------- issue 25: names and final writes
def _non_utf8_folder(tmp_path: Path, photo_dir: Path) -> tuple[Path, list[str], str]:
    """A folder with names that are not valid UTF-8 or that hold line breaks JSON leaves as they are."""
    folder = tmp_path / "odd"
    folder.mkdir()
    good = [b"caf\xe9.png", b"\xff\xfe.png", "line\u2028sep.png".encode(), "nel\x85.png".encode(), b"plain.png"]
    try:
        for name in good:
            shutil.copy(photo_dir / "chelsea.png", os.path.join(os.fsencode(folder), name))
        bad = os.path.join(os.fsencode(folder), b"bad\xe9.png")
        Path(os.fsdecode(bad)).write_bytes(b"corrupt")
    except OSError as exc:
        pytest.skip(f"this file system refuses non-UTF-8 names ({exc})")
    return folder, sorted(os.fsdecode(os.path.join(os.fsencode(folder), n)) for n in good), os.fsdecode(bad)


def test_a_folder_with_a_non_utf8_name_finishes_and_reruns_to_the_same_result(tmp_path, photo_dir, mac_model):
    """Item 7: a name whose bytes are not UTF-8 failed every extraction of its folder at the very end."""
    folder, names, bad = _non_utf8_folder(tmp_path, photo_dir)
    out = tmp_path / "out"
    res = _extract(mac_model, folder, out, save_every=2)
    assert res.paths == names and [p for p, _ in res.failed] == [bad]
    loaded = load_descriptors(out)
    assert loaded.paths == names and loaded.failed == res.failed
    assert np.array_equal(loaded.descriptors, res.descriptors)
    assert all(os.path.isfile(p) for p in loaded.paths)  # each name still opens its file
    assert "\\udce9" in (out / "paths.jsonl").read_text(encoding="utf-8")  # valid UTF-8 on disk

    with _counting_described(mac_model) as calls:
        again = _extract(mac_model, folder, out, save_every=2)
    assert calls["n"] == 0  # every image found in the parts
    assert again.paths == names and again.failed == res.failed
    assert np.array_equal(load_descriptors(out).descriptors, res.descriptors)


def test_an_index_of_non_utf8_names_is_built_and_keeps_them(tmp_path, photo_dir, mac_model):
    from remap_lib.search.index import RetrievalIndex

    folder, names, _ = _non_utf8_folder(tmp_path, photo_dir)
    _extract(mac_model, folder, tmp_path / "out")
    assert main(["index", "build", str(tmp_path / "out"), "-o", str(tmp_path / "i.remap")]) == 0
    assert list(RetrievalIndex.load(tmp_path / "i.remap").paths) == names


def test_temporary_names_stay_within_the_file_name_limit(tmp_path, photo_dir, mac_model):
    """Item 8b: a temporary name is the final name plus a few bytes; past 255 bytes it is a short hash."""
    from remap_lib.describe.extract import _atomic_write, _temp_path

    assert _temp_path(tmp_path / "manifest.json") == tmp_path / ".manifest.json.tmp"
    long_name = "n" * 254
    tmp = _temp_path(tmp_path / long_name)
    assert tmp.parent == tmp_path and len(tmp.name) == 21 and tmp.name.startswith(".") and tmp.name.endswith(".tmp")
    assert _temp_path(tmp_path / long_name) == tmp != _temp_path(tmp_path / ("m" * 254))  # stable, distinct
    _atomic_write(tmp_path / long_name, b"finished")
    assert (tmp_path / long_name).read_bytes() == b"finished"
    assert sorted(p.name for p in tmp_path.iterdir()) == [long_name]

    out = tmp_path / ("d" * 255)  # the longest folder name: the files inside keep their short names
    full = _extract(mac_model, photo_dir, out)
    assert load_descriptors(out).paths == full.paths and len(full.paths) == 6


def test_a_failed_write_names_its_file_and_leaves_no_temporary(tmp_path, photo_dir, mac_model, monkeypatch):
    """A write that fails midway (disk full) said only "[Errno 28] No space left on device"."""
    import errno
    import re

    out = tmp_path / "out"
    real_savez = np.savez

    def disk_full(file, **arrays):
        Path(file).write_bytes(b"PK half a zip")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)
    with pytest.raises(OSError, match=r"cannot write .*part-000000000-000000001\.npz: No space left on device"):
        _extract(mac_model, photo_dir, out, save_every=2)
    assert list((out / "parts").iterdir()) == []
    monkeypatch.setattr(np, "savez", real_savez)

    real_replace = os.replace

    def read_only(src, dst):
        if Path(dst).name == "paths.jsonl":
            raise OSError(errno.EROFS, "Read-only file system")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", read_only)
    with pytest.raises(OSError, match=re.escape(f"cannot write {out / 'paths.jsonl'}: Read-only file system")) as info:
        _extract(mac_model, photo_dir, out, save_every=2)
    assert info.value.errno == errno.EROFS
    assert sorted(p.name for p in out.iterdir()) == [".lock", "descriptors.npy", "extraction.json", "parts"]
    assert len(list((out / "parts").glob("part-*.npz"))) == 3  # the finished work is kept
