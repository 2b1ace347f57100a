"""The search index (remap_lib.search.index) and expansion (remap_lib.search.expansion)."""

from __future__ import annotations

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

from remap_lib.app.cli import main  # noqa: E402
from remap_lib.config import ModelConfig  # noqa: E402
from remap_lib.search.expansion import (alpha_query_expansion, average_query_expansion,  # noqa: E402
                                 database_side_augmentation)
from remap_lib.search.index import ModelMismatchError, RetrievalIndex, truncate_descriptors  # noqa: E402
from remap_lib.search.index_file import IndexFileError  # noqa: E402
from remap_lib.search.on_disk import build_on_disk  # noqa: E402


def _overlap_at_10(found, truth) -> float:
    """Mean share of each exact top-10 (rows of ``truth``) that the index's top-10 (rows of ``found``) holds."""
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)]))


def _unit(n, d, seed):
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_pq_adc_equals_brute_force_numpy():
    db, q = _unit(10000, 32, 0), _unit(20, 32, 1)
    index = RetrievalIndex(32, "PQ8")
    index.add(db, [f"img{i}" for i in range(len(db))])
    assert index.bytes_per_vector() == 8
    pq_index = faiss.downcast_index(index.index)
    m, ksub, dsub = pq_index.pq.M, pq_index.pq.ksub, pq_index.pq.dsub
    centroids = faiss.vector_to_array(pq_index.pq.centroids).reshape(m, ksub, dsub)
    codes = faiss.vector_to_array(pq_index.codes).reshape(len(db), m)
    # asymmetric distance: the query stays exact, the database vectors are their codes
    lut = np.einsum("nmd,mkd->nmk", q.reshape(len(q), m, dsub), centroids)  # (queries, M, 256)
    scores = lut[:, np.arange(m)[None, :], codes].sum(-1)  # (queries, database)
    expected = np.argsort(-scores, axis=1, kind="stable")[:, :10]
    got_scores, got = index.search(q, 10)
    assert np.array_equal(got, expected)
    assert np.allclose(got_scores, np.take_along_axis(scores, expected, 1), atol=1e-4)


def test_truncation_keeps_leading_dimensions_normalised():
    x = np.array([[3.0, 4.0, 12.0]], dtype=np.float32)
    assert np.allclose(truncate_descriptors(x, 2), [[0.6, 0.8]])
    with pytest.raises(ValueError):
        truncate_descriptors(x, 4)
    index = RetrievalIndex(2, "Flat", truncate=2)
    index.add(np.array([[3.0, 4.0, 12.0], [0.0, 1.0, 0.0]], np.float32) / 13.0, ["a", "b"])
    assert index.search_paths(np.array([[0.6, 0.8, 0.0]], np.float32), 2)[0][0] == ("a", pytest.approx(1.0))


def test_query_expansion_hand_computed():
    db = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], dtype=np.float32)
    q = np.array([[0.8, 0.6]], dtype=np.float32)
    # sims: 0.8, 0.96, 0.6 -> top-2: db1 (0.96), db0 (0.8); AQE = L2(q + db1 + db0) = L2([2.4, 1.4])
    assert np.allclose(average_query_expansion(q, db, k=2), np.array([[2.4, 1.4]]) / np.hypot(2.4, 1.4), atol=1e-6)
    # alpha = 1: L2(q + 0.96 db1 + 0.8 db0) = L2([0.8 + 0.576 + 0.8, 0.6 + 0.768])
    v = np.array([0.8 + 0.96 * 0.6 + 0.8, 0.6 + 0.96 * 0.8])
    assert np.allclose(alpha_query_expansion(q, db, k=2, alpha=1.0), v / np.linalg.norm(v), atol=1e-6)
    assert np.array_equal(alpha_query_expansion(q, db, k=0), q)


def test_database_side_augmentation_hand_computed():
    db = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], dtype=np.float32)
    out = database_side_augmentation(db, k=1)
    # db0's nearest other is db1 (0.6); db1's is db2 (0.8); db2's is db1 (0.8)
    expect = np.array([[1.6, 0.8], [0.6, 1.8], [0.6, 1.8]])
    assert np.allclose(out, expect / np.linalg.norm(expect, axis=1, keepdims=True), atol=1e-6)


@pytest.mark.parametrize("factory", ["Flat", "PQ8", "IVF16,PQ8", "OPQ8,IVF16,PQ8"])
def test_save_load_round_trip(tmp_path, factory):
    db, q = _unit(5000, 32, 2), _unit(5, 32, 3)
    cfg = ModelConfig(head="rmac").to_dict()
    index = RetrievalIndex(32, factory, cfg)
    index.nprobe = 4
    index.add(db, [f"img{i}.jpg" for i in range(len(db))])
    index.save(tmp_path / "i.remap")
    loaded = RetrievalIndex.load(tmp_path / "i.remap")
    a, b = index.search(q, 10), loaded.search(q, 10)
    assert np.array_equal(a[1], b[1]) and np.array_equal(a[0], b[0])
    assert loaded.paths == index.paths and loaded.model_digest == index.model_digest and loaded.nprobe == 4
    loaded.add(db[:3], ["x", "y", "z"])  # incremental add after loading
    assert len(loaded) == 5003 and loaded.search_paths(db[:1], 1)[0][0][0] in ("img0.jpg", "x")


def test_model_mismatch_and_corrupt_files_are_refused(tmp_path):
    index = RetrievalIndex(8, "Flat", ModelConfig(head="rmac", levels=3).to_dict())
    index.add(_unit(10, 8, 4), [str(i) for i in range(10)])
    index.check_model(ModelConfig(head="rmac", levels=3).to_dict())
    with pytest.raises(ModelMismatchError, match="levels"):
        index.check_model(ModelConfig(head="rmac", levels=4).to_dict())
    index.save(tmp_path / "i.remap")
    data = (tmp_path / "i.remap").read_bytes()
    (tmp_path / "cut.remap").write_bytes(data[:-10])
    with pytest.raises(IndexFileError, match="truncated"):
        RetrievalIndex.load(tmp_path / "cut.remap")
    flipped = bytearray(data)
    flipped[-50] ^= 0xFF
    (tmp_path / "flip.remap").write_bytes(bytes(flipped))
    with pytest.raises(IndexFileError, match="corrupt"):
        RetrievalIndex.load(tmp_path / "flip.remap")
    (tmp_path / "other.remap").write_bytes(b"hello world, not an index")
    with pytest.raises(IndexFileError, match="not a remap index"):
        RetrievalIndex.load(tmp_path / "other.remap")
    with pytest.raises(ValueError, match="8-d"):
        index.add(_unit(2, 16, 5), ["a", "b"])


def test_cli_build_search_add(tmp_path, photo_dir, capsys):
    desc = tmp_path / "desc"
    common = ["--head", "gem", "--image-size", "64", "-q", "--workers", "0"]
    assert main(["extract", str(photo_dir), "-o", str(desc)] + common) == 0
    assert main(["index", "build", str(desc), "-o", str(tmp_path / "i.remap")]) == 0
    capsys.readouterr()
    assert main(["index", "search", str(tmp_path / "i.remap"), str(photo_dir / "coffee.png"), "-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("coffee.png") and lines[1].split()[2].endswith("coffee.png")
    assert float(lines[1].split()[1]) == pytest.approx(1.0, abs=1e-4)  # the image finds itself first
    assert main(["index", "search", str(tmp_path / "i.remap"), str(photo_dir / "coffee.png"), "--qe", "2"]) == 0
    other = tmp_path / "other"
    assert main(["extract", str(photo_dir / "chelsea.png"), "-o", str(other), "--head", "mac", "--image-size",
                 "64", "-q", "--workers", "0"]) == 0
    capsys.readouterr()
    assert main(["index", "add", str(tmp_path / "i.remap"), str(other)]) == 2
    err = capsys.readouterr().err
    assert "error: these descriptors were made by another model than the index's" in err
    assert "query" not in err  # an add has no query (issue 25)


def test_synthetic_distractors_follow_the_real_moments():
    from remap_lib.search.sources import synthetic_distractors

    rng = np.random.default_rng(6)
    real = rng.normal(size=(4000, 6)) * np.array([3.0, 2.0, 1.0, 0.5, 0.2, 0.1]) + np.array([5.0, 0, 0, 0, 0, 0])
    fake = synthetic_distractors(real, 20000, seed=1)
    assert fake.shape == (20000, 6) and np.allclose(np.linalg.norm(fake, axis=1), 1, atol=1e-5)
    real_n = real / np.linalg.norm(real, axis=1, keepdims=True)
    assert np.allclose(fake.mean(0), real_n.mean(0), atol=0.02)  # same mean direction and spread
    assert np.allclose(np.cov(fake, rowvar=False), np.cov(real_n, rowvar=False), atol=0.02)
    assert np.array_equal(fake[:10], synthetic_distractors(real, 10, seed=1))


# ---------------------------------------------------------------------- at scale (issue 13)
def _clustered(n, d, clusters, spread, seed):
    """L2-normalised points around ``clusters`` random centres (noise ``spread`` per dimension)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d))
    x = centres[rng.integers(clusters, size=n)] + spread * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _extraction_folder(folder, x, paths=None):
    """``x`` written as `remap extract` writes its result (its own writer), with an extraction.json."""
    import json

    from remap_lib.describe.extract import FORMAT, Descriptors, _write_result

    cfg = ModelConfig(head="gem")
    identity = {"model": cfg.to_dict(), "model_digest": cfg.digest(), "weights_fingerprint": "f" * 16}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "extraction.json").write_text(json.dumps({"format": FORMAT, **identity, "precision": "f32",
                                                        "sources": {}}))
    paths = paths or [f"photos/img {i}\t\u00e9.jpg" for i in range(len(x))]  # tabs and accents survive
    _write_result(folder, Descriptors(paths, x, [], identity))
    return folder


def test_descriptor_source_reads_what_extract_writes(tmp_path):
    from remap_lib.describe.extract import FORMAT, load_descriptors
    from remap_lib.describe.extraction_files import FORMAT as EXTRACTION_FORMAT
    from remap_lib.search.sources import DescriptorSource

    assert EXTRACTION_FORMAT == FORMAT
    folder = _extraction_folder(tmp_path / "desc", _unit(1000, 16, 7))
    source, reference = DescriptorSource.open(folder), load_descriptors(folder)
    assert len(source) == 1000 and source.dim == 16 and source.paths == reference.paths
    chunks = list(source.chunks(300))
    assert [s for s, _ in chunks] == [0, 300, 600, 900] and [len(c) for _, c in chunks] == [300, 300, 300, 100]
    assert np.array_equal(np.concatenate([c for _, c in chunks]), reference.descriptors)
    ids = np.array([3, 500, 999])
    assert np.array_equal(source.take(ids), reference.descriptors[ids])
    source.verify(256)
    assert source.paths[5] == "photos/img 5\t\u00e9.jpg" and source.paths[-1] == reference.paths[-1]


@pytest.mark.parametrize("factory", ["Flat", "IVF32,PQ8"])
def test_streamed_build_equals_in_memory_build(tmp_path, factory):
    from remap_lib.search.sources import DescriptorSource

    x = _clustered(6000, 32, 40, 1.0, 8)
    source = DescriptorSource.open(_extraction_folder(tmp_path / "desc", x))
    streamed = RetrievalIndex.build(source, factory, train_size=3000, chunk=700, nprobe=4, seed=3)
    memory = RetrievalIndex.for_descriptors(source.config, 32, factory)
    memory.nprobe = 4
    memory.train(x[np.sort(np.random.default_rng(3).choice(len(x), 3000, replace=False))])
    memory.add(x, list(source.paths))
    q = x[:50] + 0.05 * _unit(50, 32, 9)
    (s1, i1), (s2, i2) = streamed.search(q, 10), memory.search(q, 10)
    assert np.array_equal(i1, i2) and np.array_equal(s1, s2)
    assert streamed.paths == memory.paths and streamed.weights_fingerprint == "f" * 16
    streamed.save(tmp_path / "s.remap")
    loaded = RetrievalIndex.load(tmp_path / "s.remap")
    assert np.array_equal(loaded.search(q, 10)[1], i1) and loaded.paths == memory.paths


def test_on_disk_merged_index_equals_in_memory_ivf(tmp_path):
    from remap_lib.search.sources import DescriptorSource

    x = _clustered(6000, 32, 40, 1.0, 10)
    source = DescriptorSource.open(_extraction_folder(tmp_path / "desc", x))
    out = tmp_path / "idx" / "i.remap"
    out.parent.mkdir()
    disk = build_on_disk(source, out, "IVF32,PQ8", shards=2, train_size=3000, chunk=500, nprobe=4)
    memory = RetrievalIndex.build(source, "IVF32,PQ8", train_size=3000, chunk=500, nprobe=4)
    assert sorted(p.name for p in out.parent.iterdir()) == ["i.remap", "i.remap.ivfdata"]  # no leftovers
    quantizer = lambda index: faiss.extract_index_ivf(index.index).quantizer.reconstruct_n(0, 32)  # noqa: E731
    assert np.array_equal(quantizer(disk), quantizer(memory))  # the same trained quantiser
    assert disk.on_disk and len(disk) == 6000 and disk.paths == memory.paths
    q = x[:40] + 0.05 * _unit(40, 32, 11)
    for nprobe in (1, 4, 32):
        (s1, i1), (s2, i2) = disk.search(q, 10, nprobe=nprobe), memory.search(q, 10, nprobe=nprobe)
        assert np.array_equal(i1, i2) and np.array_equal(s1, s2)
    moved = tmp_path / "moved"
    out.parent.rename(moved)  # the .ivfdata file is found beside the index file, wherever they go
    again = RetrievalIndex.load(moved / "i.remap", verify="full")
    assert np.array_equal(again.search(q, 10)[1], memory.search(q, 10)[1])
    assert again.search_paths(x[:1], 1)[0][0][0] == memory.paths[0]
    with pytest.raises(ValueError, match="read-only"):
        again.add(x[:1], ["new.jpg"])


def test_corrupt_missing_or_truncated_on_disk_files_are_refused(tmp_path):
    from remap_lib.search.index_file import sampled_sha256
    from remap_lib.search.sources import DescriptorSource

    x = _clustered(3000, 16, 20, 1.0, 12)
    source = DescriptorSource.from_array(x, [f"{i}.jpg" for i in range(len(x))])
    main_file = tmp_path / "i.remap"
    build_on_disk(source, main_file, "IVF8,PQ4", train_size=2000)
    data_file = tmp_path / "i.remap.ivfdata"
    good_main, good_data = main_file.read_bytes(), data_file.read_bytes()

    flipped = bytearray(good_data)
    flipped[len(flipped) // 3] ^= 0x01
    data_file.write_bytes(bytes(flipped))
    with pytest.raises(IndexFileError, match="ivfdata is corrupt"):
        RetrievalIndex.load(main_file)
    data_file.write_bytes(good_data[:-8])
    with pytest.raises(IndexFileError, match="truncated"):
        RetrievalIndex.load(main_file)
    data_file.unlink()
    with pytest.raises(IndexFileError, match="missing"):
        RetrievalIndex.load(main_file)
    data_file.write_bytes(good_data)
    flipped = bytearray(good_main)
    flipped[-20] ^= 0x01  # the path table, after the faiss index
    main_file.write_bytes(bytes(flipped))
    with pytest.raises(IndexFileError, match="i.remap is corrupt"):
        RetrievalIndex.load(main_file)
    main_file.write_bytes(good_main)
    assert len(RetrievalIndex.load(main_file, verify="full")) == 3000

    # the sampled checksum of a large file: its size and evenly spaced blocks
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    reference = sampled_sha256(big, blocks=4, block=1024)
    data = bytearray(big.read_bytes())
    data[0] ^= 1  # the first block is always sampled
    big.write_bytes(bytes(data))
    assert sampled_sha256(big, blocks=4, block=1024) != reference
    data[0] ^= 1
    data[5000] ^= 1  # between blocks: only the full SHA-256 (verify="full") sees it
    big.write_bytes(bytes(data))
    assert sampled_sha256(big, blocks=4, block=1024) == reference
    big.write_bytes(bytes(data[:-1]))
    assert sampled_sha256(big, blocks=4, block=1024) != reference


def test_refine_raises_recall_at_10_on_clustered_data():
    x = _clustered(10_100, 64, 50, 1.0, 0)
    db, q = x[:10_000], x[10_000:]
    paths = [str(i) for i in range(len(db))]
    exact = RetrievalIndex(64, "Flat")
    exact.add(db, paths)
    truth = exact.search(q, 10)[1]
    recall = {}
    for refine in (None, "SQ8"):
        index = RetrievalIndex(64, "IVF16,PQ8", refine=refine, refine_k=16)
        index.train(db[:4000])
        index.add(db, paths)
        found = index.search(q, 10, nprobe=4)[1]
        recall[refine] = _overlap_at_10(found, truth)
    # measured: 0.32 for 8-byte PQ alone, 0.97 with the PQ shortlist of 160 re-ranked by SQ8 codes
    assert recall[None] < 0.4 and recall["SQ8"] >= 0.9
    assert index.bytes_per_vector() == 8 + 64 and index.describe() == "IVF16,PQ8 + Refine(SQ8) x16"


@pytest.mark.parametrize("factory", ["IVF16,PQ8", "IVF16,PQ16x4fs"])
def test_a_single_query_is_spread_over_the_threads_with_the_same_results(factory):
    """One query searches its lists on every thread (IVF parallel_mode 1, fast-scan implem 15); a batch
    is split by query as faiss does by default; both give exactly the same shortlist, re-ranking included."""
    x = _clustered(8000, 64, 40, 1.0, 21)
    index = RetrievalIndex(64, factory, refine="SQ8", refine_k=32)
    index.train(x[:4000])
    index.add(x, [str(i) for i in range(len(x))])
    q = x[:40] + 0.05 * _unit(40, 64, 22)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(2)
    try:
        batch_s, batch_i = index.search(q, 10, nprobe=6)
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index.index))
        assert getattr(ivf, "implem", None) == 0 or ivf.parallel_mode == 0  # faiss's per-query split
        single = [index.search(v, 10, nprobe=6) for v in q]
        assert getattr(ivf, "implem", None) == 15 or ivf.parallel_mode == 1  # one query's lists over 2 threads
    finally:
        faiss.omp_set_num_threads(threads)
    assert np.array_equal(np.concatenate([i for _, i in single]), batch_i)
    assert np.array_equal(np.concatenate([s for s, _ in single]), batch_s)


def test_fast_scan_refine_reaches_the_recall_of_8_bit_pq_refine_and_its_limits_are_explained(tmp_path):
    """4-bit fast-scan PQ (32 x 4 bits = 16 bytes, as PQ16x8) re-ranked by SQ8: the shortlist finds the
    neighbours; on disk and on the GPU it is refused with a way out, not a faiss assertion."""
    from remap_lib.search.sources import DescriptorSource

    x = _clustered(10_100, 64, 50, 1.0, 0)
    db, q = x[:10_000], x[10_000:]
    exact = RetrievalIndex(64, "Flat")
    exact.add(db, [str(i) for i in range(len(db))])
    truth = exact.search(q, 10)[1]
    index = RetrievalIndex(64, "IVF16,PQ32x4fs", refine="SQ8", refine_k=16)
    index.train(db[:4000])
    index.add(db, [str(i) for i in range(len(db))])
    found = index.search(q, 10, nprobe=4)[1]
    assert _overlap_at_10(found, truth) >= 0.9  # measured 0.97 (0.50 alone)
    assert index.bytes_per_vector() == 16 + 64
    index.save(tmp_path / "fs.remap")
    assert np.array_equal(RetrievalIndex.load(tmp_path / "fs.remap").search(q, 10, nprobe=4)[1], found)
    with pytest.raises(ValueError, match="no GPU version of fast-scan"):
        index.search(q, 10, use_gpu=True)
    source = DescriptorSource.from_array(db, [str(i) for i in range(len(db))])
    with pytest.raises(ValueError, match="merge_ondisk cannot write"):
        build_on_disk(source, tmp_path / "d.remap", "IVF16,PQ32x4fs", train_size=4000)
    assert not list(tmp_path.glob("d.remap*"))


def test_streaming_never_holds_the_matrix(tmp_path):
    """A 256 MB descriptors.npy streamed in 5 MB chunks: the building process grows by far less than the file."""
    import subprocess
    import sys
    import textwrap

    x = np.random.default_rng(13).random((250_000, 256), dtype=np.float32)
    folder = _extraction_folder(tmp_path / "desc", x, [f"{i}.jpg" for i in range(len(x))])
    del x
    script = textwrap.dedent(f"""
        import json, re, numpy as np
        from remap_lib.search.index import RetrievalIndex
        from remap_lib.search.sources import DescriptorSource
        def peak():  # MiB; VmHWM starts afresh at exec (ru_maxrss would carry pytest's)
            status = open("/proc/self/status").read()
            return int(re.search(r"VmHWM:\\s+(\\d+)", status).group(1)) / 1024
        before = peak()
        source = DescriptorSource.open({str(folder)!r})
        index = RetrievalIndex.build(source, "Flat", truncate=8, chunk=5000)
        streamed = peak() - before
        assert len(index) == 250_000
        matrix = np.load({str(folder / "descriptors.npy")!r})  # the control: loading it whole
        print(json.dumps({{"streamed": streamed, "whole": peak() - before}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    grown = __import__("json").loads(out.stdout.splitlines()[-1])
    assert grown["whole"] > 230  # the measurement sees a whole-matrix load (244 MiB)...
    assert grown["streamed"] < 100  # ...streaming added 43 MiB (a 5 MB chunk, 8 MB of codes, the path table)


def test_add_with_assigned_lists_equals_add():
    """The GPU add path (coarse assignment by another index, faiss add_core) through a rotation and refine,
    run on the CPU."""
    x = _clustered(4000, 32, 20, 1.0, 14)
    paths = [str(i) for i in range(len(x))]
    a = RetrievalIndex(32, "RR32,IVF16,PQ8", refine="SQ8")  # a rotation in front, as OPQ (cheaper to train)
    a.train(x[:3000])
    b = RetrievalIndex(32, "RR32,IVF16,PQ8", refine="SQ8", _index=faiss.clone_index(a.index))
    a.add(x, paths)
    b._add_vectors(x, assigner=faiss.extract_index_ivf(b.index).quantizer)
    b.paths = paths
    assert len(b) == 4000
    assert np.array_equal(a.search(x[:30], 10, nprobe=4)[1], b.search(x[:30], 10, nprobe=4)[1])


@pytest.mark.skipif(not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0,
                    reason="no GPU faiss: install faiss-gpu on a machine with a CUDA GPU to run this test")
def test_gpu_train_add_search_agree_with_cpu():
    from remap_lib.search.sources import DescriptorSource

    x = _clustered(20_000, 64, 50, 1.0, 15)
    source = DescriptorSource.from_array(x, [str(i) for i in range(len(x))])
    cpu = RetrievalIndex.build(source, "IVF64,PQ16", refine="SQ8", refine_k=16, train_size=10_000, nprobe=8)
    gpu = RetrievalIndex.build(source, "IVF64,PQ16", refine="SQ8", refine_k=16, train_size=10_000, nprobe=8,
                               use_gpu=True)
    truth = RetrievalIndex(64, "Flat")
    truth.add(x, source.paths)
    q = x[:100] + 0.05 * _unit(100, 64, 16)
    exact = truth.search(q, 10)[1]
    r_cpu = _overlap_at_10(cpu.search(q, 10)[1], exact)
    r_gpu = _overlap_at_10(gpu.search(q, 10, use_gpu=True)[1], exact)
    assert r_gpu >= r_cpu - 0.05 and r_gpu >= 0.85


def test_cli_index_build_at_scale_options(tmp_path, capsys):
    x = _clustered(3000, 32, 20, 1.0, 17)
    desc = _extraction_folder(tmp_path / "desc", x)
    out = tmp_path / "r.remap"
    build = ["index", "build", str(desc), "-q", "--factory", "IVF16,PQ8", "--train-size", "2000", "--chunk", "700"]
    assert main(build + ["-o", str(out), "--refine", "SQ8", "--refine-k", "4"]) == 0
    assert "Refine(SQ8) x4" in capsys.readouterr().out
    loaded = RetrievalIndex.load(out)
    assert loaded.refine == "SQ8" and loaded.refine_k == 4 and loaded.bytes_per_vector() == 8 + 32
    disk = tmp_path / "d.remap"
    assert main(build + ["-o", str(disk), "--on-disk", "--shards", "2"]) == 0
    assert "d.remap.ivfdata" in capsys.readouterr().out
    assert main(["index", "search", str(disk), "--descriptors", str(desc), "-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"query {loaded.paths[0]}" and lines[1].split(None, 2)[2] == loaded.paths[0]
    for bad, message in ((["--on-disk", "--refine", "SQ8"], "--refine"), (["--shards", "2"], "--on-disk"),
                         (["--refine", "Bogus"], "faiss cannot build"), (["--on-disk"], None)):
        target = tmp_path / "bad.remap"
        if message is None:  # an on-disk index needs an inverted file
            bad_cmd = ["index", "build", str(desc), "-q", "--factory", "PQ8", "-o", str(target)] + bad
        else:
            bad_cmd = build + ["-o", str(target)] + bad
        assert main(bad_cmd) == 2
        assert (message or "inverted file") in capsys.readouterr().err
        assert not target.exists() and not (tmp_path / "bad.remap.ivfdata").exists()
    with open(desc / "descriptors.npy", "r+b") as f:  # damage the last float: found by the streamed checksum
        f.seek(-4, 2)
        f.write(np.float32(0.5).tobytes())
    assert main(build + ["-o", str(tmp_path / "damaged.remap")]) == 2
    assert "does not match manifest.json" in capsys.readouterr().err
    assert not (tmp_path / "damaged.remap").exists()


# ---------------------------------------------------------------------- issue 25: files, overwrites, messages
def _small_index(tmp_path, n=50, name="i.remap"):
    """An extraction folder of ``n`` rows and a Flat index of it, built by `remap index build`."""
    desc = _extraction_folder(tmp_path / "desc", _unit(n, 16, 20), [f"photos/{i}.jpg" for i in range(n)])
    out = tmp_path / name
    assert main(["index", "build", str(desc), "-o", str(out), "-q"]) == 0
    return desc, out


def _split(data: bytes):
    """``(header, body)`` of an index file's bytes."""
    import json
    import struct

    (n,) = struct.unpack("<Q", data[8:16])
    return json.loads(data[16:16 + n]), data[16 + n:]


def _join(header: dict, body: bytes, rehash: str | None = None) -> bytes:
    """An index file of ``header`` and ``body``; ``rehash``: recompute its checksum as format ``"v4"``
    (the header's canonical JSON, then the body) or ``"v3"`` (the body only) would."""
    import hashlib
    import json
    import struct

    header = dict(header)
    if rehash == "v4":
        fields = {k: v for k, v in header.items() if k != "sha256"}
        header["sha256"] = hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
                                          + body).hexdigest()
    elif rehash == "v3":
        header["sha256"] = hashlib.sha256(body).hexdigest()
    head = json.dumps(header).encode()
    return b"REMAPIDX" + struct.pack("<Q", len(head)) + head + body


def _changed(value):
    """Another value of the same kind (the first item of a dict or list changed)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value[:-1] + ("0" if value[-1:] != "0" else "1")
    if isinstance(value, dict):
        return {**value, next(iter(value)): _changed(next(iter(value.values())))} if value else {"checkpoint": "/x"}
    if isinstance(value, list):
        return [_changed(value[0])] + value[1:] if value else [1]
    return 1  # None


def test_every_header_field_edit_is_refused(tmp_path):
    desc, out = _small_index(tmp_path)
    good = out.read_bytes()
    header, body = _split(good)
    accepted = []
    for key in header:
        out.write_bytes(_join({**header, key: _changed(header[key])}, body))  # the file edited in place
        try:
            RetrievalIndex.load(out)
            accepted.append(key)
        except IndexFileError as exc:
            assert str(out) in str(exc), (key, str(exc))
        except Exception as exc:  # noqa: BLE001 - a crash is no clear refusal either
            accepted.append(f"{key} ({type(exc).__name__}: {exc})")
    assert not accepted, f"header edits not refused with an IndexFileError: {accepted}"
    assert header["version"] == 4 and header["count"] == 50 and header["weights_fingerprint"] == "f" * 16
    # the issue's own edit, byte for byte: the same length, so only the checksum can see it
    sizes = b'"image_sizes": [%d]' % header["model_config"]["image_sizes"][0]
    assert good.count(sizes) == 1
    out.write_bytes(good.replace(sizes, sizes[:-2] + b"7]"))
    with pytest.raises(IndexFileError, match="corrupt: its checksum does not match"):
        RetrievalIndex.load(out)
    out.write_bytes(good)
    assert len(RetrievalIndex.load(out)) == 50


def test_an_index_of_the_old_format_is_refused_with_a_message_to_rebuild_it(tmp_path):
    _, out = _small_index(tmp_path)
    header, body = _split(out.read_bytes())
    old = tmp_path / "old.remap"
    old.write_bytes(_join({**header, "version": 3}, body, rehash="v3"))  # as remap wrote it before issue 25
    with pytest.raises(IndexFileError, match=r"old.remap was written by an older remap \(index format 3.*rebuild"):
        RetrievalIndex.load(old)
    old.write_bytes(_join({**header, "version": 5}, body, rehash="v4"))
    with pytest.raises(IndexFileError, match="newer remap"):
        RetrievalIndex.load(old)


def test_search_by_image_refuses_a_header_that_does_not_give_its_recorded_model(tmp_path, photo_dir, capsys):
    desc, index = tmp_path / "desc", tmp_path / "i.remap"
    assert main(["extract", str(photo_dir), "-o", str(desc), "--head", "gem", "--image-size", "64", "-q",
                 "--workers", "0", "--engine", "torch"]) == 0
    assert main(["index", "build", str(desc), "-o", str(index), "-q"]) == 0
    query = ["index", "search", str(index), str(photo_dir / "coffee.png"), "-k", "3", "--engine", "torch"]
    good = index.read_bytes()
    header, body = _split(good)
    assert header["model_config"]["image_sizes"] == [64]
    capsys.readouterr()
    # the edit: [64] -> [65] in place; a search by image then scored the image itself 0.948
    index.write_bytes(good.replace(b'"image_sizes": [64]', b'"image_sizes": [65]'))
    assert main(query) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {index} is corrupt: its checksum does not match") and err.count("\n") == 1
    # the same edit with a checksum to match (another remap, or on purpose): the rebuilt model is not the recorded one
    edited = {**header, "model_config": {**header["model_config"], "image_sizes": [65]}}
    index.write_bytes(_join(edited, body, rehash="v4"))
    assert main(query) == 2
    err = capsys.readouterr().err
    assert f"{index} records model digest {header['model_digest']}, but its model config gives" in err
    assert "rebuild the index" in err
    index.write_bytes(_join({**header, "weights_fingerprint": None}, body, rehash="v4"))
    assert main(query) == 2
    assert "records no weights fingerprint" in capsys.readouterr().err
    index.write_bytes(good)
    assert main(query) == 0
    hit = capsys.readouterr().out.splitlines()[1].split()
    assert hit[2].endswith("coffee.png") and float(hit[1]) == pytest.approx(1.0, abs=1e-4)


def test_index_build_refuses_to_overwrite_its_input_or_a_file_that_is_not_an_index(tmp_path, capsys):
    desc, out = _small_index(tmp_path)
    inputs = {p.name: p.read_bytes() for p in desc.iterdir()}
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    capsys.readouterr()
    for target, force in ((desc / "descriptors.npy", []), (desc / "descriptors.npy", ["--force"]),
                          (desc / "manifest.json", ["--force"])):
        assert main(["index", "build", str(desc), "-o", str(target), "-q"] + force) == 2
        err = capsys.readouterr().err
        assert err == f"error: -o {target} is an input of the index; write the index to another file\n"
    assert main(["index", "build", str(desc), "-o", str(notes), "-q"]) == 2
    assert f"error: -o {notes} exists and is not a remap index" in capsys.readouterr().err
    assert notes.read_text() == "my notes\n"
    assert {p.name: p.read_bytes() for p in desc.iterdir()} == inputs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["desc", "i.remap", "notes.txt"]  # no temporary files
    assert main(["index", "build", str(desc), "-o", str(notes), "-q", "--force"]) == 0  # asked for
    assert len(RetrievalIndex.load(notes)) == 50
    out.write_bytes(out.read_bytes()[:100])  # an existing index, even a damaged one, is rebuilt in place
    assert main(["index", "build", str(desc), "-o", str(out), "-q"]) == 0
    assert len(RetrievalIndex.load(out)) == 50


def test_descriptors_overwritten_by_an_index_get_a_message_not_numpy_advice(tmp_path, capsys):
    """After such an accident: a message naming the file and what to do, never numpy's "allow_pickle" advice."""
    desc, out = _small_index(tmp_path)
    (desc / "descriptors.npy").write_bytes(out.read_bytes())
    capsys.readouterr()
    for argv in (["index", "build", str(desc), "-o", str(tmp_path / "new.remap"), "-q"],
                 ["index", "add", str(out), str(desc)],
                 ["index", "search", str(out), "--descriptors", str(desc)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {desc / 'descriptors.npy'} is not a plain numpy array"), argv
        assert "rerun the same `remap extract` command" in err and "pickle" not in err, argv


def test_adding_images_already_in_the_index_is_refused(tmp_path, capsys):
    desc, out = _small_index(tmp_path)
    before = out.read_bytes()
    capsys.readouterr()
    assert main(["index", "add", str(out), str(desc)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: 50 of the 50 images of {desc} are already in {out} (e.g. photos/0.jpg); "
                          "nothing was added")
    assert "rebuild the index" in err and out.read_bytes() == before
    more = _extraction_folder(tmp_path / "more", _unit(15, 16, 21),
                              [f"photos/./{i}.jpg" for i in range(10)] + [f"new/{i}.jpg" for i in range(5)])
    assert main(["index", "add", str(out), str(more)]) == 2
    assert "10 of the 15 images" in capsys.readouterr().err and out.read_bytes() == before
    new = _extraction_folder(tmp_path / "new", _unit(5, 16, 22), [f"new/{i}.jpg" for i in range(5)])
    assert main(["index", "add", str(out), str(new)]) == 0
    assert "added 5 images; 55 in" in capsys.readouterr().out
    assert len(RetrievalIndex.load(out)) == 55


def test_an_interrupted_index_build_does_not_promise_to_resume(tmp_path, monkeypatch, capsys):
    import remap_lib.app.cli as cli

    desc = _extraction_folder(tmp_path / "desc", _unit(20, 16, 23))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(RetrievalIndex, "build", classmethod(interrupted))
    assert main(["index", "build", str(desc), "-o", str(tmp_path / "i.remap"), "-q"]) == 130
    err = capsys.readouterr().err
    assert err == ("error: interrupted; the index was not written (a build does not resume); run the same "
                   "command again to build it\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["desc"]
    monkeypatch.setattr(cli, "cmd_extract", interrupted)  # a command that does resume keeps its message
    assert main(["extract", str(desc), "-o", str(tmp_path / "out")]) == 130
    assert "finished work is on disk, run the same command again to resume" in capsys.readouterr().err


def test_a_failed_write_names_the_index_and_leaves_nothing_behind(tmp_path, monkeypatch, capsys):
    import os

    desc, out = _small_index(tmp_path)
    before, listing = out.read_bytes(), sorted(os.listdir(tmp_path))
    index = RetrievalIndex.load(out)

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(os, "fsync", full_disk)
        with pytest.raises(OSError, match="No space left on device") as caught:
            index.save(out)
        assert str(caught.value) == f"cannot write the index {out}: No space left on device; nothing was replaced"
        assert caught.value.errno == 28
        capsys.readouterr()
        assert main(["index", "build", str(desc), "-o", str(tmp_path / "new.remap"), "-q"]) == 2
        assert capsys.readouterr().err == (f"error: cannot write the index {tmp_path / 'new.remap'}: No space left "
                                           "on device; nothing was replaced\n")
    with monkeypatch.context() as m:  # faiss's own message says neither which file nor why
        m.setattr(faiss, "write_index", lambda *a: (_ for _ in ()).throw(RuntimeError(
            "Error in faiss::FileIOWriter::operator()(const void *, size_t, size_t) at io.cpp:98: Error: "
            "'ret == (nitems)' failed: write error in /tmp/x: 32000 requested and 25568 written")))
        with pytest.raises(OSError, match=f"cannot write the index {out}: .*32000 requested and 25568 written"):
            index.save(out)
    assert out.read_bytes() == before and sorted(os.listdir(tmp_path)) == listing


def test_a_254_byte_output_name_is_built(tmp_path, capsys):
    desc = _extraction_folder(tmp_path / "desc", _unit(300, 16, 24))
    long = tmp_path / ("i" * 248 + ".remap")
    assert len(long.name.encode()) == 254
    assert main(["index", "build", str(desc), "-o", str(long), "-q"]) == 0
    assert len(RetrievalIndex.load(long)) == 300
    assert sorted(p.name for p in tmp_path.iterdir()) == ["desc", long.name]
    # on disk, NAME.ivfdata cannot exist beside it: refused before the build, not after
    other = tmp_path / ("j" * 248 + ".remap")
    capsys.readouterr()
    assert main(["index", "build", str(desc), "-o", str(other), "-q", "--factory", "IVF4,Flat", "--on-disk",
                 "--train-size", "300"]) == 2
    assert "too long a name for an on-disk index" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["desc", long.name]


def test_model_mismatch_messages_fit_the_caller():
    index = RetrievalIndex(8, "Flat", ModelConfig(head="rmac", levels=3).to_dict(), weights_fingerprint="a" * 16)
    other = ModelConfig(head="rmac", levels=4).to_dict()
    with pytest.raises(ModelMismatchError, match=r"^the query model \(digest"):
        index.check_model(other)
    with pytest.raises(ModelMismatchError, match=r"^these descriptors were made by another model than the index's"):
        index.check_model(other, role="add")
    same = ModelConfig(head="rmac", levels=3).to_dict()
    with pytest.raises(ModelMismatchError, match="^these descriptors were made with the index's model config but "
                                                 "other weights"):
        index.check_model(same, "b" * 16, role="add")
    with pytest.raises(ModelMismatchError, match="; these descriptors are bf16$"):
        index.check_model(same, "a" * 16, "bf16", role="add")


def test_qe_alpha_must_be_a_finite_number_not_below_0(capsys):
    db, q = _unit(10, 4, 25), _unit(1, 4, 26)
    for alpha in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="alpha must be a finite number, 0 or more"):
            alpha_query_expansion(q, db, k=2, alpha=alpha)
    for bad in ("nan", "-1", "inf", "x"):
        with pytest.raises(SystemExit) as caught:
            main(["index", "search", "i.remap", "--descriptors", "d", "--qe", "2", "--qe-alpha", bad])
        assert caught.value.code == 2
        assert f"argument --qe-alpha: '{bad}' must be a finite number, 0 or more" in capsys.readouterr().err
