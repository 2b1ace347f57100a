"""Command-line input (issue 17, item 11): every bad value ends with one ``error:`` line and exit code 2.

Each case runs the real command in a subprocess (``python -m remap_lib.app.cli``)
and checks: exit code 2, exactly one line starting with ``error:`` that names
the bad value, no ``Traceback``, and nothing written (the working folder's
files, sizes and modification times are unchanged).
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from remap_lib.app.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def work(tmp_path_factory, photo_dir):
    """A folder with photos, an extraction, an index, a train config and damaged ground truth."""
    root = tmp_path_factory.mktemp("bad_input")
    shutil.copytree(photo_dir, root / "photos")
    assert main(["extract", str(root / "photos"), "-o", str(root / "desc"), "--head", "mac", "--image-size", "64",
                 "--engine", "torch", "-q", "--workers", "0"]) == 0
    assert main(["index", "build", str(root / "desc"), "-o", str(root / "i.remap")]) == 0
    (root / "a_file.txt").write_text("I am a file\n")
    (root / "empty").mkdir()
    (root / "an_index_folder").mkdir()
    photos = sorted((root / "photos").glob("*.png"))
    for g in range(3):
        (root / "groups" / f"g{g}").mkdir(parents=True)
        for k in range(2):
            shutil.copy(photos[2 * g + k], root / "groups" / f"g{g}" / f"{k}.png")
    train = {"train": str(root / "groups"), "out_dir": str(root / "run"), "steps": 2, "device": "cpu",
             "whitening_init": "none", "val_every": 0,
             "model": {"head": "remap", "levels": 2, "image_sizes": [64]}}
    (root / "train.yaml").write_text(yaml.safe_dump(train))
    (root / "run").mkdir()
    (root / "run" / "checkpoint.pt").write_bytes(b"\x80\x02 not a checkpoint" * 50)
    names = [p.stem for p in photos]
    for case, bbx, queries in [("nan_bbx", [0, 0, float("nan"), 10], names[:1]),
                               ("three_bbx", [0, 0, 10], names[:1]), ("no_queries", [0, 0, 10, 10], [])]:
        folder = root / case
        (folder / "jpg").mkdir(parents=True)
        for p in photos:
            shutil.copy(p, folder / "jpg" / (p.stem + ".jpg"))  # names only: never read
        gnd = [{"easy": [1], "hard": [], "junk": [], "bbx": bbx} for _ in queries]
        with open(folder / "gnd_test.pkl", "wb") as f:
            pickle.dump({"imlist": names, "qimlist": queries, "gnd": gnd}, f)
    return root


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else None
            for p in root.rglob("*")}


W = "{w}"  # replaced by the working folder
CASES = {
    "-o names an existing file": (["extract", f"{W}/photos", "-o", f"{W}/a_file.txt"], "a_file.txt"),
    "index search -k 0": (["index", "search", f"{W}/i.remap", "--descriptors", f"{W}/desc", "-k", "0"], "0"),
    "index search -k -2": (["index", "search", f"{W}/i.remap", "--descriptors", f"{W}/desc", "-k", "-2"], "-2"),
    "--qe -1": (["index", "search", f"{W}/i.remap", "--descriptors", f"{W}/desc", "--qe", "-1"], "-1"),
    "an index path that is a folder": (["index", "search", f"{W}/an_index_folder", "--descriptors", f"{W}/desc"],
                                       "an_index_folder"),
    "index build -o a folder": (["index", "build", f"{W}/desc", "-o", f"{W}/an_index_folder"], "an_index_folder"),
    "train resumed from a corrupt checkpoint": (["train", "--config", f"{W}/train.yaml"], "checkpoint.pt"),
    "--image-size 0": (["extract", f"{W}/photos", "-o", f"{W}/new", "--image-size", "0"], "0"),
    "index build --truncate 0": (["index", "build", f"{W}/desc", "-o", f"{W}/new.remap", "--truncate", "0"], "0"),
    "--batch-size 0": (["extract", f"{W}/photos", "-o", f"{W}/new", "--batch-size", "0"], "0"),
    "--batch-size -1": (["extract", f"{W}/photos", "-o", f"{W}/new", "--batch-size", "-1"], "-1"),
    "--workers 1000": (["extract", f"{W}/photos", "-o", f"{W}/new", "--workers", "1000"], "1000"),
    "a missing input folder": (["extract", f"{W}/no_such_folder", "-o", f"{W}/new"], "no_such_folder"),
    "an empty folder": (["extract", f"{W}/empty", "-o", f"{W}/new"], "empty"),
    "evaluate -d rparis=": (["evaluate", "-d", "rparis=", "-m", "mac"], "rparis="),
    "train --steps 0": (["train", "--config", f"{W}/train.yaml", "--steps", "0"], "0"),
    "an empty query list": (["evaluate", "-d", f"{W}/no_queries", "-m", "mac", "--image-size", "64"], "quer"),
    "a NaN bbx": (["evaluate", "-d", f"{W}/nan_bbx", "-m", "mac"], "nan"),
    "a 3-value bbx": (["evaluate", "-d", f"{W}/three_bbx", "-m", "mac"], "3 values"),
    "--input-size abc": (["klw", "-d", f"{W}/groups", "-o", f"{W}/k.json", "--input-size", "abc"], "abc"),
    "index search -k abc": (["index", "search", f"{W}/i.remap", "--descriptors", f"{W}/desc", "-k", "abc"], "abc"),
    "--engine tpu": (["extract", f"{W}/photos", "-o", f"{W}/new", "--engine", "tpu"], "tpu"),
}


# Issue 25 (second hardening round): new command lines, one block per area.
CASES.update({  # index build / add / search
    "index build -o its own descriptors.npy": (["index", "build", f"{W}/desc", "-o", f"{W}/desc/descriptors.npy"],
                                               "an input of the index"),
    "index build -o an existing file that is not an index": (["index", "build", f"{W}/desc", "-o",
                                                              f"{W}/a_file.txt"], "a_file.txt exists and is not"),
    "index add of a folder already in the index": (["index", "add", f"{W}/i.remap", f"{W}/desc"], "already in"),
    "--qe-alpha nan": (["index", "search", f"{W}/i.remap", "--descriptors", f"{W}/desc", "--qe", "2",
                        "--qe-alpha", "nan"], "--qe-alpha"),
    "--qe-alpha -1": (["index", "search", f"{W}/i.remap", "--descriptors", f"{W}/desc", "--qe", "2",
                       "--qe-alpha", "-1"], "--qe-alpha"),
})
CASES.update({  # extract: images, file names, temporary names
    "-o a folder name over 255 bytes": (["extract", f"{W}/photos", "-o", f"{W}/{'o' * 256}", "--engine", "torch"],
                                        "File name too long"),
})
CASES.update({  # model options, configs, checkpoints, klw / evaluate
    "klw --checkpoint that cannot be read": (["klw", "-d", f"{W}/groups", "-o", f"{W}/k.json", "--nonmatching-ratio",
                                              "2", "--checkpoint", f"{W}/run/checkpoint.pt"], "checkpoint.pt"),
    "klw --klw (KL weights cannot act on their own estimate)": (["klw", "-d", f"{W}/groups", "-o", f"{W}/k.json",
                                                                 "--nonmatching-ratio", "2", "--klw",
                                                                 f"{W}/a_file.txt"], "--klw"),
    "klw --image-size (klw resizes to --input-size)": (["klw", "-d", f"{W}/groups", "-o", f"{W}/k.json",
                                                        "--nonmatching-ratio", "2", "--image-size", "64"],
                                                       "--image-size"),
    "evaluate --klw a missing file": (["evaluate", "-d", f"{W}/groups", "-m", "remap", "--image-size", "64", "--klw",
                                       f"{W}/no_such.json"], "no_such.json"),
    "evaluate --klw a binary file": (["evaluate", "-d", f"{W}/groups", "-m", "remap", "--image-size", "64", "--klw",
                                      f"{W}/photos/chelsea.png"], "chelsea.png is not a KL-weights JSON"),
    "evaluate --klw without a remap method": (["evaluate", "-d", f"{W}/groups", "-m", "mac", "--klw",
                                               f"{W}/a_file.txt"], "-m does not name remap"),
    "evaluate --whitening with two heads": (["evaluate", "-d", f"{W}/groups", "-m", "gem", "mac", "--whitening",
                                             f"{W}/a_file.txt"], "--whitening"),
    "evaluate --head (the heads are -m's)": (["evaluate", "-d", f"{W}/groups", "-m", "gem", "--head", "mac"],
                                             "--head"),
    "extract --checkpoint with --head": (["extract", f"{W}/photos", "-o", f"{W}/new", "--checkpoint",
                                          f"{W}/run/checkpoint.pt", "--head", "mac"], "--head"),
    "extract --multiscale with --image-size": (["extract", f"{W}/photos", "-o", f"{W}/new", "--multiscale",
                                                "--image-size", "64"], "--image-size"),
    "extract --list and image paths": (["extract", f"{W}/photos", "--list", f"{W}/a_file.txt", "-o", f"{W}/new"],
                                       "not both"),
    "--config a text file that is not JSON": (["extract", f"{W}/photos", "-o", f"{W}/new", "--config",
                                               f"{W}/a_file.txt"], "a_file.txt"),
    "train --config a binary file": (["train", "--config", f"{W}/photos/chelsea.png"], "chelsea.png"),
    "train-rpn --config a binary file": (["train-rpn", "--config", f"{W}/photos/chelsea.png"], "chelsea.png"),
    "notebooks -p a binary file": (["notebooks", "-p", f"{W}/photos/chelsea.png", "-o", f"{W}/nb"], "chelsea.png"),
    "notebooks --only that names no notebook": (["notebooks", "--only", "no_such_notebook", "-o", f"{W}/nb"],
                                                "no_such_notebook"),
})


def _run(argv, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "remap_lib.app.cli"] + argv, cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_every_bad_command_ends_with_one_error_line_and_writes_nothing(work):
    before = _snapshot(work)
    argvs = {name: [a.replace(W, str(work)) for a in argv] for name, (argv, _) in CASES.items()}
    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(argvs, pool.map(lambda a: _run(a, work), argvs.values())))
    problems = []
    for name, proc in results.items():
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        wanted = CASES[name][1]
        if (proc.returncode != 2 or len(errors) != 1 or "Traceback" in proc.stderr
                or wanted.lower() not in errors[0].lower()):
            problems.append(f"{name}: exit {proc.returncode}, stderr:\n{proc.stderr[-1500:]}")
    assert not problems, "\n\n".join(problems)
    assert _snapshot(work) == before


def test_klw_accepts_a_small_4_3_input(work, capsys):
    """256x192 is 4:3: its 6x8 map must give the 40 regions of the reference grid one to one."""
    out = work.parent / "klw_small.json"
    assert main(["klw", "-d", str(work / "groups"), "-o", str(out), "--input-size", "256x192", "--levels", "4",
                 "--matching", "3", "--nonmatching-ratio", "2", "--bins", "5", "-q"]) == 0
    assert "40 regions" in capsys.readouterr().out
