"""Retrieval metrics (remap_lib.evaluation.metrics): hand-computed values and revisitop's reference code.

Conventions recalled: ``ranks`` is ``(n_queries, n_database)``; AP is revisitop's
trapezoidal rule: the j-th relevant image (0-based) found at 0-based position r
(junk removed first) adds ``(P_before + P_at) / 2 / n_relevant`` with
``P_before = j / r`` (1 when r == 0) and ``P_at = (j + 1) / (r + 1)``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from remap_lib.evaluation.metrics import (
    average_precision,
    holidays_map,
    mean_average_precision,
    mean_precision_at_k,
    rank_database,
    recall_at_k,
    revisited_gnd,
    revisited_map,
    ukbench_score,
)


# --------------------------------------------------------------------------- revisitop reference
# Verbatim transcription of revisitop's python/evaluate.py (Radenović et al. 2018),
# with np.in1d replaced by np.isin (np.in1d is deprecated / removed in NumPy 2).
# revisitop's ranks are (n_database, n_queries): the transpose of ours.


def compute_ap(ranks, nres):
    nimgranks = len(ranks)
    ap = 0
    recall_step = 1. / nres
    for j in np.arange(nimgranks):
        rank = ranks[j]
        if rank == 0:
            precision_0 = 1.
        else:
            precision_0 = float(j) / rank
        precision_1 = float(j + 1) / (rank + 1)
        ap += (precision_0 + precision_1) * recall_step / 2.
    return ap


def compute_map(ranks, gnd, kappas=[]):
    map = 0.
    nq = len(gnd)  # number of queries
    aps = np.zeros(nq)
    pr = np.zeros(len(kappas))
    prs = np.zeros((nq, len(kappas)))
    nempty = 0
    for i in np.arange(nq):
        qgnd = np.array(gnd[i]['ok'])
        # no positive images, skip from the average
        if qgnd.shape[0] == 0:
            aps[i] = float('nan')
            prs[i, :] = float('nan')
            nempty += 1
            continue
        try:
            qgndj = np.array(gnd[i]['junk'])
        except Exception:
            qgndj = np.empty(0)
        # sorted positions of positive and junk images (0 based)
        pos = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgnd)]
        junk = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgndj)]
        k = 0
        ij = 0
        if len(junk):
            # decrease positions of positives based on the number of
            # junk images appearing before them
            ip = 0
            while (ip < len(pos)):
                while (ij < len(junk) and pos[ip] > junk[ij]):
                    k += 1
                    ij += 1
                pos[ip] = pos[ip] - k
                ip += 1
        # compute ap
        ap = compute_ap(pos, len(qgnd))
        map = map + ap
        aps[i] = ap
        # compute precision @ k
        pos += 1  # get it to 1-based
        for j in np.arange(len(kappas)):
            kq = min(max(pos), kappas[j])
            prs[i, j] = (pos <= kq).sum() / kq
        pr = pr + prs[i, :]
    map = map / (nq - nempty)
    pr = pr / (nq - nempty)
    return map, aps, pr, prs


# --------------------------------------------------------------------------- hand examples

# One ranking of a 6-image database used below.
RANKING = [3, 0, 5, 1, 2, 4]


def test_average_precision_hand_values():
    # Relevant at positions 0,1,2 of 3: every term is (1 + 1) / 2 -> AP = 3 / 3 = 1.
    assert average_precision([0, 1, 2], 3) == pytest.approx(1.0)
    # Positions [1, 3], 2 relevant:
    #   j=0, r=1: (0/1 + 1/2) / 2 = 1/4;  j=1, r=3: (1/3 + 2/4) / 2 = 5/12
    #   AP = (1/4 + 5/12) / 2 = (8/12) / 2 = 1/3  (non-interpolated AP would be 1/2)
    assert average_precision([1, 3], 2) == pytest.approx(1 / 3)
    # Positions [0, 2] out of 4 relevant (2 never retrieved):
    #   j=0, r=0: (1 + 1) / 2 = 1;  j=1, r=2: (1/2 + 2/3) / 2 = 7/12  ->  (19/12) / 4 = 19/48
    assert average_precision([0, 2], 4) == pytest.approx(19 / 48)
    # Nothing retrieved -> 0.
    assert average_precision([], 2) == 0.0
    with pytest.raises(ValueError):
        average_precision([0], 0)


def test_map_junk_empty_ok_and_truncation_by_hand():
    ranks = np.array([
        RANKING,             # q0: ok {0,1} at positions 1, 3 -> AP 1/3 (see above)
        RANKING,             # q1: ok {0,1}, junk {3}: ranking becomes [0,5,1,2,4] -> positions 0, 2
        RANKING,             # q2: no relevant image -> NaN, left out of the mean
    ])
    gnd = [{"ok": [0, 1], "junk": []}, {"ok": [1, 0], "junk": [3]}, {"ok": [], "junk": [2]}]
    m, aps = mean_average_precision(ranks, gnd)
    # q1: j=0, r=0 -> 1;  j=1, r=2 -> 7/12;  AP = (19/12) / 2 = 19/24
    assert aps[0] == pytest.approx(1 / 3)
    assert aps[1] == pytest.approx(19 / 24)
    assert math.isnan(aps[2])
    # mean over q0, q1 only: (8/24 + 19/24) / 2 = 27/48 = 9/16
    assert m == pytest.approx(9 / 16)
    # "junk" is optional
    m2, aps2 = mean_average_precision(ranks[:1], [{"ok": [0, 1]}])
    assert m2 == pytest.approx(1 / 3) and aps2[0] == pytest.approx(1 / 3)


def test_truncated_rankings_count_missing_relevant_as_not_retrieved():
    # Top-3 only: row [3, 0, 5]; ok {0, 1}: 0 at position 1, 1 is missing.
    #   j=0, r=1: (0 + 1/2) / 2 = 1/4; divided by n_relevant = 2 -> 1/8
    m, aps = mean_average_precision(np.array([[3, 0, 5]]), [{"ok": [0, 1]}])
    assert aps[0] == pytest.approx(1 / 8) and m == pytest.approx(1 / 8)
    # No relevant image in the truncated row: AP 0 (not NaN, not skipped).
    m, aps = mean_average_precision(np.array([[3, 5, 2], [0, 1, 2]]), [{"ok": [0, 1]}, {"ok": [0]}])
    assert aps.tolist() == [0.0, 1.0] and m == pytest.approx(0.5)
    # P@k: the truncated query with nothing retrieved scores 0 at every k.
    mp, prs = mean_precision_at_k(np.array([[3, 5, 2]]), [{"ok": [0, 1]}], ks=(1, 5))
    assert prs.tolist() == [[0.0, 0.0]] and mp.tolist() == [0.0, 0.0]


def test_all_queries_empty_gives_nan_map():
    m, aps = mean_average_precision(np.array([[0, 1], [1, 0]]), [{"ok": []}, {"ok": []}])
    assert math.isnan(m) and np.isnan(aps).all()


def test_mean_precision_at_k_by_hand():
    # Rankings truncated to the top 4 (RANKING[:4] = [3, 0, 5, 1] still holds 0 and 1).
    ranks = np.array([RANKING[:4], RANKING[:4], RANKING[:4], [2, 0, 5, 4]])
    gnd = [{"ok": [0, 1]}, {"ok": [0, 1], "junk": [3]}, {"ok": []}, {"ok": [0, 1]}]
    mp, prs = mean_precision_at_k(ranks, gnd, ks=(1, 5, 10))
    # q0: 1-based positions [2, 4]; cut = min(4, k): k=1 -> 0/1; k=5,10 -> cut 4 -> 2/4
    # q1: junk removed -> positions [1, 3]: k=1 -> 1/1; k=5,10 -> cut 3 -> 2/3
    # q2: NaN; q3 (1 not in its top 4): positions [2]: k=1 -> 0; k=5,10 -> cut 2 -> 1/2
    np.testing.assert_allclose(prs[[0, 1, 3]], [[0, .5, .5], [1, 2 / 3, 2 / 3], [0, .5, .5]])
    assert np.isnan(prs[2]).all()
    # means over q0, q1, q3: k=1 -> 1/3; k=5,10 -> (1/2 + 2/3 + 1/2) / 3 = 5/9
    np.testing.assert_allclose(mp, [1 / 3, 5 / 9, 5 / 9])


# --------------------------------------------------------------------------- revisitop equality


def _random_problem(rng, nq, ndb):
    ranks = np.stack([rng.permutation(ndb) for _ in range(nq)])
    gnd = []
    for q in range(nq):
        perm = rng.permutation(ndb)
        n_ok = int(rng.integers(0, 7)) if q else int(rng.integers(1, 7))  # some empty, never all
        n_junk = int(rng.integers(0, 6))
        gnd.append({"ok": perm[:n_ok].tolist(), "junk": perm[n_ok:n_ok + n_junk].tolist()})
    return ranks, gnd


@pytest.mark.parametrize("seed", range(25))
def test_equals_revisitop_compute_map(seed):
    rng = np.random.default_rng(seed)
    ranks, gnd = _random_problem(rng, nq=int(rng.integers(1, 9)), ndb=int(rng.integers(8, 40)))
    ref_map, ref_aps, ref_pr, ref_prs = compute_map(ranks.T, gnd, kappas=[1, 5, 10])
    m, aps = mean_average_precision(ranks, gnd)
    mp, prs = mean_precision_at_k(ranks, gnd, ks=(1, 5, 10))
    assert m == pytest.approx(ref_map, abs=1e-12)
    np.testing.assert_allclose(aps, ref_aps, rtol=0, atol=1e-12)  # NaNs must match too
    np.testing.assert_allclose(mp, ref_pr, rtol=0, atol=1e-12)
    np.testing.assert_allclose(prs, ref_prs, rtol=0, atol=1e-12)
    # average_precision alone equals compute_ap on the same junk-free positions
    for q, g in enumerate(gnd):
        if g["ok"]:
            kept = [i for i in ranks[q] if i not in set(g["junk"])]
            pos = np.flatnonzero(np.isin(kept, g["ok"]))
            assert average_precision(pos, len(g["ok"])) == pytest.approx(compute_ap(pos, len(g["ok"])), abs=1e-12)


def test_revisitop_equality_is_not_vacuous():
    # The reference itself gives the hand value of the example above (1/3, 19/24).
    ranks = np.array([RANKING, RANKING])
    ref_map, ref_aps, _, _ = compute_map(ranks.T, [{"ok": [0, 1], "junk": []}, {"ok": [0, 1], "junk": [3]}])
    np.testing.assert_allclose(ref_aps, [1 / 3, 19 / 24])


def test_positive_also_listed_as_junk_scores_like_revisitop():
    # Ranking 0..9, ok = [0, 3], junk = [3].  revisitop finds the positives at [0, 3] and the
    # junk at [3] independently, then lowers each positive by the junk ranked strictly before it
    # (none: 3 is not before itself), so both positives stay at 0 and 3:
    #   j=0, r=0: (1 + 1) / 2 = 1;  j=1, r=3: (1/3 + 2/4) / 2 = 5/12  ->  AP = (17/12) / 2 = 17/24 = 0.7083
    # (removing the junk from the ranking first would drop image 3 and give (1 + 0) / 2 = 0.5).
    ranks = np.arange(10)[None]
    gnd = [{"ok": [0, 3], "junk": [3]}]
    ref_map, ref_aps, ref_pr, _ = compute_map(ranks.T, gnd, kappas=[1, 5])
    assert ref_aps[0] == pytest.approx(17 / 24)  # the reference's own value: 0.708...
    m, aps = mean_average_precision(ranks, gnd)
    assert aps[0] == pytest.approx(17 / 24, abs=1e-12) and m == pytest.approx(17 / 24, abs=1e-12)
    # P@k, 1-based positions [1, 4]: k=1 -> 1/1; k=5 -> cut 4 -> 2/4
    mp, _ = mean_precision_at_k(ranks, gnd, ks=(1, 5))
    np.testing.assert_allclose(mp, [1.0, 0.5])
    np.testing.assert_allclose(mp, ref_pr)
    # A later positive: ok = [3, 5], junk = [3]: 3 stays at 3; 5 has the junk 3 before it -> 4.
    #   j=0, r=3: (0/3 + 1/4) / 2 = 1/8;  j=1, r=4: (1/4 + 2/5) / 2 = 13/40  ->  AP = (18/40) / 2 = 9/40
    gnd = [{"ok": [3, 5], "junk": [3]}]
    assert compute_map(ranks.T, gnd)[1][0] == pytest.approx(9 / 40)
    assert mean_average_precision(ranks, gnd)[1][0] == pytest.approx(9 / 40, abs=1e-12)


def _overlapping_problem(rng, nq, ndb):
    """Like :func:`_random_problem`, but some relevant images are also listed as junk."""
    ranks = np.stack([rng.permutation(ndb) for _ in range(nq)])
    gnd = []
    for q in range(nq):
        perm = rng.permutation(ndb)
        n_ok = int(rng.integers(1, 8))
        n_both = int(rng.integers(1, n_ok + 1))  # the last n_both relevant images are junk too
        n_junk = int(rng.integers(0, 6))
        gnd.append({"ok": perm[:n_ok].tolist(), "junk": perm[n_ok - n_both:n_ok + n_junk].tolist()})
    return ranks, gnd


@pytest.mark.parametrize("seed", range(25))
def test_equals_revisitop_compute_map_when_positives_are_also_junk(seed):
    rng = np.random.default_rng(100 + seed)
    ranks, gnd = _overlapping_problem(rng, nq=int(rng.integers(1, 9)), ndb=int(rng.integers(8, 40)))
    truncated = seed % 5 == 0
    if truncated:  # top-6 rankings (the reference's P@k fails when no positive is retrieved: AP only)
        ranks = ranks[:, :6]
    ref_map, ref_aps, ref_pr, ref_prs = compute_map(ranks.T, gnd, kappas=[] if truncated else [1, 5, 10])
    m, aps = mean_average_precision(ranks, gnd)
    assert m == pytest.approx(ref_map, abs=1e-12)
    np.testing.assert_allclose(aps, ref_aps, rtol=0, atol=1e-12)
    if truncated:
        return
    mp, prs = mean_precision_at_k(ranks, gnd, ks=(1, 5, 10))
    np.testing.assert_allclose(mp, ref_pr, rtol=0, atol=1e-12)
    np.testing.assert_allclose(prs, ref_prs, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- revisited protocols

# Database of 6 images, two queries.
REV_GND = [
    {"easy": [0, 1], "hard": [2], "junk": [3]},
    {"easy": [1], "hard": [], "junk": [5]},
]
REV_RANKS = np.array([[4, 0, 2, 1, 3, 5], [1, 5, 0, 2, 3, 4]])


def _sorted(entries):
    return [{"ok": sorted(e["ok"]), "junk": sorted(e["junk"])} for e in entries]


def test_revisited_gnd_construction():
    assert _sorted(revisited_gnd(REV_GND, "easy")) == [{"ok": [0, 1], "junk": [2, 3]}, {"ok": [1], "junk": [5]}]
    assert _sorted(revisited_gnd(REV_GND, "medium")) == [{"ok": [0, 1, 2], "junk": [3]}, {"ok": [1], "junk": [5]}]
    assert _sorted(revisited_gnd(REV_GND, "hard")) == [{"ok": [2], "junk": [0, 1, 3]}, {"ok": [], "junk": [1, 5]}]
    with pytest.raises(ValueError):
        revisited_gnd(REV_GND, "extreme")


def test_revisited_map_by_hand():
    res = revisited_map(REV_RANKS, REV_GND, ks=(1, 5, 10))
    # q0 ranking [4, 0, 2, 1, 3, 5]
    #  Easy: ok {0,1}, junk {3,2} -> [4,0,1,5]: positions 1, 2
    #        1/4 + (1/2 + 2/3)/2 = 1/4 + 7/12 = 5/6 -> AP = 5/12
    #  Medium: ok {0,1,2}, junk {3} -> [4,0,2,1,5]: positions 1, 2, 3
    #        1/4 + 7/12 + (2/3 + 3/4)/2 = 6/24 + 14/24 + 17/24 = 37/24 -> AP = 37/72
    #  Hard: ok {2}, junk {3,0,1} -> [4,2,5]: position 1 -> AP = 1/4
    # q1 ranking [1, 5, 0, 2, 3, 4]: Easy = Medium: ok {1} at position 0 -> AP 1; Hard: no ok -> NaN
    np.testing.assert_allclose(res["easy"]["aps"], [5 / 12, 1.0])
    np.testing.assert_allclose(res["medium"]["aps"], [37 / 72, 1.0])
    assert res["hard"]["aps"][0] == pytest.approx(0.25) and math.isnan(res["hard"]["aps"][1])
    assert res["easy"]["map"] == pytest.approx((5 / 12 + 1) / 2)  # 17/24
    assert res["medium"]["map"] == pytest.approx((37 / 72 + 1) / 2)  # 109/144
    assert res["hard"]["map"] == pytest.approx(0.25)  # q1 left out
    # mP@k, 1-based positions: q0 Easy [2,3], Medium [2,3,4], Hard [2]; q1 Easy/Medium [1]
    #  Easy:   k=1 (0 + 1)/2;  k=5,10: (2/3 + 1)/2
    #  Medium: k=1 (0 + 1)/2;  k=5,10: (3/4 + 1)/2
    #  Hard:   k=1 0;          k=5,10: cut 2 -> 1/2
    assert res["easy"]["mp@k"] == pytest.approx({1: 0.5, 5: 5 / 6, 10: 5 / 6})
    assert res["medium"]["mp@k"] == pytest.approx({1: 0.5, 5: 7 / 8, 10: 7 / 8})
    assert res["hard"]["mp@k"] == pytest.approx({1: 0.0, 5: 0.5, 10: 0.5})


# --------------------------------------------------------------------------- other benchmarks


def test_ukbench_score_by_hand():
    groups = [0, 0, 0, 0, 1, 1, 1, 1]
    top4 = [
        [0, 1, 2, 3],  # 4 of group 0
        [1, 0, 4, 2],  # 3
        [5, 2, 6, 7],  # 1
        [4, 5, 6, 7],  # 0
        [4, 5, 6, 7],  # 4
        [5, 0, 1, 4],  # 2
        [6, 7, 4, 5],  # 4
        [0, 1, 2, 3],  # 0
    ]
    ranks = np.array([t + [i for i in range(8) if i not in t] for t in top4])
    # (4 + 3 + 1 + 0 + 4 + 2 + 4 + 0) / 8 = 18 / 8
    assert ukbench_score(ranks, groups) == pytest.approx(2.25)
    # = 4 × Recall@4 with the query itself relevant
    gnd = [{"ok": [j for j in range(8) if groups[j] == groups[i]]} for i in range(8)]
    assert 4 * recall_at_k(ranks, gnd, 4) == pytest.approx(2.25)
    # Only the top 4 count: beyond position 4 nothing changes the score.
    assert ukbench_score(ranks[:, :4], groups) == pytest.approx(2.25)
    with pytest.raises(ValueError):
        ukbench_score(ranks[:7], groups)


def test_recall_at_k_by_hand():
    ranks = np.array([RANKING, RANKING, RANKING])
    gnd = [{"ok": [0, 1]}, {"ok": [0, 1], "junk": [3]}, {"ok": []}]
    # q0: 0 at position 1, 1 at position 3; q1 (3 removed): 0 at 0, 1 at 2; q2 skipped
    assert recall_at_k(ranks, gnd, 1) == pytest.approx((0 + 1 / 2) / 2)
    assert recall_at_k(ranks, gnd, 2) == pytest.approx((1 / 2 + 1 / 2) / 2)
    assert recall_at_k(ranks, gnd, 3) == pytest.approx((1 / 2 + 1) / 2)
    assert recall_at_k(ranks, gnd, 4) == pytest.approx(1.0)
    assert math.isnan(recall_at_k(ranks[2:], gnd[2:], 4))


def test_holidays_map_ignores_the_query_itself():
    # Database 100000, 100001, 100100, 100101, 100102 -> indices 0..4; queries are 0 and 2.
    gnd = [{"ok": [0, 1]}, {"ok": [2, 3, 4]}]  # query listed among its own relevant images
    ranks = np.array([[0, 3, 1, 2, 4], [2, 4, 0, 3, 1]])
    m, aps = holidays_map(ranks, gnd, [0, 2])
    # q0: self removed -> [3, 1, 2, 4], ok {1} at position 1 -> (0 + 1/2)/2 = 1/4
    #     (had the query counted: ok {0,1} at 0, 2 -> 19/24)
    # q1: self removed -> [4, 0, 3, 1], ok {3, 4} at 0, 2 -> (1 + 7/12)/2 = 19/24
    np.testing.assert_allclose(aps, [1 / 4, 19 / 24])
    assert m == pytest.approx((1 / 4 + 19 / 24) / 2)  # 25/48


def test_rank_database_ties_and_top_k():
    q = np.array([[1.0, 0.0], [0.0, 1.0]])
    db = np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.5, 0.0], [0.0, 1.0]])
    # q0 scores [0, 1, 1, .5, 0] -> 1, 2 (tie: lower first), 3, then 0, 4
    # q1 scores [1, 0, 0, 0, 1] -> 0, 4, then 1, 2, 3
    ranks = rank_database(q, db)
    assert ranks.shape == (2, 5)
    assert ranks.tolist() == [[1, 2, 3, 0, 4], [0, 4, 1, 2, 3]]
    top = rank_database(q, db, top_k=2)
    assert top.shape == (2, 2) and top.tolist() == [[1, 2], [0, 4]]


def test_rank_database_matches_bruteforce_on_random_descriptors():
    rng = np.random.default_rng(0)
    q, db = rng.normal(size=(4, 8)), rng.normal(size=(20, 8))
    scores = (q.astype(np.float32) @ db.astype(np.float32).T)
    ranks = rank_database(q, db, top_k=5)
    expected = [sorted(range(20), key=lambda i: (-scores[r, i], i))[:5] for r in range(4)]
    assert ranks.tolist() == expected


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("fn", [
    mean_average_precision,
    lambda r, g: mean_precision_at_k(r, g, (1, 5)),
    lambda r, g: recall_at_k(r, g, 2),
    revisited_map,
], ids=["map", "mp@k", "recall", "revisited"])
def test_wrong_ranks_shape_is_value_error(fn):
    gnd = [{"ok": [0], "junk": [], "easy": [0], "hard": []}]
    with pytest.raises(ValueError, match="shape"):
        fn(np.array([0, 1, 2]), gnd)


@pytest.mark.parametrize("fn", [
    mean_average_precision,
    lambda r, g: mean_precision_at_k(r, g, (1, 5)),
    lambda r, g: recall_at_k(r, g, 2),
], ids=["map", "mp@k", "recall"])
def test_gnd_errors_are_value_errors(fn):
    ranks = np.array([[0, 1, 2], [2, 1, 0]])
    with pytest.raises(ValueError, match="ground-truth entries"):
        fn(ranks, [{"ok": [0]}])  # 2 ranked queries, 1 entry
    with pytest.raises(ValueError, match="'ok'"):
        fn(ranks, [{"ok": [0]}, {"junk": [1]}])  # no 'ok'
    with pytest.raises(ValueError, match="'ok'"):
        fn(ranks, [{"ok": [0]}, [1, 2]])  # not a dict


def test_holidays_map_length_mismatch_is_value_error():
    with pytest.raises(ValueError):
        holidays_map(np.array([[0, 1, 2], [2, 1, 0]]), [{"ok": [1]}], [0])


def test_holidays_map_entry_without_ok_is_value_error():
    with pytest.raises(ValueError):
        holidays_map(np.array([[0, 1, 2]]), [{"junk": [1]}], [0])
