"""Extraction: batching, bad images, resume, the CLI (remap_lib.describe.extract, remap_lib.app.cli)."""

from __future__ import annotations

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
from remap_lib.config import PAPER_MULTISCALE, ModelConfig
from remap_lib.describe.extract import extract_descriptors, learn_whitening, load_descriptors
from remap_lib.data.images import ImageLoadError, load_image, resize_longer_side, to_tensor
from remap_lib.describe.model import RetrievalModel


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
    from remap_lib.layers.whitening import PCAWhitening

    w = PCAWhitening.load(tmp_path / "w.npz")
    assert np.allclose(np.load(out2 / "descriptors.npy"), w.apply(np.load(out / "descriptors.npy")), atol=1e-4)
    shutil.rmtree(out)
    assert main(["whiten", str(out), "-o", str(tmp_path / "x.npz")]) == 2
    assert "not a folder written by `remap extract`" in capsys.readouterr().err


def test_small_images_are_not_enlarged_unless_asked():
    from remap_lib.describe.extract import scaled_sizes

    assert scaled_sizes(2000, [1024], False) == [1024]
    assert scaled_sizes(800, [1024], False) == [800]  # a cropped query keeps its scale
    assert scaled_sizes(800, [1024], True) == [1024]
    assert scaled_sizes(2000, [1024, 1280], False) == [1024, 1280]
    assert scaled_sizes(800, [1024, 1280], False) == [800, 1000]  # Eq. 3's ratio kept


def test_query_crop_is_described_at_its_own_scale(tmp_path, photo_dir, lite0):
    from remap_lib.data.images import ImageSpec

    model = RetrievalModel(ModelConfig(head="mac", image_sizes=[128]), backbone=lite0)
    spec = ImageSpec(str(photo_dir / "chelsea.png"), box=(10, 10, 74, 58))
    row = extract_descriptors(model, [spec], num_workers=0, progress=False).descriptors[0]
    crop = load_image(spec.path).crop((10, 10, 74, 58))  # 64x48: kept, not enlarged to 128
    with torch.no_grad():
        assert np.allclose(model(to_tensor(crop)[None])[0].numpy(), row, atol=1e-5)


# ---------------------------------------------------------------------- issue 25: loader workers, unread formats
REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "remap_lib.app.cli"]
MAC_128 = ["--head", "mac", "--image-size", "128", "--engine", "torch", "-q"]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def _limited(cmd, file_size_kb: int | None = None) -> list[str]:
    """``cmd`` under ``ulimit -f`` (as the issue ran it): a write past the limit fails with EFBIG
    (Python ignores SIGXFSZ), and so does torch's shared memory for a larger tensor."""
    if file_size_kb is None:
        return cmd
    return ["bash", "-c", f'ulimit -f {file_size_kb} && exec "$@"', "bash"] + cmd


def _run_bounded(cmd, timeout: float = 120):
    """Run ``cmd``; a run still going after ``timeout`` s is killed with its workers and fails the test."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"still running after {timeout} s (it hangs); stderr:\n{err[-3000:]}")
    return proc.returncode, out, err


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def _part_rows(out: Path) -> list[str]:
    rows = []
    for part in sorted((out / "parts").glob("part-*.npz")):
        with np.load(part) as z:
            rows += z["paths"].tolist()
    return rows


def test_workers_without_shared_memory_hand_images_over_through_a_pipe(tmp_path, photo_dir):
    """Item 6: with ``ulimit -f 100`` a worker cannot put a 128 px image (about 150 kB as a tensor) in
    shared memory; the run used to wait forever for it.  Now it finishes, with the descriptors of a run
    that loads in the main process, bit for bit."""
    ref, out = tmp_path / "ref", tmp_path / "out"
    rc, _, err = _run_bounded(CLI + ["extract", str(photo_dir), "-o", str(ref), "--workers", "0"] + MAC_128)
    assert rc == 0, err
    rc, _, err = _run_bounded(_limited(CLI + ["extract", str(photo_dir), "-o", str(out), "--workers", "2",
                                              "--save-every", "5"] + MAC_128, file_size_kb=100))
    assert rc == 0, err
    assert "could not put an image in shared memory" in err and "File too large" in err
    assert "Traceback" not in err
    expected, got = load_descriptors(ref), load_descriptors(out)
    assert got.paths == expected.paths and len(got.paths) == 6
    assert np.array_equal(got.descriptors, expected.descriptors)


def test_the_issue_run_ends_with_one_error_naming_the_file_and_keeps_the_parts(tmp_path, write_collection):
    """Item 6 as reported: 30 images, ``ulimit -f 100``, ``--save-every 5``, workers.  The images are
    described (parts of 5 fit under the limit), then ``descriptors.npy`` (150 kB) does not: exit 2 with
    one error line that names it, the six parts kept, no temporary left; without the limit the same
    command finishes from the parts."""
    folder = write_collection(tmp_path / "photos", 30, longer_side=128)
    out = tmp_path / "out"
    cmd = CLI + ["extract", str(folder), "-o", str(out), "--save-every", "5", "--workers", "2"] + MAC_128
    t = time.perf_counter()
    rc, _, err = _run_bounded(_limited(cmd, file_size_kb=100))
    took = time.perf_counter() - t
    assert rc == 2, err
    errors = _error_lines(err)
    assert len(errors) == 1 and "Traceback" not in err, err
    assert f"cannot write {out / 'descriptors.npy'}: File too large" in errors[0]
    assert "finished images are kept" in errors[0]
    assert len(list((out / "parts").glob("part-*.npz"))) == 6
    assert sorted(_part_rows(out)) == sorted(str(p) for p in folder.glob("*.png"))
    assert sorted(p.name for p in out.iterdir()) == [".lock", "extraction.json", "parts"]  # no temporary left
    assert took < 100

    rc, _, err = _run_bounded(cmd)
    assert rc == 0, err
    assert load_descriptors(out).paths == sorted(str(p) for p in folder.glob("*.png"))


def test_a_killed_worker_ends_the_run_with_one_error_and_keeps_the_parts(tmp_path, write_collection):
    children = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children")
    if not children.exists():
        pytest.skip("needs /proc/PID/task/PID/children (Linux)")
    folder = write_collection(tmp_path / "photos", 60, longer_side=128)
    out = tmp_path / "out"
    cmd = CLI + ["extract", str(folder), "-o", str(out), "--save-every", "5", "--batch-size", "1",
                 "--workers", "2"] + MAC_128
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while not list((out / "parts").glob("part-*.npz")):
            assert time.time() < deadline and proc.poll() is None, "no part written"
            time.sleep(0.02)
        workers = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert workers, "the run has no loader workers"
        os.kill(int(workers[0]), signal.SIGKILL)
        killed = time.time()
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("the run hangs after one of its workers was killed")
    assert time.time() - killed < 30
    assert proc.returncode == 2, err
    errors = _error_lines(err)
    assert len(errors) == 1 and "Traceback" not in err, err
    # torch says "(pid N) is killed by signal" or "(pid(s) N) exited unexpectedly", whichever notices first
    assert "DataLoader worker (pid" in errors[0] and workers[0] in errors[0]
    assert "rerun the same command" in errors[0]
    kept = _part_rows(out)
    assert 5 <= len(kept) < 60
    rc, _, err = _run_bounded(cmd)
    assert rc == 0, err
    assert load_descriptors(out).paths == sorted(str(p) for p in folder.glob("*.png"))


LOST_IMAGE = """
import sys
import remap_lib.describe.extract as E
from remap_lib.config import ModelConfig
from remap_lib.describe.model import RetrievalModel

E.LOADER_TIMEOUT_S = 3
real = E._ImageDataset.__getitem__

def loses_image_3(self, i):
    i, item = real(self, i)
    return (i, [lambda: None]) if i == 3 else (i, item)  # unpicklable: lost in the worker's queue thread

E._ImageDataset.__getitem__ = loses_image_3
model = RetrievalModel(ModelConfig(head="mac", image_sizes=[64], weights="random"))
try:
    E.extract_descriptors(model, sys.argv[1], sys.argv[2], num_workers=2, save_every=1, batch_size=1,
                          engine="torch", progress=False)
except RuntimeError as exc:
    print("error:", exc, file=sys.stderr)
    sys.exit(2)
"""


def test_an_image_lost_by_a_live_worker_ends_the_run_instead_of_hanging(tmp_path, photo_dir):
    """The last resort of item 6: whatever loses an image between a live worker and the main process,
    the run ends after ``LOADER_TIMEOUT_S`` with the images before it on disk."""
    out = tmp_path / "out"
    rc, _, err = _run_bounded([sys.executable, "-c", LOST_IMAGE, str(photo_dir), str(out)], timeout=90)
    assert rc == 2, err
    assert "no image arrived from the loader workers for 3 s" in _error_lines(err)[0]
    assert _part_rows(out) == sorted(str(p) for p in photo_dir.glob("*.png"))[:3]


def test_images_the_loader_cannot_read_are_listed_as_failed(tmp_path, photo_dir, rmac_model):
    """Item 8a: a .heic inside a folder was skipped without a word; now it is listed with the reason,
    like a named one, and the other images are described as before."""
    folder = tmp_path / "imgs"
    shutil.copytree(photo_dir, folder)
    (folder / "phone.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(64))
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    res = extract_descriptors(rmac_model, folder, out, num_workers=0, progress=False)
    assert res.paths == sorted(str(p) for p in folder.glob("*.png"))
    reason = "unsupported image format (.heic): the image loader (Pillow) has no decoder for it; " \
             "convert the file to JPEG or PNG"
    assert res.failed == [(str(folder / "phone.heic"), reason)]
    assert [json.loads(line) for line in (out / "failed.jsonl").read_text().splitlines()] == [
        {"path": str(folder / "phone.heic"), "reason": reason}]
    named = extract_descriptors(rmac_model, [str(folder / "phone.heic"), res.paths[0]], num_workers=0,
                                progress=False)
    assert named.failed == res.failed and named.paths == res.paths[:1]
