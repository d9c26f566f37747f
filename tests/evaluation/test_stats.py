"""Uncertainty of score-matrix metrics: hand-computed cases, then the machinery checked on simulated data with a
known truth (interval coverage, false-positive rate of the paired test), as STATISTICS.md §7 asks."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from lifealign.evaluation.matrix import ScoreMatrix, bwt, last
from lifealign.evaluation.stats import (
    bootstrap,
    bootstrap_p_value,
    cell_means,
    compare_methods,
    compare_to_baseline,
    holm,
    metric_statistics,
    minimal_detectable_difference,
    paired_binary_mde,
    summarize_method,
    underpowered,
)
from lifealign.utils.jsonio import nan_to_null

NAN = math.nan

# Expected (true) 4-task matrix of per-item success probabilities: P[r][j] = P(item of task j correct after stage r).
# Truth: BWT = ((.5 - .8) + (.6 - .8) + (.7 - .8)) / 3 = -0.2; Last = (.5 + .6 + .7 + .8) / 4 = 0.65.
P = np.array([[0.8, 0.3, 0.3, 0.3], [0.7, 0.8, 0.3, 0.3], [0.6, 0.7, 0.8, 0.3], [0.5, 0.6, 0.7, 0.8]])


def simulate(
    rng: np.random.Generator,
    probs: np.ndarray = P,
    n: int = 100,
    seeds: int = 1,
    shared: float = 0.7,
    item_latent: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Binary per-item scores ``(seeds, N, n)`` per task with ``E[y] = probs[r][j]`` exactly, upper triangle NaN.

    ``y = 1[W < p]`` with ``W`` uniform: with probability ``shared`` ``W`` is the item's own latent ``U_i`` (one per
    item, the same in every row and seed: a strong item effect), otherwise fresh noise. ``probs`` may carry a leading
    seed axis ``(seeds, N, N)``. ``item_latent`` (``(N, n)``) fixes the ``U_i`` (two methods on the same items).
    """
    n_tasks = probs.shape[-1]
    probs = np.broadcast_to(probs, (seeds, n_tasks, n_tasks))
    latent = rng.uniform(size=(n_tasks, n)) if item_latent is None else item_latent
    out = []
    for j in range(n_tasks):
        w = np.where(rng.uniform(size=(seeds, n_tasks, n)) < shared, latent[j], rng.uniform(size=(seeds, n_tasks, n)))
        y = (w < probs[:, :, j, None]).astype(np.float64)
        y[:, :j, :] = np.nan  # seen-only evaluation: task j is not scored before stage j
        out.append(y)
    return out


BWT_LAST = {k: v for k, v in metric_statistics().items() if k in ("bwt", "last")}


# --- hand-computed ---


def test_cell_means_hand_computed() -> None:
    """Two tasks, one seed, two items each. Task 0 rows: [1, 0] -> 0.5, [0, 0] -> 0; task 1: not scored after
    stage 0 (NaN), [1, 1] -> 1. Initial: task 0 [0, 1] -> 0.5, task 1 [0, 0] -> 0."""
    items = [np.array([[[1.0, 0.0], [0.0, 0.0]]]), np.array([[[NAN, NAN], [1.0, 1.0]]])]
    initial = [np.array([[0.0, 1.0]]), np.array([[0.0, 0.0]])]
    m, b = cell_means(items, initial)
    assert m.shape == (1, 2, 2) and b is not None and b.shape == (1, 2)
    np.testing.assert_allclose(m[0], [[0.5, NAN], [0.0, 1.0]])
    np.testing.assert_allclose(b[0], [0.5, 0.0])


def test_point_estimates_are_the_matrix_functions_of_the_seed_mean() -> None:
    """The bootstrap's points are matrix.py's metrics (with the chosen conventions) of the seed-averaged matrix."""
    items = simulate(np.random.default_rng(1), seeds=3, n=20)
    full = [np.nan_to_num(y, nan=0.25) for y in items]  # every cell scored, so FWT is defined
    initial = [np.full((3, 20), 0.1) for _ in range(4)]
    conv = {"bwt": "n_tasks", "forgetting": "final", "fwt": "all_prior"}
    est = bootstrap(full, initial, conventions=conv, n_boot=50)
    m, b = cell_means(full, initial)
    ref = ScoreMatrix(tasks=list("abcd"), matrix=m.mean(axis=0).tolist(), initial=b.mean(axis=0).tolist()).summary(conv)
    for k in ("bwt", "last", "ap", "fwt"):
        assert float(est[k].point) == pytest.approx(ref[k])
    np.testing.assert_allclose(est["forgetting"].point, ref["forgetting"])
    np.testing.assert_allclose(est["matrix"].point, ref["matrix"])


def test_single_cell_se_matches_the_closed_form() -> None:
    """One task, 400 items, 100 ones: mean 0.25, bootstrap SE ≈ √(p(1−p)/n) = √(0.1875/400) = 0.02165."""
    y = np.zeros((1, 1, 400))
    y[..., :100] = 1.0
    est = bootstrap([y], n_boot=4000, seed=3)["last"]
    assert float(est.point) == 0.25
    assert float(est.se) == pytest.approx(math.sqrt(0.25 * 0.75 / 400), rel=0.05)
    lo, hi = est.ci
    assert lo < 0.25 < hi and hi - lo == pytest.approx(2 * 1.96 * 0.02165, rel=0.1)
    assert est.n_items == (400,) and est.n_seeds == 1 and est.between_seeds is None


def test_pairing_cancels_items_that_never_change() -> None:
    """Each item scores the same after learning its task and at the end, so every replicate's BWT is exactly 0:
    the paired interval has zero width although each cell alone has a wide one."""
    rng = np.random.default_rng(0)
    items = []
    for j in range(3):
        y = np.repeat(rng.integers(0, 2, size=(1, 1, 30)).astype(float), 3, axis=1)
        y[:, :j] = np.nan
        items.append(y)
    est = bootstrap(items, n_boot=200)
    assert float(est["bwt"].point) == 0.0 and float(est["bwt"].se) == 0.0
    np.testing.assert_array_equal(est["bwt"].ci, [0.0, 0.0])
    assert np.all(est["matrix"].se[np.tril_indices(3)] > 0.03)
    assert np.isnan(est["matrix"].se[0, 2]) and np.isnan(est["matrix"].ci[0, 2]).all()


def test_clusters_of_one_item_equal_the_item_bootstrap_and_real_clusters_widen() -> None:
    """Singleton clusters draw exactly the item bootstrap's multiplicities. Clusters of 5 identical items carry
    the information of 1 item each, so the SE grows by about √5 ≈ 2.24."""
    base = (np.random.default_rng(2).uniform(size=(1, 1, 40)) < 0.5).astype(float)
    est_items = bootstrap([base], n_boot=500, seed=7)["last"]
    singletons = bootstrap([base], clusters=[3 * np.arange(40)], n_boot=500, seed=7)["last"]  # labels 0, 3, 6, …
    assert float(singletons.se) == float(est_items.se)
    repeated = np.repeat(base, 5, axis=-1)  # 200 items, 40 clusters of 5 copies
    labels = np.repeat(np.arange(40), 5)
    naive = bootstrap([repeated], n_boot=2000, seed=1)["last"]
    clustered = bootstrap([repeated], clusters=[labels], n_boot=2000, seed=1)["last"]
    assert clustered.n_clusters == (40,) and clustered.n_items == (200,)
    assert float(clustered.se / naive.se) == pytest.approx(math.sqrt(5), rel=0.15)


def test_bootstrap_is_reproducible_and_seed_dependent() -> None:
    items = simulate(np.random.default_rng(3), n=30)
    a, b, c = (bootstrap(items, n_boot=100, seed=s)["bwt"] for s in (5, 5, 6))
    assert float(a.se) == float(b.se) and float(a.se) != float(c.se)


def test_shapes_are_checked() -> None:
    with pytest.raises(ValueError, match="rows"):
        bootstrap([np.zeros((1, 2, 3))])  # one task but two rows
    with pytest.raises(ValueError, match="seeds"):
        bootstrap([np.zeros((1, 2, 3)), np.zeros((2, 2, 3))])
    with pytest.raises(ValueError, match="initial"):
        bootstrap([np.zeros((1, 1, 3))], [np.zeros((1, 4))])
    with pytest.raises(ValueError, match="one label per item"):
        bootstrap([np.zeros((1, 1, 3))], clusters=[np.zeros(2)])
    with pytest.raises(ValueError, match="same items"):
        compare_methods([np.zeros((1, 1, 3))], [np.zeros((1, 1, 4))])


# --- summarize_method: the scores.json shape ---


def test_summarize_method_is_json_ready() -> None:
    items = simulate(np.random.default_rng(4), n=25)
    initial = [np.zeros((1, 25)) for _ in range(4)]
    s = summarize_method(items, initial, n_boot=200, conventions={"bwt": "n_tasks"})
    assert s["conventions"] == {"bwt": "n_tasks", "forgetting": "chaudhry", "fwt": "untrained"}
    for k in ("bwt", "last", "ap", "fwt"):
        assert isinstance(s[k], float) and isinstance(s[f"{k}_se"], float) and len(s[f"{k}_ci"]) == 2
    assert s["bwt_ci"][0] <= s["bwt"] <= s["bwt_ci"][1]
    assert math.isnan(s["fwt"]) and all(math.isnan(v) for v in s["fwt_ci"])  # upper triangle not scored
    assert np.shape(s["matrix"]) == (4, 4) and np.shape(s["matrix_ci"]) == (4, 4, 2)
    assert math.isnan(s["matrix_ci"][0][3][0]) and not math.isnan(s["matrix_ci"][3][0][0])
    assert len(s["forgetting"]) == 3 and np.shape(s["forgetting_ci"]) == (3, 2)
    assert s["initial"] == [0.0] * 4 and s["n_items"] == [25] * 4 and s["n_seeds"] == 1
    assert "variance_components" not in s
    text = json.dumps(nan_to_null(s), allow_nan=False)
    assert json.loads(text)["matrix_ci"][0][3] == [None, None]


# --- acceptance: simulations with a known truth ---


def test_bwt_and_last_intervals_cover_the_truth() -> None:
    """1000 simulated data sets (100 binary items per task, strong item effects) from the expected matrix P: the
    95% percentile intervals (200 draws each) cover BWT = -0.2 and Last = 0.65 in at least 93% of them. Here 93.4%
    and 95.5%; 4000 other replicates of this design give 94.4% and 94.6%, and the normal interval ±1.96·se 94.8%
    (the bootstrap SE matches the true SD to 0.3%): percentile intervals from 200 draws run a little short."""
    truth = np.array([bwt(P), last(P)])
    assert truth == pytest.approx([-0.2, 0.65])
    hits = np.zeros(2)
    for r in range(1000):
        est = bootstrap(simulate(np.random.default_rng(10_000 + r)), statistics=BWT_LAST, n_boot=200, seed=r)
        cis = np.array([est["bwt"].ci, est["last"].ci])
        hits += (cis[:, 0] <= truth) & (truth <= cis[:, 1])
    assert np.all(hits / 1000 >= 0.93), hits / 1000


def test_paired_bwt_interval_is_narrower_than_unpaired() -> None:
    """Strong item effects (90% of each item's draws share its latent): the paired BWT SE is far below the SE that
    independent rows would give, √(Σ_j se(m[N-1][j])² + se(m[j][j])²) / (N-1) from the cells' own SEs."""
    est = bootstrap(simulate(np.random.default_rng(5), shared=0.9), n_boot=1000)
    se_cells = est["matrix"].se
    n = 4
    unpaired = math.sqrt(sum(se_cells[-1, j] ** 2 + se_cells[j, j] ** 2 for j in range(n - 1))) / (n - 1)
    assert float(est["bwt"].se) < 0.75 * unpaired
    assert np.diff(est["bwt"].ci)[0] < 0.75 * 2 * 1.96 * unpaired


def test_paired_test_false_positive_rate_under_the_null() -> None:
    """Two methods with identical item-score distributions on the same items (shared item latents): the paired
    bootstrap test of BWT at α = 0.05 rejects in 2%–6% of 2000 simulated data sets (a 5000-replicate run of this
    design gives 5.2%; 2000 keep the check's own noise at ±0.5 points)."""
    rejections = 0
    for r in range(2000):
        rng = np.random.default_rng(20_000 + r)
        latent = rng.uniform(size=(4, 100))
        a, b = simulate(rng, item_latent=latent), simulate(rng, item_latent=latent)
        rejections += compare_methods(a, b, metrics=("bwt",), n_boot=200, seed=r)["bwt"].p < 0.05
    assert 0.02 <= rejections / 2000 <= 0.06, rejections / 2000


def test_paired_test_detects_a_real_difference() -> None:
    """B forgets more (final row 0.25 lower on tasks 0-2: true BWT difference A − B = +0.25, about 6 SEs with 200
    items per task): the interval excludes 0, the p-value is small and the MDE is (z_0.975 + z_0.8)·se."""
    rng = np.random.default_rng(6)
    latent = rng.uniform(size=(4, 200))
    worse = P.copy()
    worse[-1, :3] -= 0.25
    a, b = simulate(rng, n=200, item_latent=latent), simulate(rng, worse, n=200, item_latent=latent)
    c = compare_methods(a, b, n_boot=1000)["bwt"]
    assert c.diff == pytest.approx(0.25, abs=4 * c.se) and c.ci[0] > 0 and c.p < 0.01
    assert c.mde == pytest.approx((1.959964 + 0.841621) * c.se, rel=1e-5)


def test_seed_effects_widen_the_interval_and_are_attributed_to_seeds() -> None:
    """4 seeds; in the second data set each seed's final row is shifted by -0.2, -0.1, +0.1, +0.2 (training
    randomness that changes BWT by as much). The hierarchical interval widens and between_seeds dominates."""
    rng = np.random.default_rng(7)
    latent = rng.uniform(size=(4, 200))
    shifted = np.repeat(P[None], 4, axis=0)
    shifted[:, -1, :] += np.array([-0.2, -0.1, 0.1, 0.2])[:, None]
    calm = bootstrap(simulate(rng, n=200, seeds=4, item_latent=latent), statistics=BWT_LAST, n_boot=1000)
    noisy = bootstrap(simulate(rng, shifted, n=200, seeds=4, item_latent=latent), statistics=BWT_LAST, n_boot=1000)
    width = {k: float(np.diff(e["bwt"].ci)[0]) for k, e in (("calm", calm), ("noisy", noisy))}
    assert width["noisy"] > 1.5 * width["calm"]
    assert float(noisy["bwt"].between_seeds) > 3 * float(noisy["bwt"].within_seeds)
    assert float(calm["bwt"].between_seeds) < float(noisy["bwt"].between_seeds) / 5
    total = float(noisy["bwt"].between_seeds + noisy["bwt"].within_seeds)
    assert float(noisy["bwt"].se) ** 2 == pytest.approx(total, rel=0.5)


def test_summarize_with_seeds_reports_variance_components() -> None:
    s = summarize_method(simulate(np.random.default_rng(8), n=20, seeds=3), n_boot=100)
    assert s["n_seeds"] == 3
    parts = s["variance_components"]["bwt"]
    assert parts["between_seeds"] >= 0 and parts["within_seeds"] >= 0
    assert np.shape(s["variance_components"]["matrix"]["within_seeds"]) == (4, 4)


# --- p-values, Holm, baseline table ---


def test_bootstrap_p_value_hand_computed() -> None:
    """d* = [-1, 1, 2, 3] (B = 4): #{d* ≤ 0} = 1, #{d* ≥ 0} = 3 -> p = 2·(1 + 1)/(4 + 1) = 0.8.
    All positive, B = 9: p = 2·(0 + 1)/10 = 0.2. All zero: p = min(1, 2·(4+1)/5) = 1."""
    assert bootstrap_p_value(np.array([-1.0, 1.0, 2.0, 3.0])) == pytest.approx(0.8)
    assert bootstrap_p_value(np.arange(1.0, 10.0)) == pytest.approx(0.2)
    assert bootstrap_p_value(np.zeros(4)) == 1.0
    assert math.isnan(bootstrap_p_value(np.array([1.0, NAN])))


def test_holm_hand_computed() -> None:
    """p = [0.01, 0.04, 0.03, 0.005], m = 4. Sorted: 0.005 (#4), 0.01 (#1), 0.03 (#3), 0.04 (#2).
    Scaled: 4·0.005 = 0.02, 3·0.01 = 0.03, 2·0.03 = 0.06, 1·0.04 = 0.04 -> running max 0.02, 0.03, 0.06, 0.06.
    In input order: [0.03, 0.06, 0.06, 0.02]. A NaN stays NaN and m counts only the finite ones."""
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    adjusted = holm([0.2, NAN, 0.4])  # m = 2: 2·0.2 = 0.4, max(0.4, 1·0.4) = 0.4
    assert adjusted[0] == pytest.approx(0.4) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.4)
    assert holm([0.6, 0.9]) == pytest.approx([1.0, 1.0])  # 2·0.6 capped at 1
    assert holm([]) == []


def test_compare_to_baseline_rows() -> None:
    """Three methods against "seqft": one row per (method, metric), Holm over all four rows."""
    rng = np.random.default_rng(9)
    latent = rng.uniform(size=(4, 60))
    better = P.copy()
    better[-1, :3] += 0.15
    items = {
        "seqft": simulate(rng, n=60, item_latent=latent),
        "same": simulate(rng, n=60, item_latent=latent),
        "better": simulate(rng, better, n=60, item_latent=latent),
    }
    rows = compare_to_baseline(items, "seqft", metrics=("bwt", "last"), n_boot=500)
    assert [(r["method"], r["metric"]) for r in rows] == [
        ("same", "bwt"),
        ("same", "last"),
        ("better", "bwt"),
        ("better", "last"),
    ]
    assert all(r["baseline"] == "seqft" for r in rows)
    assert [r["p_holm"] for r in rows] == pytest.approx(holm([r["p"] for r in rows]))
    for r in rows:
        assert r["ci"][0] <= r["diff"] <= r["ci"][1] and r["significant"] == (r["p_holm"] < 0.05)
        assert r["underpowered"] == underpowered(r["diff"], r["mde"], r["significant"])
    assert rows[2]["significant"] and rows[2]["diff"] > 0
    with pytest.raises(ValueError, match="baseline"):
        compare_to_baseline(items, "ewc")


# --- power ---


def test_minimal_detectable_difference_closed_form() -> None:
    """(z_0.975 + z_0.8)·σ_d/√n = (1.959964 + 0.841621)·1/√100 = 0.2801585 (STATISTICS.md's 2.8·σ_d/√n)."""
    assert minimal_detectable_difference(1.0, 100) == pytest.approx(0.2801585, rel=1e-6)
    assert minimal_detectable_difference(0.5, 25, alpha=0.01, power=0.9) == pytest.approx(
        (2.575829 + 1.281552) * 0.5 / 5, rel=1e-6
    )


def test_paired_binary_mde() -> None:
    """Binomial bound at p = 0.75, n = 83 (TruthfulQA's test split): σ_d = √(2·0.75·0.25) = 0.6124 ->
    2.8016·0.6124/√83 = 0.1883. With per-item scores: a − b = [1, 0, 0, 0] (SD ddof 1 = 0.5), n = 4 ->
    2.8016·0.5/2 = 0.7004."""
    assert paired_binary_mde(0.75, 83) == pytest.approx(2.8015852 * math.sqrt(0.375) / math.sqrt(83), rel=1e-6)
    a, b = np.array([1, 1, 0, 1]), np.array([0, 1, 0, 1])
    assert paired_binary_mde(0.75, 999, scores_a=a, scores_b=b) == pytest.approx(2.8015852 * 0.5 / 2, rel=1e-6)
    with pytest.raises(ValueError):
        paired_binary_mde(75.0, 83)


def test_underpowered_flag() -> None:
    assert underpowered(0.05, 0.19, significant=False)
    assert not underpowered(0.25, 0.19, significant=False)  # large enough to matter, just not significant
    assert not underpowered(0.05, 0.19, significant=True)
    assert not underpowered(NAN, 0.19, significant=False)
