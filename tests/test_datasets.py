"""Benchmark readers (remap_lib.data.datasets) on tiny synthetic layouts, and on the real data when present."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from remap_lib.data.datasets import (
    ImageSpec,
    MissingImagesError,
    RetrievalDataset,
    load_csv_groups,
    load_dataset,
    load_folder_groups,
    load_holidays,
    load_oxford_paris,
    load_revisited,
    load_ukbench,
    safe_load_pickle,
    split_groups,
)
from remap_lib.evaluation.metrics import recall_at_k, ukbench_score

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _img(path: Path, color=(120, 30, 200), size=(16, 12)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _sorted(entries):
    return [{"ok": sorted(e["ok"]), "junk": sorted(e["junk"])} for e in entries]


def _paths(specs):
    return [Path(s.path).name for s in specs]


# --------------------------------------------------------------------------- revisited Oxford / Paris

# imlist deliberately not in sorted order: the reader must keep the pkl's order.
IMLIST = ["db_c", "db_a", "db_e", "db_b", "db_d"]
QIMLIST = ["q_one", "q_two"]
GND = [
    {"bbx": [1, 2, 10, 11], "easy": [0, 2], "hard": [4], "junk": [1]},
    {"bbx": (0.5, 1.5, 7.5, 8.5), "easy": [3], "hard": [], "junk": [0, 4]},
]


def _revisited(tmp_path, name="tiny", gnd=None, protocol=4) -> Path:
    root = tmp_path / "rtiny"
    for n in IMLIST + QIMLIST:
        _img(root / "jpg" / f"{n}.jpg")
    cfg = {"imlist": IMLIST, "qimlist": QIMLIST, "gnd": GND if gnd is None else gnd}
    (root / f"gnd_{name}.pkl").write_bytes(pickle.dumps(cfg, protocol=protocol))
    return root


def test_load_revisited_order_boxes_and_protocols(tmp_path):
    root = _revisited(tmp_path)
    ds = load_revisited(root)
    assert ds.name == "tiny" and ds.primary == "medium" and ds.notes == [] and ds.dropped == {}
    assert ds.groups is None
    assert [s.path for s in ds.images] == [str(root / "jpg" / f"{n}.jpg") for n in IMLIST]
    assert [s.path for s in ds.queries] == [str(root / "jpg" / f"{n}.jpg") for n in QIMLIST]
    assert all(s.box is None and s.rotate == 0 for s in ds.images)
    assert ds.queries[0].box == (1.0, 2.0, 10.0, 11.0)
    assert ds.queries[1].box == (0.5, 1.5, 7.5, 8.5)
    assert all(isinstance(v, float) for q in ds.queries for v in q.box)
    assert set(ds.gnd) == {"easy", "medium", "hard"}
    # Easy: ok = easy, junk = junk + hard; Medium: ok = easy + hard, junk = junk;
    # Hard: ok = hard, junk = junk + easy.
    assert _sorted(ds.gnd["easy"]) == [{"ok": [0, 2], "junk": [1, 4]}, {"ok": [3], "junk": [0, 4]}]
    assert _sorted(ds.gnd["medium"]) == [{"ok": [0, 2, 4], "junk": [1]}, {"ok": [3], "junk": [0, 4]}]
    assert _sorted(ds.gnd["hard"]) == [{"ok": [4], "junk": [0, 1, 2]}, {"ok": [], "junk": [0, 3, 4]}]
    # explicit name selects the pkl
    assert load_revisited(root, "tiny").name == "tiny"
    with pytest.raises(FileNotFoundError):
        load_revisited(root, "roxford5k")


def test_load_revisited_uncropped_queries_are_noted(tmp_path):
    ds = load_revisited(_revisited(tmp_path), crop_queries=False)
    assert [q.box for q in ds.queries] == [None, None]
    assert len(ds.notes) == 1 and "NOT cropped" in ds.notes[0]
    assert "NOT cropped" in ds.summary()


def test_load_revisited_missing_database_image(tmp_path):
    root = _revisited(tmp_path)
    (root / "jpg" / "db_e.jpg").unlink()  # imlist index 2
    with pytest.raises(MissingImagesError, match="db_e") as err:
        load_revisited(root)
    assert isinstance(err.value, FileNotFoundError)
    assert "0 query and 1 database" in str(err.value)

    ds = load_revisited(root, allow_missing=True)
    assert ds.dropped == {"queries": 0, "images": 1}
    assert _paths(ds.images) == ["db_c.jpg", "db_a.jpg", "db_b.jpg", "db_d.jpg"]
    # old -> new indices: 0->0, 1->1, (2 dropped), 3->2, 4->3
    assert _sorted(ds.gnd["easy"]) == [{"ok": [0], "junk": [1, 3]}, {"ok": [2], "junk": [0, 3]}]
    assert _sorted(ds.gnd["medium"]) == [{"ok": [0, 3], "junk": [1]}, {"ok": [2], "junk": [0, 3]}]
    assert _sorted(ds.gnd["hard"]) == [{"ok": [3], "junk": [0, 1]}, {"ok": [], "junk": [0, 2, 3]}]
    assert [q.box for q in ds.queries] == [(1.0, 2.0, 10.0, 11.0), (0.5, 1.5, 7.5, 8.5)]


def test_load_revisited_missing_query_image(tmp_path):
    root = _revisited(tmp_path)
    (root / "jpg" / "q_one.jpg").unlink()
    with pytest.raises(MissingImagesError, match="q_one"):
        load_revisited(root)
    ds = load_revisited(root, allow_missing=True)
    assert ds.dropped == {"queries": 1, "images": 0}
    assert _paths(ds.queries) == ["q_two.jpg"]
    assert ds.queries[0].box == (0.5, 1.5, 7.5, 8.5)  # the box of q_two, not of q_one
    assert _sorted(ds.gnd["medium"]) == [{"ok": [3], "junk": [0, 4]}]
    assert len(ds.images) == 5


def test_load_revisited_accepts_numpy_arrays_protocol_4(tmp_path):
    gnd = [{"bbx": np.array(g["bbx"], dtype=np.float64), "easy": np.array(g["easy"], dtype=np.int64),
            "hard": np.array(g["hard"], dtype=np.int64), "junk": np.array(g["junk"], dtype=np.int64)}
           for g in GND]
    ds = load_revisited(_revisited(tmp_path, gnd=gnd, protocol=4))
    assert _sorted(ds.gnd["medium"]) == [{"ok": [0, 2, 4], "junk": [1]}, {"ok": [3], "junk": [0, 4]}]
    assert ds.queries[1].box == (0.5, 1.5, 7.5, 8.5)


@pytest.mark.parametrize("protocol", [2, 5])  # arrays go through _codecs.encode / _frombuffer
def test_safe_load_pickle_numpy_arrays_other_protocols(tmp_path, protocol):
    # The docstring promises "containers, numbers, strings and NumPy arrays".
    path = tmp_path / "arr.pkl"
    path.write_bytes(pickle.dumps({"easy": np.array([3, 1, 2])}, protocol=protocol))
    assert safe_load_pickle(path)["easy"].tolist() == [3, 1, 2]


class _PlainObject:
    def __init__(self):
        self.imlist = ["a"]


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_safe_load_pickle_refuses_code_and_objects(tmp_path):
    marker = tmp_path / "pwned"
    evil = {
        "reduce_os_system.pkl": pickle.dumps({"imlist": [], "qimlist": [], "gnd": [_RunsCode(marker)]}),
        "class_instance.pkl": pickle.dumps(_PlainObject()),
        "builtins_exec.pkl": (b"cbuiltins\nexec\n(Vopen(" + repr(str(marker)).encode()
                              + b", 'w').close()\ntR."),
        "os_system_proto0.pkl": b"cos\nsystem\n(V touch " + str(marker).encode() + b"\ntR.",
    }
    for name, data in evil.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match="refusing"):
            safe_load_pickle(tmp_path / name)
    assert not marker.exists()
    # Through the reader too: a revisited folder whose pkl runs code is refused.
    root = tmp_path / "revil"
    root.mkdir()
    (root / "gnd_evil.pkl").write_bytes(evil["reduce_os_system.pkl"])
    with pytest.raises(ValueError, match="refusing"):
        load_revisited(root)
    assert not marker.exists()
    # The same data without the payload loads (the refusal is about the global, not the file).
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"gnd": [{"easy": [1], "bbx": (1.0, 2.0)}]}))
    assert safe_load_pickle(tmp_path / "plain.pkl") == {"gnd": [{"easy": [1], "bbx": (1.0, 2.0)}]}


def test_safe_load_pickle_garbage_is_value_error(tmp_path):
    (tmp_path / "garbage.pkl").write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match="garbage.pkl: invalid load key"):
        safe_load_pickle(tmp_path / "garbage.pkl")
    (tmp_path / "truncated.pkl").write_bytes(pickle.dumps({"imlist": ["a"] * 50})[:30])
    with pytest.raises(ValueError, match="truncated.pkl"):
        safe_load_pickle(tmp_path / "truncated.pkl")


@pytest.mark.parametrize("cfg, message", [
    (["imlist", "qimlist", "gnd"], "expected a dict"),
    ({"imlist": IMLIST, "qimlist": QIMLIST}, "expected a dict"),
    ({"imlist": IMLIST, "qimlist": QIMLIST, "gnd": GND[:1]}, "2 queries but 1 gnd entries"),
    ({"imlist": IMLIST, "qimlist": QIMLIST, "gnd": [GND[0], {"easy": [], "hard": [], "junk": []}]},
     r"gnd\[1\] must have"),
    ({"imlist": IMLIST, "qimlist": QIMLIST, "gnd": [GND[0], [1, 2]]}, r"gnd\[1\] must have"),
    ({"imlist": IMLIST, "qimlist": QIMLIST, "gnd": [GND[0], dict(GND[1], easy=[7])]}, "outside 0..4"),
], ids=["list", "no-gnd", "length", "no-bbx", "not-dict", "index-range"])
def test_load_revisited_wrong_structure(tmp_path, cfg, message):
    root = _revisited(tmp_path)
    (root / "gnd_tiny.pkl").write_bytes(pickle.dumps(cfg))
    with pytest.raises(ValueError, match=message):
        load_revisited(root)


def test_load_revisited_without_pkl(tmp_path):
    (tmp_path / "jpg").mkdir()
    with pytest.raises(FileNotFoundError, match="gnd_"):
        load_revisited(tmp_path)


# --------------------------------------------------------------------------- original Oxford / Paris

OX_IMAGES = ["all_souls_000001", "all_souls_000002", "ashmolean_000003", "balliol_000004",
             "christ_church_000005", "magdalen_000006"]  # sorted: indices 0..5


def _oxford(tmp_path, gt_in_root=False) -> Path:
    root = tmp_path / "oxford5k"
    for n in OX_IMAGES:
        _img(root / "jpg" / f"{n}.jpg")
    gt = root if gt_in_root else root / "gt"
    gt.mkdir(parents=True, exist_ok=True)
    files = {
        "all_souls_1_query.txt": "oxc1_all_souls_000001 1.5 2.5 10.0 11.0\n",
        "all_souls_1_good.txt": "all_souls_000002\n",
        "all_souls_1_ok.txt": "ashmolean_000003\n\n",
        "all_souls_1_junk.txt": "balliol_000004\n",
        "christ_church_1_query.txt": "christ_church_000005 0 0 8 8\n",  # Paris style: no oxc1_ prefix
        "christ_church_1_good.txt": "magdalen_000006\n",
        "christ_church_1_ok.txt": "",
        "christ_church_1_junk.txt": "",
    }
    for name, text in files.items():
        (gt / name).write_text(text)
    return root


def test_load_oxford_paris(tmp_path):
    root = _oxford(tmp_path)
    ds = load_oxford_paris(root)
    assert ds.name == "oxford5k" and ds.primary == "map" and list(ds.gnd) == ["map"]
    assert _paths(ds.images) == [f"{n}.jpg" for n in OX_IMAGES]
    assert _paths(ds.queries) == ["all_souls_000001.jpg", "christ_church_000005.jpg"]
    assert [q.box for q in ds.queries] == [(1.5, 2.5, 10.0, 11.0), (0.0, 0.0, 8.0, 8.0)]
    # ok = good + ok, junk = junk
    assert _sorted(ds.gnd["map"]) == [{"ok": [1, 2], "junk": [3]}, {"ok": [5], "junk": []}]
    assert ds.dropped == {} and ds.notes == []
    assert load_oxford_paris(root, "ox", crop_queries=False).name == "ox"
    unc = load_oxford_paris(root, crop_queries=False)
    assert [q.box for q in unc.queries] == [None, None] and "NOT cropped" in unc.notes[0]


def test_load_oxford_paris_unknown_image_in_gt(tmp_path):
    root = _oxford(tmp_path)
    with open(root / "gt" / "all_souls_1_good.txt", "a") as f:
        f.write("radcliffe_camera_000099\n")
    with pytest.raises(MissingImagesError, match="radcliffe_camera_000099"):
        load_oxford_paris(root)
    ds = load_oxford_paris(root, allow_missing=True)
    assert ds.dropped == {"images": 1}
    assert _sorted(ds.gnd["map"]) == [{"ok": [1, 2], "junk": [3]}, {"ok": [5], "junk": []}]


def test_load_oxford_paris_missing_query_image_and_bad_query_line(tmp_path):
    root = _oxford(tmp_path)
    (root / "gt" / "christ_church_1_query.txt").write_text("oxc1_christ_church_000777 0 0 8 8\n")
    with pytest.raises(MissingImagesError, match="christ_church_000777"):
        load_oxford_paris(root)
    (root / "gt" / "christ_church_1_query.txt").write_text("oxc1_christ_church_000005 0 0 8\n")
    with pytest.raises(ValueError, match="x0 y0 x1 y1"):
        load_oxford_paris(root)
    (root / "gt" / "christ_church_1_query.txt").write_text("oxc1_christ_church_000005 0 0 8 8\n")
    (root / "gt" / "christ_church_1_junk.txt").unlink()
    with pytest.raises(FileNotFoundError, match="christ_church_1_junk"):
        load_oxford_paris(root)


# --------------------------------------------------------------------------- Holidays

HOLIDAYS = ["100000", "100001", "100100", "100101", "100102"]


def _holidays(tmp_path, sub="jpg") -> Path:
    root = tmp_path / "holidays"
    for n in HOLIDAYS:
        _img(root / sub / f"{n}.jpg")
    _img(root / sub / "12345.jpg")  # not six digits: ignored
    return root


@pytest.mark.parametrize("sub", ["jpg", "."])
def test_load_holidays(tmp_path, sub):
    ds = load_holidays(_holidays(tmp_path, sub))
    assert ds.name == "holidays" and ds.primary == "map"
    assert _paths(ds.images) == [f"{n}.jpg" for n in HOLIDAYS]
    assert _paths(ds.queries) == ["100000.jpg", "100100.jpg"]
    assert ds.queries == [ds.images[0], ds.images[2]]
    assert ds.groups == [0, 0, 1, 1, 1]
    # query itself is junk, the rest of its scene relevant
    assert _sorted(ds.gnd["map"]) == [{"ok": [1], "junk": [0]}, {"ok": [3, 4], "junk": [2]}]
    assert all(s.rotate == 0 for s in ds.images) and ds.notes == ["no rotation fixes applied"]


def test_load_holidays_only_xx00_images_are_queries(tmp_path):
    root = _holidays(tmp_path)
    _img(root / "jpg" / "100110.jpg")  # image 10 of scene 1001: ends in 0 but is not a query
    _img(root / "jpg" / "100200.jpg")  # scene 1002 with only its query
    ds = load_holidays(root)
    assert _paths(ds.queries) == ["100000.jpg", "100100.jpg", "100200.jpg"]
    assert ds.groups == [0, 0, 1, 1, 1, 1, 2]
    assert _sorted(ds.gnd["map"]) == [{"ok": [1], "junk": [0]}, {"ok": [3, 4, 5], "junk": [2]},
                                      {"ok": [], "junk": [6]}]


def test_load_holidays_rotations(tmp_path):
    root = _holidays(tmp_path)
    rot = tmp_path / "rotations.txt"
    rot.write_text("100001.jpg 90\n\njpg/100101.jpg -90\n100102 180\n")
    ds = load_holidays(root, rotations=rot)
    assert [s.rotate for s in ds.images] == [0, 90, 0, 270, 180]
    assert [s.rotate for s in ds.queries] == [0, 0]
    assert ds.notes == ["3 rotation fixes applied"]
    assert ds.images[1].key.endswith("|rot=90")


@pytest.mark.parametrize("line", ["100001.jpg", "100001.jpg 45", "100001.jpg ninety", "100001.jpg 90 extra"])
def test_load_holidays_malformed_rotation_line(tmp_path, line):
    root = _holidays(tmp_path)
    rot = tmp_path / "rotations.txt"
    rot.write_text(f"100000.jpg 90\n{line}\n")
    with pytest.raises(ValueError, match=r"rotations.txt:2"):
        load_holidays(root, rotations=rot)


def test_load_holidays_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_holidays(tmp_path)


# --------------------------------------------------------------------------- UKBench


def _ukbench(tmp_path, n=8, sub=None) -> Path:
    root = tmp_path / "ukb"
    folder = root / sub if sub else root
    for i in range(n):
        _img(folder / f"ukbench{i:05d}.jpg", color=(i * 20 % 256, 0, 0))
    return root


@pytest.mark.parametrize("sub", [None, "full"])
def test_load_ukbench(tmp_path, sub):
    ds = load_ukbench(_ukbench(tmp_path, sub=sub))
    assert ds.name == "ukbench" and ds.primary == "ukbench"
    assert _paths(ds.images) == [f"ukbench{i:05d}.jpg" for i in range(8)]
    assert ds.queries == ds.images and ds.query_is_database
    assert ds.groups == [0, 0, 0, 0, 1, 1, 1, 1]
    # map: self is junk, the 3 others relevant; ukbench: the 4 of the object, self included
    assert _sorted(ds.gnd["map"])[0] == {"ok": [1, 2, 3], "junk": [0]}
    assert _sorted(ds.gnd["map"])[5] == {"ok": [4, 6, 7], "junk": [5]}
    assert _sorted(ds.gnd["ukbench"])[0] == {"ok": [0, 1, 2, 3], "junk": []}
    assert _sorted(ds.gnd["ukbench"])[5] == {"ok": [4, 5, 6, 7], "junk": []}
    assert all(i not in e["ok"] and e["junk"] == [i] for i, e in enumerate(ds.gnd["map"]))
    assert ds.dropped == {}
    # The ukbench protocol is what ukbench_score measures: 4 × R@4 with self counted.
    rng = np.random.default_rng(0)
    ranks = np.stack([rng.permutation(8) for _ in range(8)])
    assert 4 * recall_at_k(ranks, ds.gnd["ukbench"], 4) == pytest.approx(ukbench_score(ranks, ds.groups))


def test_load_ukbench_incomplete_group(tmp_path):
    root = _ukbench(tmp_path, n=12)
    (root / "ukbench00006.jpg").unlink()  # object 1 has 3 images
    with pytest.raises(MissingImagesError, match="object 1"):
        load_ukbench(root)
    ds = load_ukbench(root, allow_missing=True)
    assert _paths(ds.images) == [f"ukbench{i:05d}.jpg" for i in (0, 1, 2, 3, 8, 9, 10, 11)]
    assert ds.groups == [0, 0, 0, 0, 1, 1, 1, 1]
    assert ds.dropped == {"images": 3, "queries": 3}
    assert _sorted(ds.gnd["ukbench"])[4] == {"ok": [4, 5, 6, 7], "junk": []}
    with pytest.raises(FileNotFoundError):
        load_ukbench(tmp_path / "nothing-here")


# --------------------------------------------------------------------------- user groups


def test_load_folder_groups(tmp_path):
    root = tmp_path / "mine"
    _img(root / "cats" / "a.png")
    _img(root / "cats" / "sub" / "b.jpg")  # nested: still group "cats"
    _img(root / "dogs" / "c.png")
    (root / "dogs" / "notes.txt").write_text("not an image")
    _img(root / "stray.png")  # not in a group folder: ignored
    ds = load_folder_groups(root)
    assert ds.name == "mine" and ds.primary == "map"
    assert [Path(s.path).relative_to(root).as_posix() for s in ds.images] == ["cats/a.png", "cats/sub/b.jpg",
                                                                              "dogs/c.png"]
    assert ds.groups == [0, 0, 1] and ds.query_is_database
    assert ds.gnd["map"] == [{"ok": [1], "junk": [0]}, {"ok": [0], "junk": [1]}, {"ok": [], "junk": [2]}]
    assert load_folder_groups(root, "named").name == "named"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError):
        load_folder_groups(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        load_folder_groups(tmp_path / "absent")


def _csv_set(tmp_path) -> Path:
    _img(tmp_path / "imgs" / "x1.png")
    _img(tmp_path / "imgs" / "x2.png")
    _img(tmp_path / "lists" / "y1.jpg")
    absolute = _img(tmp_path / "elsewhere" / "z.png")
    csv_path = tmp_path / "lists" / "pairs.csv"
    csv_path.write_text("image,group\n../imgs/x1.png,b\ny1.jpg,a\n../imgs/x2.png,b\n"
                        f"{absolute},a\n")
    return csv_path


def test_load_csv_groups(tmp_path):
    csv_path = _csv_set(tmp_path)
    ds = load_csv_groups(csv_path)
    assert ds.name == "pairs"
    # relative paths are relative to the CSV's folder
    assert [os.path.normpath(s.path) for s in ds.images] == [
        str(tmp_path / "imgs" / "x1.png"), str(tmp_path / "lists" / "y1.jpg"),
        str(tmp_path / "imgs" / "x2.png"), str(tmp_path / "elsewhere" / "z.png")]
    assert ds.groups == [1, 0, 1, 0]  # labels sorted: a -> 0, b -> 1
    assert ds.gnd["map"] == [{"ok": [2], "junk": [0]}, {"ok": [3], "junk": [1]},
                             {"ok": [0], "junk": [2]}, {"ok": [1], "junk": [3]}]


def test_load_csv_groups_missing_file_and_bad_header(tmp_path):
    csv_path = _csv_set(tmp_path)
    (tmp_path / "imgs" / "x2.png").unlink()
    with pytest.raises(MissingImagesError, match="x2.png"):
        load_csv_groups(csv_path)
    ds = load_csv_groups(csv_path, allow_missing=True)
    assert [Path(s.path).name for s in ds.images] == ["x1.png", "y1.jpg", "z.png"]
    assert ds.dropped == {"images": 1, "queries": 1}
    assert ds.gnd["map"] == [{"ok": [], "junk": [0]}, {"ok": [2], "junk": [1]}, {"ok": [1], "junk": [2]}]
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\nimgs/x1.png,a\n")
    with pytest.raises(ValueError, match="'image' and 'group'"):
        load_csv_groups(bad)


def test_load_csv_groups_with_utf8_bom(tmp_path):
    _img(tmp_path / "a.png")
    _img(tmp_path / "b.png")
    (tmp_path / "bom.csv").write_text("image,group\na.png,g\nb.png,g\n", encoding="utf-8-sig")
    assert load_csv_groups(tmp_path / "bom.csv").groups == [0, 0]


# --------------------------------------------------------------------------- load_dataset / split_groups


def test_load_dataset_detects_each_layout(tmp_path):
    rev = load_dataset(str(_revisited(tmp_path)))
    assert rev.name == "tiny" and set(rev.gnd) == {"easy", "medium", "hard"}
    assert "NOT cropped" in load_dataset(str(_revisited(tmp_path)), crop_queries=False).notes[0]

    ox = load_dataset(str(_oxford(tmp_path)))
    assert ox.name == "oxford5k" and len(ox.queries) == 2 and ox.queries[0].box is not None
    ox_root = load_dataset(str(_oxford(tmp_path / "flat", gt_in_root=True)))  # *_query.txt in the root
    assert _sorted(ox_root.gnd["map"]) == [{"ok": [1, 2], "junk": [3]}, {"ok": [5], "junk": []}]

    ukb = load_dataset(str(_ukbench(tmp_path)))
    assert ukb.name == "ukbench" and ukb.primary == "ukbench" and len(ukb.images) == 8
    ukb_full = load_dataset(str(_ukbench(tmp_path / "f", sub="full")))
    assert ukb_full.name == "ukbench"

    hol = load_dataset(str(_holidays(tmp_path)))
    assert hol.name == "holidays" and len(hol.queries) == 2
    hol_flat = load_dataset(str(_holidays(tmp_path / "flat2", sub=".")))
    assert hol_flat.name == "holidays"

    csv_ds = load_dataset(str(_csv_set(tmp_path / "c")))
    assert csv_ds.name == "pairs" and len(csv_ds.images) == 4

    root = tmp_path / "groups"
    _img(root / "g1" / "a.png")
    _img(root / "g2" / "b.png")
    grp = load_dataset(str(root))
    assert grp.name == "groups" and grp.groups == [0, 1] and set(grp.gnd) == {"map"}

    with pytest.raises(FileNotFoundError):
        load_dataset(str(tmp_path / "does-not-exist"))


def test_split_groups_on_ukbench(tmp_path):
    ds = load_ukbench(_ukbench(tmp_path, n=12))
    sub = split_groups(ds, [0, 2])
    assert sub.name == "ukbench[2 groups]" and sub.primary == "ukbench"
    assert sub.images == ds.images[0:4] + ds.images[8:12]
    assert sub.queries == sub.images
    assert sub.groups == [0, 0, 0, 0, 1, 1, 1, 1]
    assert _sorted(sub.gnd["map"])[4] == {"ok": [5, 6, 7], "junk": [4]}
    assert _sorted(sub.gnd["ukbench"])[4] == {"ok": [4, 5, 6, 7], "junk": []}
    assert _sorted(sub.gnd["ukbench"])[0] == {"ok": [0, 1, 2, 3], "junk": []}
    with pytest.raises(ValueError, match="no groups"):
        split_groups(load_revisited(_revisited(tmp_path)), [0])


def test_retrieval_dataset_validates_gnd():
    imgs = [ImageSpec("a.jpg"), ImageSpec("b.jpg")]
    with pytest.raises(ValueError, match="1 queries but 2"):
        RetrievalDataset("x", imgs, imgs[:1], {"map": [{"ok": [1]}, {"ok": [0]}]})
    with pytest.raises(ValueError, match="outside 0..1"):
        RetrievalDataset("x", imgs, imgs[:1], {"map": [{"ok": [2], "junk": []}]})
    with pytest.raises(ValueError, match="outside 0..1"):
        RetrievalDataset("x", imgs, imgs[:1], {"map": [{"ok": [1], "junk": [-1]}]})


# --------------------------------------------------------------------------- real data (../shared/data)

_RPARIS = SHARED_DATA / "rparis6k"
_UKBENCH = SHARED_DATA / "ukbench"


@pytest.mark.skipif(not (_RPARIS / "gnd_rparis6k.pkl").exists(),
                    reason=f"real Revisited Paris subset not found at {_RPARIS}")
def test_real_rparis6k():
    with open(_RPARIS / "gnd_rparis6k.pkl", "rb") as f:
        cfg = pickle.load(f, encoding="latin1")  # trusted, read-only project data
    ds = load_revisited(_RPARIS)
    assert ds.name == "rparis6k" and ds.primary == "medium"
    assert len(ds.images) == 238 and len(ds.queries) == 12
    assert _paths(ds.images) == [f"{n}.jpg" for n in cfg["imlist"]]
    assert _paths(ds.queries) == [f"{n}.jpg" for n in cfg["qimlist"]]
    for q, g in zip(ds.queries, cfg["gnd"]):
        assert q.box is not None and q.box == tuple(float(v) for v in g["bbx"])
    g0 = cfg["gnd"][0]
    assert sorted(ds.gnd["medium"][0]["ok"]) == sorted(list(g0["easy"]) + list(g0["hard"]))
    assert sorted(ds.gnd["medium"][0]["junk"]) == sorted(g0["junk"])
    assert sorted(ds.gnd["easy"][0]["ok"]) == sorted(g0["easy"])
    assert sorted(ds.gnd["hard"][0]["junk"]) == sorted(list(g0["junk"]) + list(g0["easy"]))
    assert load_dataset(str(_RPARIS)).name == "rparis6k"


@pytest.mark.skipif(not (_UKBENCH / "ukbench00000.jpg").exists(),
                    reason=f"real UKBench subset not found at {_UKBENCH}")
def test_real_ukbench():
    ds = load_ukbench(_UKBENCH)
    assert len(ds.images) == 600 and len(set(ds.groups)) == 150
    assert np.bincount(ds.groups).tolist() == [4] * 150
    assert ds.groups == [i // 4 for i in range(600)]
    assert _sorted(ds.gnd["ukbench"])[598] == {"ok": [596, 597, 598, 599], "junk": []}
    assert _sorted(ds.gnd["map"])[0] == {"ok": [1, 2, 3], "junk": [0]}
    assert ds.dropped == {}
    assert len(load_dataset(str(_UKBENCH)).images) == 600
