"""Extraction across processes (issue 13, item 1): torchrun ranks, --shard jobs, `remap merge`.

Everything runs on the CPU with the gloo backend and the torch engine at 64 px.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from remap_lib.app.cli import main
from remap_lib.describe.extract import load_descriptors, merge_extractions, shard_bounds

REPO = Path(__file__).resolve().parents[1]
FAST = ["--head", "mac", "--image-size", "64", "--engine", "torch", "-q", "--workers", "0", "--save-every", "3",
        "--batch-size", "2"]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


@pytest.fixture(scope="module")
def collection(tmp_path_factory, photo_dir):
    """21 images of varied sizes (an odd count: the shards are unequal)."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("collection")
    photos = [Image.open(p).convert("RGB") for p in sorted(photo_dir.glob("*.png"))]
    for i in range(21):
        img = photos[i % 6]
        w, h = img.size
        img.crop((i % 5, i % 3, w - i % 4, h - i % 7)).save(folder / f"im{i:02d}.png")
    return folder


@pytest.fixture(scope="module")
def single(tmp_path_factory, collection):
    """One process, with the threads of the ranks (one each), so that the arithmetic is the same."""
    out = tmp_path_factory.mktemp("single") / "out"
    subprocess.run([sys.executable, "-m", "remap_lib.app.cli", "extract", str(collection), "-o", str(out)] + FAST,
                   env=_env(), check=True, capture_output=True)
    return load_descriptors(out)


def test_shard_bounds_cover_the_list_once_in_order():
    assert [shard_bounds(10, k, 3) for k in range(3)] == [(0, 4), (4, 7), (7, 10)]
    assert [shard_bounds(2, k, 4) for k in range(4)] == [(0, 1), (1, 2), (2, 2), (2, 2)]
    with pytest.raises(ValueError, match="0 <= K < N"):
        shard_bounds(10, 3, 3)


def test_shards_merged_equal_the_single_run(tmp_path, collection, single, capsys):
    shards = [tmp_path / f"s{k}" for k in range(3)]
    for k in (2, 0, 1):  # any order; separate processes, as separate jobs would be
        subprocess.run([sys.executable, "-m", "remap_lib.app.cli", "extract", str(collection), "-o", str(shards[k]),
                        "--shard", f"{k}/3"] + FAST, env=_env(), check=True, capture_output=True)
    assert len(load_descriptors(shards[0]).paths) == 7
    parts = sorted(p.name for p in (shards[1] / "parts").glob("*.npz"))
    assert parts[0] == "part-000000007-000000009.npz"  # named by positions in the whole list
    out = tmp_path / "merged"
    assert main(["merge", str(out), str(shards[1]), str(shards[2]), str(shards[0])]) == 0
    merged = load_descriptors(out)
    assert merged.paths == single.paths
    assert np.array_equal(merged.descriptors, single.descriptors)
    assert merged.config["weights_fingerprint"] == single.config["weights_fingerprint"]


def test_mismatched_or_missing_shards_are_refused(tmp_path, collection, capsys):
    a = tmp_path / "a"
    b = tmp_path / "b"
    assert main(["extract", str(collection), "-o", str(a), "--shard", "0/2"] + FAST) == 0
    other = [x if x != "mac" else "gem" for x in FAST]
    assert main(["extract", str(collection), "-o", str(b), "--shard", "1/2"] + other) == 0
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "m"), str(a), str(b)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "other model settings" in err and "model_digest" in err
    assert not (tmp_path / "m" / "manifest.json").exists()
    assert main(["merge", str(tmp_path / "m"), str(a)]) == 2
    assert "missing [1]" in capsys.readouterr().err
    assert main(["merge", str(tmp_path / "m"), str(a), str(a)]) == 2
    assert "repeated [0]" in capsys.readouterr().err
    c = tmp_path / "c"
    assert main(["extract", str(collection), "-o", str(c), "--shard", "1/3"] + FAST) == 0
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "m"), str(a), str(c)]) == 2
    assert "another image list or shard count" in capsys.readouterr().err
    assert main(["extract", str(collection), "-o", str(tmp_path / "x"), "--shard", "2/2"] + FAST) == 2
    assert "0 <= K < N" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="another part of the image list"):
        from remap_lib.config import ModelConfig
        from remap_lib.describe.extract import extract_descriptors
        from remap_lib.describe.model import RetrievalModel

        model = RetrievalModel(ModelConfig(head="mac", image_sizes=[64]))
        extract_descriptors(model, collection, a, shard=(1, 2), engine="torch", num_workers=0, progress=False)


def _torchrun(collection, out, port):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
            "-m", "remap_lib.app.cli", "extract", str(collection), "-o", str(out)] + FAST


@pytest.mark.slow
def test_torchrun_two_ranks_equal_the_single_run_and_resume_after_a_kill(tmp_path, collection, single):
    out = tmp_path / "out"
    proc = subprocess.Popen(_torchrun(collection, out, 29531), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    rank1 = out / "shards" / "shard-00001-of-00002" / "parts"
    deadline = time.time() + 180
    while not (rank1.exists() and any(rank1.glob("part-*.npz"))):
        assert time.time() < deadline and proc.poll() is None, "rank 1 wrote no part"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job, mid-way
    proc.wait()
    assert not (out / "manifest.json").exists()
    kept = {p.name for p in rank1.glob("part-*.npz")}

    done = subprocess.run(_torchrun(collection, out, 29532), env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert kept <= {p.name for p in rank1.glob("part-*.npz")}  # the killed rank's parts were reused
    got = load_descriptors(out)
    assert got.paths == single.paths
    assert np.array_equal(got.descriptors, single.descriptors)
    shard = json.loads((out / "shards" / "shard-00000-of-00002" / "extraction.json").read_text())["shard"]
    assert (shard["start"], shard["stop"], shard["count"]) == (0, 11, 2)
