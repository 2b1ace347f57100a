"""Inference engines (remap_lib.describe.engine): OpenVINO equals torch, precision is explicit, exports never go stale."""

from __future__ import annotations

import copy
import json
import logging
import re

import numpy as np
import pytest
import torch

from remap_lib.describe import engine as E
from remap_lib.nets.backbones import build_backbone
from remap_lib.config import HEADS, ModelConfig
from remap_lib.describe.engine import create_engine
from remap_lib.describe.model import RetrievalModel
from remap_lib.layers.whitening import learn_pca_whitening

pytest.importorskip("openvino")

TOL = 1e-5  # max abs difference of L2-normalised descriptor components
SHAPES = [(120, 160), (97, 131)]  # even and odd sizes: TF "SAME" padding differs between them


@pytest.fixture(autouse=True, scope="module")
def cache_dir(tmp_path_factory):
    """Exports go to a temporary REMAP_CACHE_DIR, never to ~/.cache."""
    root = tmp_path_factory.mktemp("remap-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REMAP_CACHE_DIR", str(root))
        yield root / "openvino"


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The torch references on one thread: on a shared 2-core machine two OpenMP threads can be 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def resnet50():
    torch.manual_seed(0)
    return build_backbone("resnet50", weights="random")


@pytest.fixture(scope="module")
def images():
    gen = torch.Generator().manual_seed(0)
    return [torch.rand(2, 3, h, w, generator=gen) for h, w in SHAPES]


def model_for(backbone, head, **kw):
    # layers [1, 2] for every head: one export per backbone serves all five
    cfg = ModelConfig(backbone=backbone.name, head=head, layers=[1, 2], levels=2,
                      image_sizes=[max(s) for s in SHAPES], scale_weights=[1.0, 0.7], **kw)
    return RetrievalModel(cfg, backbone=backbone)


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("backbone", ["lite0", "resnet50"])
def test_openvino_f32_equals_torch_for_every_head_at_odd_and_even_sizes(request, backbone, head, images):
    model = model_for(request.getfixturevalue(backbone), head)
    ov = create_engine(model, "openvino")
    assert (ov.name, ov.precision) == ("openvino", "f32")
    with torch.no_grad():
        for x in images:  # each shape alone: maps and one-scale descriptors
            maps, ref = ov.feature_maps(x), model.feature_maps(x)
            assert [m.shape for m in maps.values()] == [m.shape for m in ref.values()]
            got = model.from_pooled(model.pool_maps(maps))
            assert (got - model(x)).abs().max() <= TOL
        # both shapes as the two scales of paper Eq. 3
        expected = model.multiscale(images)
    got = ov.describe(images)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert (got - expected).abs().max() <= TOL


def test_torch_engine_is_the_models_multiscale(lite0, images):
    model = model_for(lite0, "remap")
    engine = create_engine(model, "torch")
    assert (engine.name, engine.precision) == ("torch", "f32")
    with torch.no_grad():
        assert torch.equal(engine.describe(images), model.multiscale(images))


def test_whitening_and_region_weights_need_no_new_export(lite0, images):
    model = model_for(lite0, "remap", whitening=True, dim=8)
    with torch.no_grad():
        pooled = torch.cat([model.pool(torch.rand(8, 3, 64, 80)) for _ in range(2)]).numpy()
    model.set_whitening(learn_pca_whitening(pooled, dim=8))
    ov = create_engine(model, "openvino")
    compiled = ov.compiled()
    first = ov.describe(images)
    model.set_region_weights({layer: torch.rand(model.streams[layer].alpha.raw.shape) for layer in model.layers})
    with torch.no_grad():
        expected = model.multiscale(images)
    got = ov.describe(images)
    assert ov.compiled() is compiled  # the backbone did not change: same compiled model
    assert (got - expected).abs().max() <= TOL and (got - first).abs().max() > 10 * TOL


def test_a_changed_backbone_is_exported_again(lite0, images):
    backbone = copy.deepcopy(lite0)  # the session's lite0 stays as it is
    model = model_for(backbone, "gem")
    ov = create_engine(model, "openvino")
    before = ov.describe(images)
    with torch.no_grad():
        backbone.stages["block15"]._project_conv.weight.mul_(-0.5)  # in place, as an optimiser step does
        expected = model.multiscale(images)
    assert (expected - before).abs().max() > 0.01  # the change matters
    assert (ov.describe(images) - expected).abs().max() <= TOL
    with torch.no_grad():
        backbone.stages["block15"]._project_conv.weight.mul_(-2.0)  # back to the original weights
    assert (ov.describe(images) - before).abs().max() <= TOL


def test_precision_hint_is_always_explicit_and_bf16_only_when_asked(lite0, images):
    import openvino as ov

    model = model_for(lite0, "remap")
    f32 = create_engine(model, "openvino")
    assert f32.compiled().get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32
    bf16 = create_engine(model, "openvino", precision="bf16")
    if "BF16" in E._core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        assert bf16.precision == "bf16"
        assert bf16.compiled().get_property("INFERENCE_PRECISION_HINT") == ov.Type.bf16
        with torch.no_grad():
            cosine = (bf16.describe(images) * model.multiscale(images)).sum(1)
        assert cosine.min() > 0.98  # approximate, not wrong
    else:
        assert bf16.precision == "f32"


def test_bf16_on_a_cpu_without_it_warns_and_runs_f32(lite0, monkeypatch, caplog):
    real = E._core()

    class NoBF16:
        def get_property(self, device, name):
            return ["FP32", "INT8"] if name == "OPTIMIZATION_CAPABILITIES" else real.get_property(device, name)

        def __getattr__(self, name):
            return getattr(real, name)

    monkeypatch.setattr(E, "_core", lambda: NoBF16())
    with caplog.at_level(logging.WARNING, logger="remap_lib.describe.engine"):
        engine = create_engine(model_for(lite0, "mac"), "openvino", precision="bf16")
    assert engine.precision == "f32"
    assert "no bf16 support" in caplog.text


def test_exports_are_cached_on_disk_and_a_broken_file_is_replaced(lite0, images, cache_dir, monkeypatch):
    model = model_for(lite0, "spoc")
    engine = create_engine(model, "openvino")
    expected = engine.describe(images)
    xml = E.export_path(cache_dir, engine.key())
    assert xml.parent.name.startswith(f"efficientnet_lite0-{E.weights_fingerprint(lite0)}-head+block15-")
    assert xml.exists() and xml.with_suffix(".bin").exists()
    monkeypatch.setattr(E, "_COMPILED", type(E._COMPILED)())  # a new process: nothing in memory
    exported = []
    monkeypatch.setattr(E, "export_openvino", lambda *a: exported.append(1) or pytest.fail("exported again"))
    assert (create_engine(model, "openvino").describe(images) - expected).abs().max() == 0
    assert exported == []
    xml.write_text("<net>truncated")
    monkeypatch.undo()
    monkeypatch.setattr(E, "_COMPILED", type(E._COMPILED)())
    assert (create_engine(model, "openvino").describe(images) - expected).abs().max() <= TOL
    assert "truncated" not in xml.read_text()  # written again


def flip_a_bit_in_the_bin(xml):
    """One exponent bit of a float32 weight a fifth into the .bin: the size stays, the weight is 2^64× too big.

    A fifth: EfficientNet-Lite0's block 13 there, where the flip costs the descriptors of ``images`` a cosine of
    ~0.4 (in the middle it hits a weight these images never use, and only the check would notice).
    """
    path = xml.with_suffix(".bin")
    data = bytearray(path.read_bytes())
    data[len(data) // 20 * 4 + 3] ^= 0x40  # byte 3 of a 4-aligned float: the sign and the exponent's top bits
    path.write_bytes(bytes(data))


def shift_the_first_weights_in_the_xml(xml):
    """A same-size edit that OpenVINO reads happily: the first 4-d weights start one float later in the .bin."""
    text = xml.read_text()
    match = re.search(r'shape="\d+, \d+, \d+, \d+" offset="(\d+)"', text)
    old = match.group(0)
    new = old.replace(f'offset="{match[1]}"', f'offset="{int(match[1]) + 4}"')
    assert len(new) == len(old)
    xml.write_text(text.replace(old, new, 1))


class Unchecked(E.InferenceEngine):
    """What a load without the check gives: OpenVINO reading the files as they lie."""

    def __init__(self, model, xml):
        super().__init__(model)
        compiled = E._core().compile_model(E._core().read_model(str(xml)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        self.request = compiled.create_infer_request()

    def feature_maps(self, images):
        out = self.request.infer([images.numpy()], share_outputs=False)
        return {layer: torch.from_numpy(out[i]) for i, layer in enumerate(self.model.layers)}


def record_matches_files(xml):
    recorded = json.loads((xml.parent / "sha256.json").read_text())["sha256"]
    return recorded == {f.name: E._sha256(f.read_bytes()) for f in (xml, xml.with_suffix(".bin"))}


@pytest.mark.parametrize("damage", [flip_a_bit_in_the_bin, shift_the_first_weights_in_the_xml])
def test_a_damaged_export_of_the_same_size_is_exported_again_with_one_warning(lite0, images, cache_dir,
                                                                              monkeypatch, caplog, damage):
    model = model_for(lite0, "remap")
    with torch.no_grad():
        expected = create_engine(model, "torch").describe(images)
    engine = create_engine(model, "openvino")
    engine.compiled()  # exported, or already on disk from another test
    xml = E.export_path(cache_dir, engine.key())
    before = {f: f.read_bytes() for f in (xml, xml.with_suffix(".bin"))}
    damage(xml)
    assert [len(data) for data in before.values()] == [f.stat().st_size for f in before]
    assert [f.read_bytes() for f in before] != list(before.values())
    assert (Unchecked(model, xml).describe(images) - expected).abs().max() > 0.01  # the damage matters

    monkeypatch.setattr(E, "_COMPILED", type(E._COMPILED)())  # a new process: nothing in memory
    with caplog.at_level(logging.WARNING, logger="remap_lib.describe.engine"):
        got = create_engine(model, "openvino").describe(images)
    assert (got - expected).abs().max() <= TOL
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert xml.parent.name in warnings[0] and "exporting again" in warnings[0]
    assert record_matches_files(xml)  # written again, with its record

    caplog.clear()  # the new export proves itself: read from disk, no warning, no export
    monkeypatch.setattr(E, "_COMPILED", type(E._COMPILED)())
    monkeypatch.setattr(E, "export_openvino", lambda *a: pytest.fail("exported again"))
    with caplog.at_level(logging.WARNING, logger="remap_lib.describe.engine"):
        assert (create_engine(model, "openvino").describe(images) - expected).abs().max() <= TOL
    assert caplog.records == []


def test_an_export_without_its_record_is_not_trusted(lite0, images, cache_dir, monkeypatch, caplog):
    model = model_for(lite0, "gem")
    engine = create_engine(model, "openvino")
    expected = engine.describe(images)
    xml = E.export_path(cache_dir, engine.key())
    (xml.parent / "sha256.json").unlink()
    monkeypatch.setattr(E, "_COMPILED", type(E._COMPILED)())
    with caplog.at_level(logging.WARNING, logger="remap_lib.describe.engine"):
        assert (create_engine(model, "openvino").describe(images) - expected).abs().max() <= TOL
    assert len(caplog.records) == 1 and "sha256.json" in caplog.text
    assert record_matches_files(xml)
    assert not list(cache_dir.glob(".*"))  # no temporary or discarded folder left behind


def test_a_second_writer_of_the_same_export_keeps_the_first(lite0, cache_dir):
    model = model_for(lite0, "mac")
    engine = create_engine(model, "openvino")
    engine.compiled()
    xml = E.export_path(cache_dir, engine.key())
    first = {f.name: f.read_bytes() for f in xml.parent.iterdir()}
    E._save(E.export_openvino(lite0, model.layers), xml)  # a process that exported meanwhile (other node names)
    assert {f.name: f.read_bytes() for f in xml.parent.iterdir()} == first  # never one writer's .xml, another's record
    assert record_matches_files(xml)
    assert not list(cache_dir.glob(".*"))


def test_engine_choice_and_clear_errors(lite0):
    model = model_for(lite0, "mac")
    assert create_engine(model).name == "openvino"  # auto on a CPU
    assert create_engine(model, "auto", device="cpu").name == "openvino"
    with pytest.raises(ValueError, match="unknown engine 'onnx'.*auto, torch, openvino"):
        create_engine(model, "onnx")
    with pytest.raises(ValueError, match="unknown precision 'fp16'.*f32, bf16"):
        create_engine(model, "openvino", precision="fp16")
    with pytest.raises(ValueError, match="runs on the CPU.*engine='torch'"):
        create_engine(model, "openvino", device="cuda")
    with pytest.raises(ValueError, match="scales given"):
        create_engine(model, "openvino").describe([torch.rand(1, 3, 64, 64)])


def test_descriptors_are_deterministic(lite0, images):
    engine = create_engine(model_for(lite0, "rmac"), "openvino")
    a, b = engine.describe(images), engine.describe(images)
    assert np.array_equal(a.numpy(), b.numpy())
