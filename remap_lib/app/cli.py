"""The ``remap`` command line.

    remap backbones                      list backbones and their layers
    remap extract IMAGES... -o OUT       describe images (resumable; --shard K/N, or under torchrun)
    remap merge OUT SHARD...             join the folders of `extract --shard`
    remap whiten OUT -o whitening.npz    learn PCA-whitening from extracted descriptors
    remap evaluate -d DATASET -m METHOD  methods x datasets -> table (CSV/JSON)
    remap klw -d DATASET -o klw.json     KL-divergence region weights from a dataset with groups
    remap train --config FILE            fine-tune with triplets and hard negatives (resumes)
    remap verify-pairs DATASET -o CSV    training pairs verified by SIFT + RANSAC inliers (paper §IV-A)
    remap train-rpn --config FILE        learned region proposals (Gordo et al.) from verified pairs (resumes)
    remap index build|add|search         faiss index of extracted descriptors (Flat, PQ, IVF-PQ...)
    remap demo-data                      build the embedded demo benchmark
    remap download NAME --root DIR       fetch a standard benchmark (online users)
    remap demo                           the demo benchmark end to end (tables and a picture)
    remap notebooks [-p params.yaml]     the main job: run the guided-tour notebooks (papermill)

extract, evaluate and klw take the model options (``--config FILE``,
``--checkpoint``, ``--backbone``, ``--head``, ``--layers``, ``--levels``,
``--image-size``, ``--multiscale``, ``--whitening``, ``--klw``...).  Every
option a command accepts acts; one that cannot act for a command is refused
with one ``error:`` line (exit 2), never ignored (tests/test_cli_options.py
checks each).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ..config import HEADS, PAPER_MULTISCALE, ModelConfig
from ..describe.extraction_files import check_output_folder

log = logging.getLogger("remap")

ENGINES = ("auto", "torch", "openvino")
PRECISIONS = ("f32", "bf16")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad option as one ``error: ...`` line (exit code 2), like every other error."""

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message}\n")


def _int_at_least(text: str, minimum: int, requirement: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{text} must be {requirement}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1."""
    return _int_at_least(text, 1, "at least 1")


def nonnegative_int(text: str) -> int:
    """argparse type: an integer ≥ 0."""
    return _int_at_least(text, 0, "0 or more")


def worker_count(text: str) -> int:
    """argparse type: image-decoding processes, 0 (decode in the main process) up to 4 per CPU core."""
    value = nonnegative_int(text)
    cores = os.cpu_count() or 1
    if value > 4 * cores:
        raise argparse.ArgumentTypeError(f"{value} workers for {cores} CPU cores; use at most {4 * cores}")
    return value


def image_size_wh(text: str) -> tuple[int, int]:
    """argparse type: ``WIDTHxHEIGHT`` in pixels, e.g. ``512x384``."""
    parts = text.lower().split("x")
    try:
        width, height = (int(v) for v in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT (e.g. 512x384)") from None
    if width < 32 or height < 32:
        raise argparse.ArgumentTypeError(f"{text}: both sides must be at least 32 pixels")
    return width, height




def _check_output_file(path) -> None:
    if path and os.path.isdir(path):
        raise IsADirectoryError(f"output file {path} is a folder; give a file name")


class _Refused(argparse.Action):
    """A shared option that one command cannot use: given, it ends the parse with the reason.

    The model options are shared by extract, evaluate and klw, but not every
    one means something to every command (klw resizes every image to
    ``--input-size``, so ``--image-size`` would change nothing).  An option
    accepted and dropped lets a user believe it acted; this one stops with one
    ``error:`` line saying why (exit 2) before anything is read or written, and
    stays out of ``--help``.
    """

    def __init__(self, option_strings, dest, reason, **_):
        super().__init__(option_strings, dest, nargs="*", default=None, help=argparse.SUPPRESS)
        self.reason = reason

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} {self.reason}")


def _add_model_args(p: argparse.ArgumentParser, refused: dict[str, str] | None = None) -> None:
    """The model options; ``refused`` maps the dests this command cannot use to why (see :class:`_Refused`)."""
    refused = refused or {}
    g = p.add_argument_group("model")

    def add(*flags, **kwargs):
        dest = flags[0].lstrip("-").replace("-", "_")
        if dest in refused:
            g.add_argument(*flags, action=_Refused, reason=refused[dest])
        else:
            g.add_argument(*flags, **kwargs)

    add("--config", help="model config (YAML/JSON); the options below override it")
    add("--checkpoint", help="a checkpoint saved by RetrievalModel.save (config and weights included; "
        "--image-size/--multiscale/--upscale may change its input sizes)")
    add("--backbone", help="backbone name (default efficientnet_lite0)")
    add("--weights", help='"imagenet" (default), a local checkpoint file, or "random"')
    add("--head", choices=HEADS, help="pooling head (default remap)")
    add("--layers", nargs="+", help="paper layer numbers (1 = last conv block) or stage names")
    add("--levels", type=int, help="region-grid scales S (4 -> 40 regions)")
    add("--image-size", type=positive_int, help="longer side of the resized input (default 1024)")
    add("--multiscale", action="store_true", help="paper Eq. 3: 2*X(1024) + 1.4*X(1280)")
    add("--upscale", action="store_true", default=None,
        help="also enlarge images smaller than --image-size (off: the standard protocol)")
    add("--whitening", help="PCA-whitening file (.npz) from `remap whiten`")
    add("--klw", help="KL region weights (.json) from `remap klw` for the REMAP head")


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("inference engine")
    g.add_argument("--engine", choices=ENGINES, default="auto",
                   help="auto (OpenVINO on a CPU, torch on a GPU), torch or openvino")
    g.add_argument("--precision", choices=PRECISIONS, default="f32",
                   help="f32 (equal to torch) or bf16 (faster on CPUs with bf16, approximate)")


# What a checkpoint holds and these options would change: with --checkpoint they are refused.
_CHECKPOINT_FIXES = ("config", "backbone", "weights", "head", "layers", "levels")


def _input_size_options(args) -> dict:
    """The config values --image-size, --multiscale and --upscale set ({} when none is given).

    They change how images are resized, no weight: the one part of a
    model that the command line may change on a checkpoint too.
    """
    out = {}
    if getattr(args, "multiscale", None):
        if getattr(args, "image_size", None):
            raise ValueError("--multiscale describes at the paper's sizes "
                             f"{', '.join(map(str, PAPER_MULTISCALE['image_sizes']))}; drop --image-size")
        out.update({k: list(v) for k, v in PAPER_MULTISCALE.items()})
    elif getattr(args, "image_size", None):
        out["image_sizes"], out["scale_weights"] = [args.image_size], [1.0]
    if getattr(args, "upscale", None):
        out["upscale"] = True
    return out


def config_from_args(args, head: str | None = None) -> ModelConfig:
    """The :class:`ModelConfig` the command-line options describe (``head`` overrides ``--head``)."""
    data = ModelConfig.load(args.config).to_dict() if args.config else {}
    for key in ("backbone", "weights", "head", "layers", "levels"):
        if getattr(args, key, None) is not None:
            data[key] = getattr(args, key)
    if head is not None:
        data["head"] = head
    if "head" in data and not args.layers and not args.config:
        data["layers"] = None  # the head's default layers
    data.update(_input_size_options(args))
    data["whitening"], data["dim"] = False, None
    return ModelConfig(**data)


def model_sources(args) -> dict:
    """The files a model was built from (absolute paths), recorded with its descriptors and index."""
    return {key: os.path.abspath(getattr(args, key)) for key in ("checkpoint", "klw", "whitening")
            if getattr(args, key, None)}


def model_from_args(args, config: ModelConfig | None = None, head: str | None = None):
    """Build the :class:`RetrievalModel` the command-line options describe, then load --klw and --whitening.

    Without --checkpoint it is built from ``config`` (index search: the
    index's recorded config) or from the options with ``head`` (a command that
    needs one head).  A checkpoint holds its config and every weight: see
    :func:`_checkpoint_model`.
    """
    from ..describe.model import RetrievalModel
    from ..layers.whitening import PCAWhitening

    for key, path in model_sources(args).items():
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--{key} {path}: no such file")
    if args.checkpoint:
        model = _checkpoint_model(args, config, head)
    else:
        model = RetrievalModel(config if config is not None else config_from_args(args, head=head))
    if getattr(args, "klw", None):
        from ..training.klw import KLWeights

        KLWeights.load(args.klw).apply(model)
    if getattr(args, "whitening", None):
        model.set_whitening(PCAWhitening.load(args.whitening))
    return model


def _checkpoint_model(args, config: ModelConfig | None, head: str | None):
    """The model of ``--checkpoint``, at the input sizes of ``config`` or of the options.

    The options that would change what the file holds (``--config``,
    ``--backbone``, ``--head``...) are refused, never silently dropped; so is a
    checkpoint of another head than the command needs (``head``).  The input
    sizes change no weight: ``--image-size``/``--multiscale``/``--upscale`` (or
    ``config``, the index's record) set them, else the checkpoint's stay.
    """
    from ..describe.model import RetrievalModel

    fixed = [f"--{key.replace('_', '-')}" for key in _CHECKPOINT_FIXES if getattr(args, key, None) is not None]
    if fixed:
        raise ValueError(f"--checkpoint {args.checkpoint} holds the whole model (config and weights); "
                         f"{', '.join(fixed)} would change it: drop {'them' if len(fixed) > 1 else 'it'}")
    model = RetrievalModel.load(args.checkpoint)
    if head is not None and model.config.head != head:
        raise ValueError(f"--checkpoint {args.checkpoint} holds a {model.config.head} model; "
                         f"this command needs a {head} one")
    sizes = ({key: getattr(config, key) for key in ("image_sizes", "scale_weights", "upscale")}
             if config is not None else _input_size_options(args))
    if sizes:
        model.config = ModelConfig.from_dict({**model.config.to_dict(), **sizes})
    return model


def _input_images(args):
    """The images of ``remap extract``: a folder, files (and folders), or ``--list FILE``; checked to exist."""
    from ..data.images import list_images

    if args.list:
        if args.images:
            raise ValueError(f"give image paths or --list {args.list}, not both")
        if not os.path.isfile(args.list):
            raise FileNotFoundError(f"--list {args.list}: no such file")
        with open(args.list, encoding="utf-8", errors="surrogateescape") as f:  # any name the file system allows
            images = [line.rstrip("\n") for line in f if line.strip()]
        if not images:
            raise ValueError(f"--list {args.list} names no images")
        return images
    missing = [p for p in args.images if not os.path.lexists(p)]
    if missing:
        raise FileNotFoundError(f"{missing[0]} does not exist" + (f" (and {len(missing) - 1} more)"
                                                                  if len(missing) > 1 else ""))
    if len(args.images) == 1:
        return args.images[0]
    images = []
    for p in args.images:
        images.extend(list_images(p) if os.path.isdir(p) else [p])
    if not images:
        raise FileNotFoundError(f"no images in {', '.join(args.images)}")
    return images


def cmd_backbones(args) -> int:
    from ..nets.backbones import BACKBONES

    for name, spec in BACKBONES.items():
        print(f"{name:20s} {spec.description}")
    return 0


def cmd_extract(args) -> int:
    from ..describe.extract import extract_descriptors, extract_distributed, parse_shard, resolve_images

    check_output_folder(args.out)
    shard = parse_shard(args.shard) if args.shard else None
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if shard and distributed:
        raise ValueError("--shard splits the work without torchrun; under torchrun the ranks split it")
    images = resolve_images(_input_images(args))  # errors (missing, empty) before anything is built or written
    model = model_from_args(args)
    options = dict(batch_size=args.batch_size, device=args.device, num_workers=args.workers,
                   on_error=args.on_error, progress=not args.quiet, save_every=args.save_every,
                   engine=args.engine, precision=args.precision, sources=model_sources(args))
    if distributed:
        result = extract_distributed(model, images, args.out, **options)
        if result is None:  # ranks other than 0: rank 0 reports
            return 0
    else:
        result = extract_descriptors(model, images, args.out, shard=shard, **options)
    print(f"{len(result.paths)} descriptors of dimension {result.descriptors.shape[1]} in {args.out}"
          + (f"; {len(result.failed)} images failed (see {args.out}/failed.jsonl)" if result.failed else ""))
    return 1 if result.failed and args.on_error == "raise" else 0


def cmd_merge(args) -> int:
    from ..describe.extract import merge_extractions

    check_output_folder(args.out)
    result = merge_extractions(args.out, args.shards)
    print(f"{len(result.paths)} descriptors from {len(args.shards)} shards in {args.out}"
          + (f"; {len(result.failed)} images failed (see {args.out}/failed.jsonl)" if result.failed else ""))
    return 0


def cmd_whiten(args) -> int:
    from ..describe.extract import load_descriptors
    from ..layers.whitening import learn_pca_whitening

    _check_output_file(args.out)
    desc = load_descriptors(args.descriptors)
    if desc.config["model"].get("whitening"):
        print("error: these descriptors are already whitened; extract without --whitening", file=sys.stderr)
        return 2
    whitening = learn_pca_whitening(desc.descriptors, args.dim)
    whitening.save(args.out)
    print(f"PCA-whitening {whitening.input_dim} -> {whitening.output_dim} learned from "
          f"{len(desc.paths)} descriptors, saved to {args.out}")
    return 0


def cmd_demo(args) -> int:
    from .demo import DEMO_IMAGE_SIZE, run_demo

    check_output_folder(args.out)
    run_demo(out_dir=args.out, image_size=args.image_size or DEMO_IMAGE_SIZE, progress=not args.quiet,
             engine=args.engine, precision=args.precision)
    return 0


def cmd_notebooks(args) -> int:
    from .notebooks import run_notebooks

    params = _notebook_parameters(args.parameters) if args.parameters else {}
    _check_notebook_names(args.only)
    check_output_folder(args.out)
    return 0 if run_notebooks(args.out, params, only=args.only) else 1


def _notebook_parameters(path) -> dict:
    """``-p params.yaml``: a mapping of parameter names to values (plain YAML, checked like every config)."""
    from ..config import load_yaml

    params = load_yaml(path) or {}
    if not isinstance(params, dict):
        raise ValueError(f"{path}: notebook parameters must be a mapping of names to values, "
                         f"got {type(params).__name__}")
    return params


def _check_notebook_names(only) -> None:
    """``--only``: every word must name a notebook, or the run would silently skip what was asked for."""
    from .notebooks import notebook_paths

    names = [p.name for p in notebook_paths()]
    unknown = [word for word in only or () if not any(word in name for name in names)]
    if unknown:
        raise ValueError(f"--only {' '.join(unknown)} matches no notebook; they are {', '.join(names)}")


def cmd_demo_data(args) -> int:
    from ..data.datasets import load_demo_set
    from ..data.demo_data import build_demo_set

    root = build_demo_set(args.out, force=args.force)
    print(load_demo_set(root, build=False).summary())
    print(f"in {root}")
    return 0


def cmd_klw(args) -> int:
    from pathlib import Path

    from ..training.klw import estimate_kl_weights

    _check_output_file(args.out)
    dataset = next(iter(_parse_datasets([args.dataset], True, False).values()))
    if args.groups:
        from ..data.datasets import parse_group_range, split_groups

        dataset = split_groups(dataset, parse_group_range(args.groups))
    model = model_from_args(args, head="remap")  # --checkpoint: the fine-tuned backbone's regions
    width, height = args.input_size
    result = estimate_kl_weights(model, dataset, input_size=(width, height), max_matching=args.matching,
                                 nonmatching_per_matching=args.nonmatching_ratio, bins=args.bins,
                                 direction=args.direction, seed=args.seed, device=args.device,
                                 progress=not args.quiet, engine=args.engine, precision=args.precision)
    result.settings["sources"] = model_sources(args)
    result.save(args.out)
    for layer, w in result.weights.items():
        print(f"{layer}: {len(w)} regions, KL min {w.min():.3f} mean {w.mean():.3f} max {w.max():.3f}")
    print(f"{result.settings['matching_pairs']} matching / {result.settings['nonmatching_pairs']} non-matching "
          f"pairs from {result.settings['images']} images; saved {args.out}")
    if args.plots:
        from .plots import plot_distance_histograms, plot_kl_weights

        out = Path(args.plots)
        out.mkdir(parents=True, exist_ok=True)
        for layer in result.weights:
            plot_distance_histograms(result, layer, path=out / f"histograms_{layer}.png").clf()
        plot_kl_weights(result, dataset.images[0], path=out / "kl_weights.png").clf()
        print(f"figures in {out}")
    return 0


def cmd_train(args) -> int:
    from dataclasses import replace

    from ..training.triplet import TrainConfig, train

    cfg = TrainConfig.load(args.config)
    overrides = {key: getattr(args, key) for key in ("steps", "checkpoint_every", "out_dir", "device")
                 if getattr(args, key) is not None}
    cfg = replace(cfg, **overrides)  # checked again by TrainConfig, like the YAML values
    history = train(cfg)
    if history and int(os.environ.get("RANK", "0")) == 0:
        first, last = history[0], history[-1]
        print(f"{last['step']} updates, {last['triplets']} triplets; loss {last.get('loss')}; "
              f"validation mAP {first.get('val_map')} -> {last.get('val_map')}; outputs in {cfg.out_dir}")
    return 0


def cmd_train_rpn(args) -> int:
    from dataclasses import replace

    from ..training.rpn import RPNTrainConfig, train_rpn

    cfg = RPNTrainConfig.load(args.config)
    overrides = {key: getattr(args, key) for key in ("steps", "checkpoint_every", "out_dir", "device")
                 if getattr(args, key) is not None}
    cfg = replace(cfg, **overrides)  # checked again by RPNTrainConfig, like the YAML values
    history = train_rpn(cfg)
    last = history[-1] if history else {}
    recall = {k: v for k, v in last.items() if k.startswith("val_recall")}
    print(f"{last.get('step', 0)} updates; loss {last.get('loss')}"
          + (f"; held-out box recall at IoU 0.5: {recall}" if recall else "")
          + f"; model with the trained proposals: {os.path.join(cfg.out_dir, 'model.pt')}")
    return 0


def cmd_verify_pairs(args) -> int:
    from ..training.pairs import verify_pairs
    from ..training.verification import MatchSettings

    _check_output_file(args.out)
    if args.min_inliers > args.max_inliers:
        raise ValueError(f"--min-inliers {args.min_inliers} is above --max-inliers {args.max_inliers}")
    cache = args.cache or os.path.splitext(args.out)[0] + ".cache.jsonl"
    settings = MatchSettings(max_side=args.max_side, method=args.method, ransac_threshold=args.ransac_threshold)
    result = verify_pairs(args.dataset, pairs_per_group=args.pairs_per_group, min_inliers=args.min_inliers,
                          max_inliers=args.max_inliers, drop_unverified=args.drop_unverified,
                          clean_tries=args.clean_tries, seed=args.seed, settings=settings, cache=cache,
                          workers=args.workers, progress=not args.quiet)
    csv_path, report = result.save(args.out)
    groups = result.per_group()
    width = max(len(g) for g in groups)
    print(f"{'group':{width}s} images dropped sampled  kept too_easy too_hard failed")
    for g, c in groups.items():
        print(f"{g:{width}s} {c['images']:6d} {c['dropped']:7d} {c['sampled']:7d} {c['kept']:5d} {c['too_easy']:8d} "
              f"{c['too_hard']:8d} {c['failed']:6d}")
    c = result.counts()
    print(f"{c['sampled']} pairs sampled in {len(groups)} groups: {c['kept']} kept "
          f"({args.min_inliers} <= inliers <= {args.max_inliers}), {c['too_easy']} too easy, "
          f"{c['too_hard']} too hard, {c['failed']} failed")
    print(f"{len(result.dropped)} images dropped by noise cleaning"
          + ("" if args.drop_unverified else " (off; --drop-unverified)")
          + f"; {len(result.failed)} unreadable images" + (f" (listed in {report})" if result.failed else ""))
    print(f"wall time {result.seconds:.1f} s; wrote {csv_path} (kept pairs: "
          f"remap_lib.training.verification.load_pairs), {report} and cache {cache}")
    return 0


def cmd_index(args) -> int:
    from ..describe.extract import extract_descriptors, load_descriptors
    from ..search.index import RetrievalIndex

    if args.action == "build":
        from ..search.index import DEFAULT_REFINE_K
        from ..search.index_file import check_index_output
        from ..search.sources import DescriptorSource

        _check_output_file(args.index)
        if args.on_disk and args.refine:
            raise ValueError("--refine keeps its codes in memory; it cannot be combined with --on-disk")
        if args.shards > 1 and not args.on_disk:
            raise ValueError("--shards splits an --on-disk build into parallel sub-indexes; add --on-disk")
        source = DescriptorSource.open(args.descriptors)  # streamed in chunks, checked against manifest.json
        if not len(source):
            raise ValueError(f"{args.descriptors} holds no descriptors")
        if args.truncate and args.truncate > source.dim:
            raise ValueError(f"--truncate {args.truncate} exceeds the descriptors' dimension {source.dim}")
        check_index_output(args.index, source.inputs(), force=args.force)  # not over its input, nor another file
        options = dict(truncate=args.truncate, nprobe=args.nprobe, train_size=args.train_sample, chunk=args.chunk,
                       use_gpu=args.gpu, progress=not args.quiet)
        if args.on_disk:
            from ..search.on_disk import build_on_disk

            index = build_on_disk(source, args.index, args.factory, shards=args.shards, **options)
        else:
            index = RetrievalIndex.build(source, args.factory, refine=args.refine,
                                         refine_k=args.refine_k or DEFAULT_REFINE_K, **options)
            index.save(args.index)
        print(f"{index.describe()} index of {len(index)} images ({index.dim}-d, {index.bytes_per_vector():.0f} bytes "
              f"of code each) saved to {args.index}" + (f" and {args.index}.ivfdata" if index.on_disk else ""))
        return 0
    index = RetrievalIndex.load(args.index)
    if args.action == "add":
        desc = load_descriptors(args.descriptors)
        index.check_model(desc.config["model"], desc.config.get("weights_fingerprint"), desc.config.get("precision"),
                          role="add")
        index.refuse_known_paths(desc.paths, args.descriptors)  # adding a folder twice duplicated every image
        index.add(desc.descriptors, desc.paths)
        index.save(args.index)
        print(f"added {len(desc.paths)} images; {len(index)} in {args.index}")
        return 0
    # search
    if args.descriptors:
        desc = load_descriptors(args.descriptors)
        index.check_model(desc.config["model"], desc.config.get("weights_fingerprint"), desc.config.get("precision"))
        names, queries = desc.paths, desc.descriptors
    else:
        if not args.images:
            raise ValueError("give query images or --descriptors DIR")
        model = _index_query_model(index, args)
        res = extract_descriptors(model, args.images[0] if len(args.images) == 1 else args.images,
                                  on_error="raise", progress=False, num_workers=0, device=args.device,
                                  engine=args.engine, precision=index.precision)
        names, queries = res.paths, res.descriptors
    if not len(names):
        raise ValueError("no queries to search")
    if args.qe:
        from ..search.expansion import weighted_expansion
        from ..search.index import truncate_descriptors

        if index.truncate:
            queries = truncate_descriptors(queries, index.truncate)
        sims, ids = index.search(queries, args.qe, nprobe=args.nprobe)
        queries = weighted_expansion(queries, index.reconstruct(ids), sims, args.qe_alpha)
    for name, hits in zip(names, index.search_paths(queries, args.k, nprobe=args.nprobe)):
        print(f"query {name}")
        for rank, (path, s) in enumerate(hits, 1):
            print(f"  {rank:3d}  {s:.4f}  {path}")
    return 0


def _index_query_model(index, args):
    """The model that made ``index``: its config and the files recorded in it (or given), verified.

    ``--checkpoint/--klw/--whitening`` override the recorded files; the
    rebuilt model must give the config digest and the weights fingerprint the
    index recorded, or the search is refused: its rankings would be those of
    another model.  An index that recorded no fingerprint cannot vouch for a
    rebuilt model's weights, so it is searched by descriptors only.
    """
    if index.model_config is None:
        raise ValueError("the index has no model config; search it with --descriptors from `remap extract`")
    if index.weights_fingerprint is None:
        raise ValueError(f"{args.index} records no weights fingerprint, so a model rebuilt from it cannot be "
                         "verified; search it with --descriptors from `remap extract`")
    given = {key: getattr(args, key) for key in ("checkpoint", "klw", "whitening") if getattr(args, key)}
    recorded = {key: path for key, path in index.model_sources.items() if key not in given}
    missing = {key: path for key, path in recorded.items() if not os.path.isfile(path)}
    if missing:
        raise FileNotFoundError(
            "the index was built with " + ", ".join(f"--{k} {p}" for k, p in missing.items())
            + ", which no longer exist" + ("s" if len(missing) == 1 else "")
            + "; pass the files with the same options, or search with --descriptors")
    for key, path in recorded.items():
        setattr(args, key, path)
    config = ModelConfig.from_dict(index.model_config)
    if "whitening" in recorded or "whitening" in given or "checkpoint" in recorded or "checkpoint" in given:
        config.whitening, config.dim = False, None  # the whitening comes from its file / the checkpoint
    model = model_from_args(args, config)
    index.check_model(model.config.to_dict(), model.fingerprint())  # against the digest the index recorded
    return model


def cmd_download(args) -> int:
    from ..data.download import DownloadError, download_benchmark

    try:
        folder = download_benchmark(args.name, args.root)
    except DownloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.name} is in {folder}")
    return 0


def _parse_datasets(specs: list[str], crop: bool, allow_missing: bool) -> dict:
    """``[NAME=]PATH`` specs → ``{name: dataset}``."""
    from ..data.datasets import load_dataset

    datasets = {}
    for spec in specs:
        name, _, path = spec.rpartition("=")
        if not path.strip():
            raise ValueError(f"-d {spec!r}: no path given (use NAME=PATH or PATH)")
        ds = load_dataset(path, crop_queries=crop, allow_missing=allow_missing)
        datasets[name or ds.name] = ds
    return datasets


def _evaluate_methods(args) -> dict:
    """``-m``'s methods by table name; the model of --checkpoint/--klw/--whitening in its head's row.

    Those files describe one model, as in ``remap extract``: its row replaces
    its head's off-the-shelf one and is named after the files, e.g.
    ``remap (klw.json)``, so the table says what was applied.  The other rows
    stay off the shelf.
    """
    from ..evaluation.evaluate import COLOUR_HISTOGRAM

    methods = {}
    for m in args.method:
        if m in ("colour", "color", COLOUR_HISTOGRAM):
            methods["colour histogram"] = COLOUR_HISTOGRAM
        elif m in HEADS:
            methods[m] = None
        else:
            raise ValueError(f"unknown method {m!r}; choose from {', '.join(HEADS)}, colour")
    files = model_sources(args)
    model = _evaluated_model(args, [m for m in methods if m in HEADS]) if files else None
    out = {}
    for name, method in methods.items():
        if model is not None and name == model.config.head:
            out[f"{name} ({', '.join(os.path.basename(path) for path in files.values())})"] = model
        else:
            out[name] = method if method is not None else config_from_args(args, head=name)
    return out


def _evaluated_model(args, heads: list[str]):
    """The one model that ``evaluate``'s --checkpoint/--klw/--whitening describe, for a head of ``-m``.

    Its head: the checkpoint's; else REMAP for --klw (KL weights weigh REMAP
    regions); else the one head of ``-m`` (a PCA-whitening is learned on one
    model's descriptors, so several heads are refused rather than guessed).
    """
    flags = " ".join(f"--{key} {os.path.basename(path)}" for key, path in model_sources(args).items())
    if args.checkpoint:
        model = model_from_args(args)
        head = model.config.head
    else:
        if not args.klw and len(heads) != 1:
            raise ValueError(f"--whitening was learned on the descriptors of one model (`remap whiten`); "
                             f"evaluate it with that model's head alone (-m HEAD), not {len(heads)} heads")
        head = "remap" if args.klw else heads[0]
        model = None
    if head not in heads:
        raise ValueError(f"the model of {flags} has a {head} head, but -m does not name {head}: add it to -m")
    return model if model is not None else model_from_args(args, head=head)


def cmd_evaluate(args) -> int:
    from ..evaluation.evaluate import evaluate, format_table

    check_output_folder(args.out)
    methods = _evaluate_methods(args)
    datasets = _parse_datasets(args.dataset, not args.no_crop, args.allow_missing)
    for ds in datasets.values():
        print(ds.summary())
    results = evaluate(methods, datasets, args.out, cache_dir=args.cache, device=args.device,
                       engine=args.engine, precision=args.precision,
                       progress=not args.quiet)
    print()
    print(format_table(results))
    if args.out:
        print(f"\nsaved {args.out}/results.csv and results.json")
    return 0


# The model options evaluate and klw cannot use, and why (see _Refused): refused, never dropped.
EVALUATE_REFUSES = {"head": "does not apply to evaluate: the heads to compare are -m/--method's"}
KLW_REFUSES = {
    "head": "does not apply to klw: KL weights are estimated for the REMAP head",
    "image_size": "does not apply to klw: every image is resized to --input-size WxH",
    "multiscale": "does not apply to klw: every image is described once, at --input-size WxH",
    "upscale": "does not apply to klw: every image is resized to --input-size WxH, whatever its size",
    "klw": "does not apply to klw: the estimate compares region vectors before any region weight, so "
           "existing KL weights would change nothing",
    "whitening": "does not apply to klw: the estimate compares region vectors, before the whitening acts",
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="remap", description="REMAP image retrieval toolkit")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("backbones", help="list backbones")
    p.set_defaults(func=cmd_backbones)

    p = sub.add_parser("extract", help="describe images")
    p.add_argument("images", nargs="*", help="image files or one folder")
    p.add_argument("--list", help="text file with one image path per line")
    p.add_argument("-o", "--out", required=True, help="output folder (resumable)")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--workers", type=worker_count, default=None,
                   help="image-decoding processes (0: in the main process; at most 4 per core)")
    p.add_argument("--on-error", choices=("skip", "raise"), default="skip",
                   help="skip bad images (listed in failed.jsonl) or stop at the first")
    p.add_argument("--save-every", type=positive_int, default=64,
                   help="write finished descriptors to disk every this many images (what a kill can lose)")
    p.add_argument("--shard", default=None, metavar="K/N",
                   help="describe only block K of N (0-based) of the image list, e.g. one job of a SLURM "
                        "array; join the folders with `remap merge`. Under torchrun the ranks split the list")
    _add_engine_args(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_model_args(p)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("merge", help="join the folders of `remap extract --shard K/N` into one, in input order")
    p.add_argument("out", help="output folder")
    p.add_argument("shards", nargs="+", help="the N shard folders (any order)")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("whiten", help="learn PCA-whitening from extracted descriptors")
    p.add_argument("descriptors", help="folder written by `remap extract`")
    p.add_argument("-o", "--out", required=True, help="output .npz")
    p.add_argument("--dim", type=positive_int, default=None, help="output dimension (default: all the data supports)")
    p.set_defaults(func=cmd_whiten)

    p = sub.add_parser("evaluate", help="methods x datasets -> table")
    p.add_argument("-d", "--dataset", action="append", required=True,
                   help="[NAME=]PATH of a benchmark folder (revisited, Oxford/Paris, Holidays, UKBench, "
                        "folder of groups, CSV) or 'demo'; repeat for several")
    p.add_argument("-m", "--method", nargs="+", default=["mac", "spoc", "gem", "rmac", "remap", "colour"],
                   help="heads (mac spoc gem rmac remap) and/or 'colour' (histogram baseline)")
    p.add_argument("-o", "--out", default=None, help="folder for results.csv / results.json")
    p.add_argument("--cache", default=None, help="folder to cache descriptors (resumable)")
    p.add_argument("--no-crop", action="store_true", help="do not crop revisited/Oxford queries (non-standard)")
    p.add_argument("--allow-missing", action="store_true",
                   help="evaluate on the images present when the ground truth names missing ones")
    p.add_argument("--device", default="auto")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    _add_model_args(p, refused=EVALUATE_REFUSES)
    _add_engine_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("klw", help="KL-divergence region weights (paper Sec. III-B) from a dataset with groups")
    p.add_argument("-d", "--dataset", required=True, help="[NAME=]PATH with groups (UKBench, folder/CSV of "
                   "groups, Holidays) or 'demo'")
    p.add_argument("--groups", default=None, help="only groups LO-HI (e.g. 0-99: UKBench training objects)")
    p.add_argument("-o", "--out", required=True, help="output JSON (weights, config, settings)")
    p.add_argument("--input-size", type=image_size_wh, default=(512, 384),
                   help="WxH every image is resized to (4:3; paper 1024x768)")
    p.add_argument("--matching", type=positive_int, default=2000, help="at most this many matching pairs")
    p.add_argument("--nonmatching-ratio", type=positive_int, default=5, help="non-matching pairs per matching pair")
    p.add_argument("--bins", type=positive_int, default=30)
    p.add_argument("--direction", choices=("match_nonmatch", "nonmatch_match", "symmetric"),
                   default="match_nonmatch", help="KL(match||non-match) (default), the reverse, or their sum")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--plots", default=None, help="folder for the Fig. 2 pictures")
    p.add_argument("-q", "--quiet", action="store_true")
    _add_model_args(p, refused=KLW_REFUSES)
    _add_engine_args(p)
    p.set_defaults(func=cmd_klw)

    p = sub.add_parser("train", help="fine-tune end to end with a triplet loss (resumes from out_dir)")
    p.add_argument("--config", required=True, help="training config YAML (see configs/)")
    p.add_argument("--steps", type=int, default=None, help="override: parameter updates")
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                   help="override: write the checkpoint every N updates (and after the last)")
    p.add_argument("--out-dir", default=None, help="override: output folder")
    p.add_argument("--device", default=None, help="override: auto, cpu, cuda")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("train-rpn", help="train the region proposal network of a `regions: rpn` model on the "
                       "inlier boxes of verified pairs (Gordo et al.; resumes from out_dir)")
    p.add_argument("--config", required=True, help="train-rpn config YAML (see configs/train_rpn_landmarks_cpu.yaml)")
    p.add_argument("--steps", type=positive_int, default=None, help="override: parameter updates")
    p.add_argument("--checkpoint-every", type=positive_int, default=None, metavar="N",
                   help="override: write the checkpoint every N updates (and after the last)")
    p.add_argument("--out-dir", default=None, help="override: output folder")
    p.add_argument("--device", default=None, help="override: auto, cpu, cuda")
    p.set_defaults(func=cmd_train_rpn)

    p = sub.add_parser("verify-pairs", help="sample training pairs per group and keep those whose SIFT + RANSAC "
                       "inliers lie within bounds (paper Sec. IV-A)")
    p.add_argument("dataset", help="folder of <group>/<image> (e.g. ../shared/data/landmarks_fr), CSV of "
                   "image,group, UKBench or Holidays")
    p.add_argument("-o", "--out", required=True, help="pairs CSV: query,positive,group,inliers,status "
                   "(and OUT.json: settings, counts, dropped and unreadable images)")
    p.add_argument("--pairs-per-group", type=positive_int, default=50, help="random pairs per group (paper: 50)")
    p.add_argument("--min-inliers", type=nonnegative_int, default=5,
                   help="fewer inliers: too hard, dropped (paper: 5)")
    p.add_argument("--max-inliers", type=nonnegative_int, default=30,
                   help="more inliers: too easy (near duplicates), dropped (paper: 30)")
    p.add_argument("--drop-unverified", action="store_true",
                   help="noise cleaning first: drop images verified against no other image of their group")
    p.add_argument("--clean-tries", type=positive_int, default=10,
                   help="with --drop-unverified: other images of its group each image is matched against, at most")
    p.add_argument("--max-side", type=positive_int, default=1024, help="longer side images are shrunk to for SIFT")
    p.add_argument("--method", choices=("homography", "fundamental"), default="homography",
                   help="geometric model fitted with RANSAC")
    p.add_argument("--ransac-threshold", type=float, default=None,
                   help="pixels (default 4 for a homography, 2 for a fundamental matrix)")
    p.add_argument("--workers", type=worker_count, default=None, help="processes (default: one per core; 0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=None, help="JSON-lines file of finished counts, to resume "
                   "(default OUT without its extension + .cache.jsonl)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_verify_pairs)

    from ..search.expansion import qe_alpha

    p = sub.add_parser("index", help="build, extend or search a faiss index of descriptors")
    isub = p.add_subparsers(dest="action", required=True)
    q = isub.add_parser("build", help="index a folder written by `remap extract`")
    q.add_argument("descriptors")
    q.add_argument("-o", "--index", required=True, help="index file to write")
    q.add_argument("--force", action="store_true",
                   help="replace an existing file that is not a remap index (an existing index is always replaced)")
    q.add_argument("--factory", default="Flat",
                   help='faiss factory string: "Flat", "PQ16", "IVF1024,PQ16", "IVF1024,PQ32x4fs" (fast-scan), ...')
    q.add_argument("--truncate", type=positive_int, default=None, help="keep the first D dimensions (e.g. 128)")
    q.add_argument("--train-size", "--train-sample", dest="train_sample", type=positive_int, default=200_000,
                   help="random vectors the quantisers are trained on")
    q.add_argument("--nprobe", type=positive_int, default=16, help="IVF lists visited per query (stored as default)")
    q.add_argument("--chunk", type=positive_int, default=None,
                   help="vectors read and added at a time (default: 64 MiB of them)")
    q.add_argument("--refine", default=None, metavar="CODES",
                   help='re-rank the shortlist with finer codes: "SQ8" (1 byte a dimension), "Flat" (float32)')
    q.add_argument("--refine-k", type=positive_int, default=None,
                   help="with --refine: shortlist of k * REFINE_K candidates (default 8)")
    q.add_argument("--on-disk", action="store_true",
                   help="IVF factories: inverted lists in INDEX.ivfdata, searched memory-mapped")
    q.add_argument("--shards", type=positive_int, default=1,
                   help="with --on-disk: sub-indexes built in parallel processes, then merged")
    q.add_argument("--gpu", action="store_true", help="train and add on the GPU (needs faiss-gpu)")
    q.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    q = isub.add_parser("add", help="add the descriptors of another extraction folder")
    q.add_argument("index")
    q.add_argument("descriptors")
    q = isub.add_parser("search", help="ranked image paths with scores for query images")
    q.add_argument("index")
    q.add_argument("images", nargs="*", help="query images (described with the index's model)")
    q.add_argument("--descriptors", help="or: a folder of query descriptors from `remap extract`")
    q.add_argument("--checkpoint", help="the fine-tuned model the index was built with "
                   "(default: the one recorded in the index)")
    q.add_argument("--klw", help="KL region weights the index was built with (default: recorded in the index)")
    q.add_argument("--whitening", help="whitening the index was built with (default: recorded in the index)")
    q.add_argument("-k", type=positive_int, default=10, help="results per query")
    q.add_argument("--nprobe", type=positive_int, default=None)
    q.add_argument("--qe", type=nonnegative_int, default=0, help="alpha query expansion with the top-N (0: off)")
    q.add_argument("--qe-alpha", type=qe_alpha, default=3.0,
                   help="weight of a neighbour: its similarity to the power alpha (finite, 0 or more; 0: average QE)")
    q.add_argument("--device", default="auto", help="auto, cpu, cuda")
    _add_engine_args(q)
    on_interrupt = {  # what an interrupted `remap index ...` left (main prints it): none of them resumes
        "build": "the index was not written (a build does not resume); run the same command again to build it",
        "add": "the index file is unchanged; run the same command again",
        "search": "nothing was written"}
    for action, q in isub.choices.items():
        q.set_defaults(func=cmd_index, on_interrupt=on_interrupt[action])

    p = sub.add_parser("demo-data", help="build the embedded demo benchmark")
    p.add_argument("-o", "--out", default=None, help="folder (default data/cache/demo)")
    p.add_argument("--force", action="store_true", help="rebuild even if up to date")
    p.set_defaults(func=cmd_demo_data)

    from ..data.download import BENCHMARKS

    p = sub.add_parser("download", help="download a standard benchmark (needs internet)")
    p.add_argument("name", choices=list(BENCHMARKS))
    p.add_argument("--root", required=True, help="folder to put it in (a sub-folder per benchmark)")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("notebooks", help="the main job: run the notebooks end to end with papermill")
    p.add_argument("-p", "--parameters", default=None, help="YAML of parameters for every notebook (e.g. quick: false)")
    p.add_argument("-o", "--out", default=None, help="output folder (default runs/notebooks-<time>)")
    p.add_argument("--only", nargs="+", default=None, help="run only notebooks whose names contain these")
    p.set_defaults(func=cmd_notebooks)

    p = sub.add_parser("demo", help="the demo benchmark: five methods, table and picture")
    p.add_argument("--image-size", type=positive_int, default=None, help="longer side (default 640)")
    p.add_argument("-o", "--out", default=None, help="output folder (default runs/demo-<time>)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    _add_engine_args(p)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for stream in (sys.stdout, sys.stderr):  # file names that are not UTF-8 are printed as their bytes
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="surrogateescape")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command == "extract" and not args.images and not args.list:
        parser.error("extract needs image paths, a folder, or --list FILE")
    try:
        return args.func(args)
    except (ValueError, OSError, RuntimeError) as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__  # one line, whatever the message holds
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a command that does not resume says what it left (set_defaults(on_interrupt=...))
        left = getattr(args, "on_interrupt", None) or "finished work is on disk, run the same command again to resume"
        print(f"error: interrupted; {left}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
