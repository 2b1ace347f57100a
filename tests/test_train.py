"""Fine-tuning (remap_lib.training.triplet): losses, mining, a tiny CPU run, resume, frozen parts, DDP."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from remap_lib.app import cli
from remap_lib.layers import functional as RF
from remap_lib.config import ModelConfig
from remap_lib.data.datasets import load_folder_groups
from remap_lib.evaluation.evaluate import describe, score
from remap_lib.training.triplet import TrainConfig, Trainer, check_no_overlap, matching_pairs, mine_hard_negatives

ROOT = Path(__file__).resolve().parents[1]


def test_triplet_loss_hand_computed():
    q = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    m = torch.tensor([[0.0, 1.0], [0.8, 0.6]])
    n = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # row 1: 0.5 * (0.1 + 2 - 0) = 1.05; row 2: 0.5 * max(0, 0.1 + 0.4 - 2) = 0
    assert RF.triplet_loss(q, m, n).item() == pytest.approx(0.525)
    assert RF.triplet_loss(q[1:], m[1:], n[1:], margin=2.0).item() == pytest.approx(0.5 * 0.4)


def test_contrastive_loss_hand_computed():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    match = torch.tensor([1, 0, 0])
    # match, d^2 = 2 -> 1.0; non-match d = 1.414 > 0.7 -> 0; non-match d = 0 -> 0.5 * 0.49
    assert RF.contrastive_loss(a, b, match).item() == pytest.approx((1.0 + 0 + 0.245) / 3)


def test_miner_picks_the_closest_non_matching_image():
    pool = np.array([[1, 0, 0], [0.9, 0.436, 0], [0, 1, 0], [0.6, 0.8, 0], [0, 0, 1]], dtype=np.float32)
    groups = np.array([0, 0, 1, 2, 3])
    # query 0 (group 0): closest other-group image is 3 (cos 0.6) -- image 1 is closer but same group
    # query 2 (group 1): closest other-group is 3 (cos 0.8)
    assert mine_hard_negatives(pool[[0, 2]], groups[[0, 2]], pool, groups).tolist() == [3, 3]


def test_matching_pairs_are_ordered_pairs_within_groups():
    pairs = matching_pairs([0, 0, 1, 1, 1, -1])
    assert len(pairs) == 2 + 6 and set(map(tuple, pairs.tolist())) >= {(0, 1), (1, 0), (2, 4), (4, 3)}
    with pytest.raises(ValueError):
        matching_pairs([0, 1, 2])


@pytest.fixture(scope="module")
def tiny_groups(tmp_path_factory) -> Path:
    """6 real photos, each with an occluded and a cluttered view, 96 px: hard for the untrained model."""
    from skimage import data as skdata

    from remap_lib.data import demo_data as D

    root = tmp_path_factory.mktemp("train_groups")
    background = Image.open(Path(skdata.data_dir) / "gravel.png").convert("RGB")
    for name in ["chelsea.png", "astronaut.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "camera.png"]:
        img = Image.open(Path(skdata.data_dir) / name).convert("RGB")
        img.thumbnail((96, 96))
        g = root / Path(name).stem
        g.mkdir()
        img.save(g / "a.png")
        rng = np.random.default_rng(len(name))
        D.view_occlusion(img, rng, background).save(g / "b.png")
        D.view_clutter(img, rng, background.resize((96, 96))).save(g / "c.png")
    return root


def _cfg(root, out, **kw) -> TrainConfig:
    # ImageNet weights: a randomly initialised net saturates its ReLU6 at once and collapses
    base = dict(train=str(root), model=ModelConfig(head="remap", levels=2, image_sizes=[64]),
                whitening_init="none", accumulate=4, steps=4, remine_every=12, lr=0.01, out_dir=str(out),
                checkpoint_every=1, val_every=0, device="cpu", seed=0)
    base.update(kw)
    return TrainConfig(**base)


def test_overlap_with_the_evaluation_set_is_refused(tmp_path, tiny_groups):
    ds = load_folder_groups(tiny_groups)
    copy = tmp_path / "eval" / "x"
    copy.mkdir(parents=True)
    shutil.copy(tiny_groups / "coffee" / "a.png", copy / "renamed.png")  # same bytes, other name
    shutil.copy(tiny_groups / "coffee" / "b.png", copy / "other.png")
    with pytest.raises(ValueError, match="also in the evaluation set"):
        check_no_overlap(ds, {"eval": load_folder_groups(tmp_path / "eval")})


def test_tiny_run_lowers_the_loss_and_raises_training_map(tmp_path, tiny_groups):
    ds = load_folder_groups(tiny_groups)
    trainer = Trainer(_cfg(tiny_groups, tmp_path / "run", steps=12, checkpoint_every=100), train_set=ds)
    before = score(ds, *describe(trainer.model, ds, None, "cpu", progress=False))["map"]["map"]
    history = trainer.run()
    after = score(ds, *describe(trainer.model, ds, None, "cpu", progress=False))["map"]["map"]
    losses = [r["loss"] for r in history if "loss" in r]
    assert len(losses) == 12
    assert np.mean(losses[-4:]) < 0.7 * np.mean(losses[:4])
    assert after > before + 0.2  # measured: 0.31 -> 0.87
    log = (tmp_path / "run" / "log.csv").read_text().splitlines()
    assert log[0].startswith("step,triplets,loss") and len(log) == 1 + 1 + 12  # header, step 0, 12 updates
    assert (tmp_path / "run" / "model.pt").exists()


def test_pool_described_on_openvino_equals_torch_and_follows_every_update(tmp_path, tiny_groups):
    """Mining and whitening see the current weights: a stale export would fail the second comparison."""
    ds = load_folder_groups(tiny_groups)
    trainer = Trainer(_cfg(tiny_groups, tmp_path / "run", engine="openvino"), train_set=ds)
    trainer.prepare()
    assert trainer.inference_engine(len(ds.images)).name == "openvino"
    before = trainer._describe()
    trainer.cfg.engine = "torch"
    assert trainer.inference_engine(len(ds.images)) is None
    reference = trainer._describe()
    assert before.shape == (18, 1600) and np.abs(before - reference).max() <= 1e-5
    with torch.no_grad():  # an optimiser step changes the weights in place, as this does
        for p in trainer.model.backbone.stages["head"].parameters():
            p.mul_(1.5)
    trainer.cfg.engine = "openvino"
    after = trainer._describe()
    trainer.cfg.engine = "torch"
    assert np.abs(after - trainer._describe()).max() <= 1e-5
    assert np.abs(after - before).max() > 1e-2
    # "auto": OpenVINO on a CPU from 64 images on, torch below (the export would cost more than it saves)
    trainer.cfg.engine = "auto"
    assert trainer.inference_engine(63) is None and trainer.inference_engine(64).name == "openvino"


def test_whitening_init_and_first_mining_describe_the_pool_once(tmp_path, tiny_groups, monkeypatch):
    ds = load_folder_groups(tiny_groups)
    trainer = Trainer(_cfg(tiny_groups, tmp_path / "run", engine="torch", whitening_init="pca"), train_set=ds)
    calls = []
    pool = trainer.model.pool
    monkeypatch.setattr(trainer.model, "pool", lambda x: calls.append(1) or pool(x))
    trainer.prepare()  # PCA-whitening of the pooled pool
    assert len(calls) == 18
    trainer.triplets(0, 4)  # the first mining: same weights, whitened by the new FC, no second pass
    assert len(calls) == 18
    whitened = trainer._describe()
    with torch.no_grad():
        direct = np.concatenate([trainer.model(trainer._prepare(trainer.images(i))).numpy() for i in range(18)])
    assert np.abs(whitened - direct).max() <= 1e-5  # = the model's own forward, FC included
    with torch.no_grad():
        next(trainer.model.streams.parameters()).add_(0.5)  # an update of α: the pool is described again
    trainer._describe()
    assert len(calls) == 36 + 18  # 18 for the direct forward above, 18 for the new description


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, tiny_groups):
    ds = load_folder_groups(tiny_groups)
    Trainer(_cfg(tiny_groups, tmp_path / "full"), train_set=ds).run()
    Trainer(_cfg(tiny_groups, tmp_path / "parts", steps=2), train_set=ds).run()  # "interrupted" after 2
    resumed = Trainer(_cfg(tiny_groups, tmp_path / "parts"), train_set=ds)
    history = resumed.run()  # picks the checkpoint up: same next triplet, same negatives and optimiser
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "parts" / "checkpoint.pt", weights_only=True)
    assert a["triplet"] == b["triplet"] == 16
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert [r["loss"] for r in history[1:]] == [r["loss"] for r in
                                                json.loads(a["history"])[1:]]
    with pytest.raises(ValueError, match="different training config"):
        Trainer(_cfg(tiny_groups, tmp_path / "parts", lr=0.5), train_set=ds).run()


def test_frozen_parts_do_not_move(tmp_path, tiny_groups):
    ds = load_folder_groups(tiny_groups)
    trainer = Trainer(_cfg(tiny_groups, tmp_path / "run", steps=2, train_alpha=False, whitening_init="pca",
                           train_whitening=False), train_set=ds)
    conv = trainer.model.backbone.stages["head"][0].weight.detach().clone()
    trainer.run()
    assert torch.equal(trainer.model.region_weights()["head"], torch.ones(8))  # "RMAC": alpha = 1, fixed
    assert not torch.equal(trainer.model.backbone.stages["head"][0].weight, conv)  # the backbone trained
    fc = trainer.model.whiten.weight.detach().clone()
    assert trainer.model.whiten.weight.requires_grad is False and torch.equal(trainer.model.whiten.weight, fc)


def test_alpha_learned_and_non_negative(tmp_path, tiny_groups):
    ds = load_folder_groups(tiny_groups)
    trainer = Trainer(_cfg(tiny_groups, tmp_path / "run", steps=3, lr=5.0, train_backbone=False), train_set=ds)
    trainer.run()
    alpha = trainer.model.region_weights()["head"]
    assert not torch.equal(alpha, torch.ones(8)) and (trainer.model.streams["head"].alpha.raw >= 0).all()


def test_config_yaml(tmp_path):
    (tmp_path / "c.yaml").write_text("train: demo\nsteps: 3\nmodel: {head: rmac, levels: 3}\n")
    cfg = TrainConfig.load(tmp_path / "c.yaml")
    assert cfg.steps == 3 and cfg.model.head == "rmac" and cfg.lr == 1e-3 and cfg.accumulate == 64
    (tmp_path / "bad.yaml").write_text("trian: demo\n")
    with pytest.raises(ValueError, match="unknown training config keys"):
        TrainConfig.load(tmp_path / "bad.yaml")


class _Killed(Exception):
    """Stands in for SIGKILL: the run stops right after logging a step."""


def _deterministic_log(out: Path) -> list[tuple[str, str, str]]:
    with open(out / "log.csv", newline="") as f:
        return [(r["step"], r["triplets"], r["loss"]) for r in csv.DictReader(f)]


@pytest.mark.parametrize("kill_at", [1, 3])  # before the first checkpoint; after the one at step 2
def test_log_after_kill_and_resume_has_one_row_per_step(tmp_path, tiny_groups, monkeypatch, kill_at):
    ds = load_folder_groups(tiny_groups)
    Trainer(_cfg(tiny_groups, tmp_path / "full", checkpoint_every=2), train_set=ds).run()

    log_step = Trainer._log

    def log_then_die(self, row, writer):
        log_step(self, row, writer)
        if row["step"] == kill_at:
            raise _Killed

    monkeypatch.setattr(Trainer, "_log", log_then_die)
    with pytest.raises(_Killed):
        Trainer(_cfg(tiny_groups, tmp_path / "killed", checkpoint_every=2), train_set=ds).run()
    monkeypatch.undo()
    Trainer(_cfg(tiny_groups, tmp_path / "killed", checkpoint_every=2), train_set=ds).run()

    rows = _deterministic_log(tmp_path / "killed")
    assert [r[0] for r in rows] == ["0", "1", "2", "3", "4"]
    assert rows == _deterministic_log(tmp_path / "full")  # same steps, triplets and losses


def _yaml_cfg(tmp_path, tiny_groups, **kw) -> Path:
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(_cfg(tiny_groups, tmp_path / "run", **kw).to_dict()))
    return path


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("option,value", [("--steps", "0"), ("--steps", "-3"),
                                          ("--checkpoint-every", "0"), ("--checkpoint-every", "-2")])
def test_cli_train_refuses_non_positive_counts(tmp_path, tiny_groups, capsys, option, value):
    config = _yaml_cfg(tmp_path, tiny_groups)
    assert cli.main(["train", "--config", str(config), option, value]) == 2
    line = _one_error_line(capsys)
    assert option[2:].replace("-", "_") in line and line.endswith(value)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.parametrize("key,value", [("steps", 0), ("steps", -1), ("checkpoint_every", 0),
                                       ("checkpoint_every", -5), ("accumulate", 0), ("val_every", -1)])
def test_config_yaml_refuses_bad_counts_naming_the_value(tmp_path, key, value):
    (tmp_path / "c.yaml").write_text(f"train: demo\n{key}: {value}\n")
    with pytest.raises(ValueError) as err:
        TrainConfig.load(tmp_path / "c.yaml")
    assert key in str(err.value) and str(err.value).endswith(str(value))


def test_cli_checkpoint_every_is_used_and_may_change_on_resume(tmp_path, tiny_groups, monkeypatch):
    config = _yaml_cfg(tmp_path, tiny_groups, steps=1)
    assert cli.main(["train", "--config", str(config)]) == 0
    # a resumed run may checkpoint at another interval: it does not change what is trained
    assert cli.main(["train", "--config", str(config), "--steps", "3", "--checkpoint-every", "2"]) == 0
    saved, save = [], Trainer.save_checkpoint
    monkeypatch.setattr(Trainer, "save_checkpoint", lambda self, opt: (saved.append(self.step), save(self, opt)))
    assert cli.main(["train", "--config", str(config), "--steps", "7", "--checkpoint-every", "3"]) == 0
    assert saved == [6, 7]  # every 3 updates, and at the end
    assert [r[0] for r in _deterministic_log(tmp_path / "run")] == [str(s) for s in range(8)]


def _not_a_training_checkpoint(path: Path) -> None:
    torch.save({"format": "remap-train-v1"}, path)  # the right tag, nothing else


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "tensor", "model_file", "tag_only"])
def test_corrupt_checkpoint_is_refused_with_advice(tmp_path, tiny_groups, damage):
    ds = load_folder_groups(tiny_groups)
    cfg = _cfg(tiny_groups, tmp_path / "run", steps=1)
    path = tmp_path / "run" / "checkpoint.pt"
    if damage in ("truncated", "model_file"):
        trainer = Trainer(cfg, train_set=ds)
        trainer.run()
        if damage == "model_file":  # a valid torch file: the model, not the training state
            shutil.copy(tmp_path / "run" / "model.pt", path)
        else:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.parent.mkdir(parents=True)
        if damage == "garbage":
            path.write_bytes(np.random.default_rng(0).bytes(4096))
        elif damage == "empty":
            path.write_bytes(b"")
        elif damage == "tensor":
            torch.save(torch.zeros(3), path)
        else:
            _not_a_training_checkpoint(path)
    with pytest.raises(ValueError) as err:
        Trainer(cfg, train_set=ds).prepare()
    message = str(err.value)
    assert str(path) in message and "delete it" in message and "good copy" in message


def test_cli_train_with_a_garbage_checkpoint_prints_one_error_line(tmp_path, tiny_groups, capsys):
    config = _yaml_cfg(tmp_path, tiny_groups)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"\x80\x02garbage" * 100)
    assert cli.main(["train", "--config", str(config)]) == 2
    assert "checkpoint.pt" in _one_error_line(capsys)


@pytest.mark.slow
def test_two_process_ddp_on_cpu_ends_with_identical_weights(tmp_path, tiny_groups):
    cfg = _cfg(tiny_groups, tmp_path / "ddp", steps=2).to_dict()
    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "remap_lib.app.cli", "train", "--config", str(tmp_path / "ddp.yaml")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    hashes = summary["weight_sha256_per_rank"]
    assert summary["world_size"] == 2 and len(hashes) == 2 and hashes[0] == hashes[1]
    assert summary["triplets"] == 8


def test_whitening_init_keeps_training_distances_informative(tmp_path, tiny_groups):
    """Whitening N images in N-1 dims makes them equidistant (loss = margin/2 everywhere): the default avoids it."""
    ds = load_folder_groups(tiny_groups)
    trainer = Trainer(_cfg(tiny_groups, tmp_path / "run", whitening_init="pca"), train_set=ds)
    trainer.prepare()
    assert trainer.model.output_dim == len(ds.images) // 4  # 18 images -> 4 dims
    x = trainer._describe()
    d = 2 - 2 * x @ x.T
    off = ~np.eye(len(x), dtype=bool)
    assert d[off].std() > 0.1
    from remap_lib.layers.whitening import learn_pca_whitening

    pooled = trainer._describe(whitened=False)
    full = learn_pca_whitening(pooled, len(pooled) - 1).apply(pooled)
    assert (2 - 2 * full @ full.T)[off].std() < 1e-3  # the degenerate case, for contrast


def test_a_pairs_file_replaces_the_same_group_pairs(tmp_path, tiny_groups):
    """Kept pairs (both orders) become the positives; dropped images leave the pool; other rows are skipped."""
    rows = [("coffee/a.png", "coffee/b.png", "kept"), ("chelsea/a.png", "chelsea/c.png", "kept"),
            ("rocket/a.png", "rocket/b.png", "too_easy"), ("camera/a.png", "chelsea/a.png", "kept")]
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text("query,positive,group,inliers,status\n" + "".join(
        f"{tiny_groups / a},{tiny_groups / b},g,10,{s}\n" for a, b, s in rows))
    (tmp_path / "pairs.json").write_text(json.dumps({"dropped": [{"path": str(tiny_groups / "astronaut" / "c.png"),
                                                                  "group": "astronaut"}]}))
    trainer = Trainer(_cfg(tiny_groups, tmp_path / "run", steps=1, pairs=str(csv_path)),
                      train_set=load_folder_groups(tiny_groups))
    names = [str(Path(s.path).relative_to(tiny_groups)) for s in trainer.train_set.images]
    assert len(names) == 17 and "astronaut/c.png" not in names
    got = {(names[a], names[b]) for a, b in trainer.pairs.tolist()}
    assert got == {("coffee/a.png", "coffee/b.png"), ("coffee/b.png", "coffee/a.png"),
                   ("chelsea/a.png", "chelsea/c.png"), ("chelsea/c.png", "chelsea/a.png")}
    assert len(trainer.groups) == 17
    trainer.run()
    assert trainer.step == 1


def test_tiny_run_on_real_landmark_photos_lowers_the_loss(tmp_path):
    """Three landmarks_fr landmarks, 6 photos each, at 96 px (the issue's smoke test on the real training data)."""
    source = ROOT.parent / "shared" / "data" / "landmarks_fr"
    if not source.is_dir():
        pytest.skip(f"{source} is absent (the landmark photos live in ../shared/data, next to the repository)")
    root = tmp_path / "landmarks"
    for name in ("aix_rotonde", "avignon_pont_avignon", "marseille_la_major"):
        (root / name).mkdir(parents=True)
        for photo in sorted((source / name).glob("*.jpg"))[:6]:
            (root / name / photo.name).symlink_to(photo)
    ds = load_folder_groups(root)
    assert len(ds.images) == 18 and len(set(ds.groups)) == 3
    trainer = Trainer(_cfg(root, tmp_path / "run", model=ModelConfig(head="remap", levels=2, image_sizes=[96]),
                           steps=10, accumulate=6, remine_every=60, lr=0.01, checkpoint_every=100), train_set=ds)
    trainer.prepare()
    triplets = trainer.triplets(0, 60)  # the run's triplets, negatives mined by the ImageNet model

    def loss_on(triplets) -> float:  # mean triplet loss of fixed triplets under the current weights
        with torch.no_grad():
            return float(np.mean([trainer._loss(torch.cat([trainer.model(trainer._prepare(trainer.images(int(i))))
                                                           for i in t])).item() for t in triplets]))

    before = loss_on(triplets)
    history = trainer.run()
    assert len([r for r in history if "loss" in r]) == 10
    after = loss_on(triplets)
    assert before > 0.02 and after < 0.5 * before, (before, after)
