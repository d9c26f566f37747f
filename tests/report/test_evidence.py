"""The report's evidence: intervals in the summary and the matrices, item counts, conventions, variance components,
paired tests and power from ``comparisons.json``, figures with error bars; older files still render.

Fixtures are ``lifealign.evaluation.stats.summarize_method`` on small synthetic per-item arrays (what the engine
merges into ``scores.json``), and hand-made ``comparisons.json`` rows of ``compare_to_baseline``'s shape.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from matplotlib.container import ErrorbarContainer

from lifealign.evaluation.matrix import ScoreMatrix
from lifealign.evaluation.stats import summarize_method
from lifealign.report.comparisons import comparison_verdict
from lifealign.report.markdown import render_report, write_report
from lifealign.report.plots import method_bars_figure, task_curves_figure
from lifealign.report.results import ScoresFileError, read_comparisons, read_scores, write_scores
from tests.report.test_report import table_rows

TASKS = ["a", "b", "c"]
N_ITEMS = (40, 30, 20)


def item_scores(final: float, seeds: int = 1, seed: int = 0) -> list[np.ndarray]:
    """Binary (0/100) per-item scores ``(S, 3, n_j)``: 70% just after learning, ``final`` after the last task,
    halfway in between; NaN above the diagonal (not evaluated)."""
    rng = np.random.default_rng(seed)
    out = []
    for j, n in enumerate(N_ITEMS):
        y = np.full((seeds, 3, n), np.nan)
        for r in range(j, 3):
            p = 0.7 if r == j else (0.7 + final) / 2 if r < 2 else final
            y[:, r, :] = 100.0 * (rng.random((seeds, n)) < p)
        out.append(y)
    return out


def uncertain_summary(final: float = 0.4, seeds: int = 1, seed: int = 0, **extra) -> dict:
    """A ``scores.json`` summary with intervals: ``summarize_method`` plus the task names (as the engine writes)."""
    return {"tasks": list(TASKS), **summarize_method(item_scores(final, seeds, seed), n_boot=200), **extra}


def through_json(tmp_path: Path, scores: dict) -> dict:
    """``scores`` as the report reads them back (``null`` -> NaN)."""
    write_scores(tmp_path, scores)
    return read_scores(tmp_path)


def cell(value: float, ci: list[float]) -> str:
    return f"{value:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"


# ------------------------------------------------------------------------------------------------------- intervals


def test_summary_table_shows_every_value_with_its_interval(tmp_path: Path) -> None:
    seqft, lifealign = uncertain_summary(0.4), uncertain_summary(0.68, seed=1)
    scores = through_json(tmp_path, {"seqft": {"pref_acc": seqft}, "lifealign": {"pref_acc": lifealign}})
    md = render_report(scores, {}, {})
    rows = table_rows(md, "Method")
    for method, s in [("seqft", seqft), ("lifealign", lifealign)]:
        for stat, label in [("bwt", "BWT"), ("last", "Last"), ("ap", "AP")]:
            assert rows[method][f"pref\\_acc {label}"] == cell(s[stat], s[f"{stat}_ci"])
            lo, hi = s[f"{stat}_ci"]
            assert lo <= s[stat] <= hi  # a sanity check of the fixture, not of the rendering
        assert rows[method]["Seeds"] == "1"
    assert "Brackets: 95% bootstrap percentile interval (200 resamples)" in md
    assert "BWT = mean of `m[N−1][j] − m[j][j]` over the first N−1 = 2 tasks (`lifealign`" in md
    assert "No intervals" not in md


def test_matrix_cells_show_value_and_se_and_columns_their_items(tmp_path: Path) -> None:
    items = item_scores(0.4)
    initial = [100.0 * (np.random.default_rng(5).random((1, n)) < 0.5) for n in N_ITEMS]
    s = {"tasks": TASKS, **summarize_method(items, initial, n_boot=200), "convention": "llamafactory"}
    scores = through_json(tmp_path, {"seqft": {"rouge_l": s}})
    md = render_report(scores, {}, {})
    rows = table_rows(md, "after \\ on")
    header = list(rows["after c"])
    assert header == ["after \\ on", "a (n=40)", "b (n=30)", "c (n=20)"]
    m, se = s["matrix"], s["matrix_se"]
    assert rows["after c"]["b (n=30)"] == f"{m[2][1]:.2f} ({se[2][1]:.2f})"
    assert rows["after a"]["a (n=40)"] == f"{m[0][0]:.2f} ({se[0][0]:.2f})"
    assert rows["after a"]["c (n=20)"] == "–"
    assert rows["untrained"]["a (n=40)"] == f"{s['initial'][0]:.2f} ({s['initial_se'][0]:.2f})"
    section = md.split("### seqft — rouge\\_l", 1)[1]
    assert "Cell: score (bootstrap SE); n = held-out items of the column's task; 1 seed." in section
    assert f"BWT {cell(s['bwt'], s['bwt_ci'])} · Last {cell(s['last'], s['last_ci'])}" in section
    assert math.isnan(s["fwt"]) and " · FWT –" in section  # needs the upper triangle (eval.on: all)
    assert f"Forgetting: a {cell(s['forgetting'][0], s['forgetting_ci'][0])}, b " in section
    conventions = next(line for line in section.splitlines() if line.startswith("Conventions:"))
    assert "N−1 = 2 tasks" in conventions and "`chaudhry`" in conventions and "`untrained`" in conventions
    assert "rouge-chinese" in conventions  # the scorer's convention, named
    assert "Variance components" not in section  # one seed


def test_seeds_and_variance_components_are_shown(tmp_path: Path) -> None:
    s = uncertain_summary(0.4, seeds=3)
    assert s["n_seeds"] == 3 and "variance_components" in s
    md = render_report(through_json(tmp_path, {"seqft": {"pref_acc": s}}), {}, {})
    assert table_rows(md, "Method")["seqft"]["Seeds"] == "3"
    assert "; 3 seeds." in md and "seeds are resampled first (hierarchical)" in md
    rows = table_rows(md, "variance (SD)")
    vc = s["variance_components"]
    between = vc["bwt"]["between_seeds"]
    assert rows["between seeds (training randomness)"]["BWT"] == f"{between:.2f} (SD {math.sqrt(between):.2f})"
    assert rows["within seeds (test items)"]["Last"].startswith(f"{vc['last']['within_seeds']:.2f} (SD ")
    assert "FWT" not in rows["within seeds (test items)"]  # no initial scores: no FWT, no column


def test_old_scores_json_renders_without_intervals(tmp_path: Path) -> None:
    old = ScoreMatrix(tasks=TASKS, matrix=[[50.0, None, None], [40.0, 60.0, None], [30.0, 55.0, 70.0]]).summary()
    write_scores(tmp_path / "run", {"seqft": {"pref_acc": old}})
    md = write_report([tmp_path / "run"], tmp_path / "out").read_text()
    row = table_rows(md, "Method")["seqft"]
    assert row["pref\\_acc BWT"] == "-12.50" and "Seeds" not in row
    assert table_rows(md, "after \\ on")["after c"] == {
        "after \\ on": "after c",
        "a": "30.00",
        "b": "55.00",
        "c": "70.00",
    }
    assert "No intervals: this scores.json predates per-item scores" in md
    assert "## Paired tests" not in md and "## Power" not in md  # no comparisons.json
    assert "Cell: score (bootstrap SE)" not in md


def test_undefined_values_and_intervals_render_as_missing(tmp_path: Path) -> None:
    """MTL: BWT/AP/FWT undefined (null, also their intervals); a half-written interval is ignored, not a crash."""
    mtl = uncertain_summary(0.6)
    mtl.update(bwt=None, bwt_ci=None, bwt_se=None, ap=None, ap_ci=[None, None], fwt=None, last_ci=[1.0])
    scores = through_json(tmp_path, {"mtl": {"pref_acc": mtl}, "seqft": {"pref_acc": uncertain_summary(0.4)}})
    md = render_report(scores, {}, {})
    row = table_rows(md, "Method")["mtl"]
    assert row["pref\\_acc BWT"] == "–" and row["pref\\_acc AP"] == "–"
    assert row["pref\\_acc Last"] == f"{mtl['last']:.2f}"  # malformed interval: value alone
    fig = method_bars_figure({m: scores[m]["pref_acc"] for m in scores}, "pref_acc")
    bwt_axes = fig.axes[0]
    segments = [
        seg for c in bwt_axes.containers if isinstance(c, ErrorbarContainer) for seg in c.lines[2][0].get_segments()
    ]
    assert [seg[0][0] for seg in segments] == [1.0]  # only seqft (x = 1) has a BWT interval


# ----------------------------------------------------------------------------------------------- paired tests, power


def row(method: str, metric: str, diff: float, p: float, p_holm: float, mde: float, *, baseline: str = "seqft") -> dict:
    significant = p_holm < 0.05
    return {
        "score": "pref_acc",
        "method": method,
        "baseline": baseline,
        "metric": metric,
        "diff": diff,
        "se": mde / 2.8,
        "ci": [diff - mde / 1.43, diff + mde / 1.43],
        "p": p,
        "mde": mde,
        "p_holm": p_holm,
        "significant": significant,
        "underpowered": not significant and abs(diff) < mde,
    }


COMPARISONS = {
    "baseline": "seqft",
    "alpha": 0.05,
    "rows": [
        row("lifealign", "bwt", 14.2, 0.0004, 0.0012, 6.1),
        row("lifealign", "last", 4.0, 0.21, 0.42, 12.3),
        row("ewc", "bwt", -1.5, 0.7, 0.7, 9.0),
        row("ewc", "bwt", -15.7, 0.0005, 0.0015, 6.0, baseline="lifealign"),
    ],
    "power": {
        "pref_acc": {
            "a": {"n_items": 40, "accuracy": 75.0, "mde": 27.17},
            "b": {"n_items": 30, "accuracy": 50.0, "mde": 36.1},
        }
    },
}


def comparisons_md(tmp_path: Path, payload: dict = COMPARISONS) -> str:
    scores = through_json(tmp_path, {m: {"pref_acc": uncertain_summary(0.5)} for m in ("seqft", "lifealign", "ewc")})
    return render_report(scores, {}, {}, comparisons=[payload])


def test_paired_tests_mark_significant_and_underpowered(tmp_path: Path) -> None:
    md = comparisons_md(tmp_path)
    section = md.split("## Paired tests", 1)[1].split("## Power", 1)[0]
    against_seqft = section.split("### pref\\_acc — against seqft", 1)[1].split("###", 1)[0]
    lines = [line for line in against_seqft.splitlines() if line.startswith("| ")]
    assert lines[0] == "| Method | Metric | Δ [95% CI] | p | Holm p | MDE | Verdict |"
    lo, hi = 14.2 - 6.1 / 1.43, 14.2 + 6.1 / 1.43
    assert lines[1] == f"| lifealign | BWT | 14.20 [{lo:.2f}, {hi:.2f}] | <0.001 | 0.001 | 6.10 | ✓ significant |"
    assert lines[2].endswith("| 0.210 | 0.420 | 12.30 | underpowered: MDE 12.30 > \\|Δ\\| 4.00 |")
    assert lines[3].startswith("| ewc | BWT | -1.50 [") and "underpowered: MDE 9.00 > \\|Δ\\| 1.50" in lines[3]
    against_lifealign = section.split("### pref\\_acc — against lifealign", 1)[1]
    assert "| ewc | BWT | -15.70 [" in against_lifealign and "✓ significant" in against_lifealign
    assert "Holm family: the 4 tests of pref\\_acc." in section


def test_verdicts() -> None:
    assert comparison_verdict({"significant": True, "underpowered": False, "p": 0.01}) == "✓ significant"
    plain = {"significant": False, "underpowered": False, "p": 0.3, "diff": 20.0, "mde": 10.0}
    assert comparison_verdict(plain) == "not significant"
    assert comparison_verdict({"p": None}) == "–"


def test_power_table_and_every_underpowered_comparison(tmp_path: Path) -> None:
    md = comparisons_md(tmp_path)
    power = md.split("## Power", 1)[1].split("## Score matrices", 1)[0]
    assert "80% power and α = 0.05" in power
    rows = table_rows(power, "Task")
    assert rows["a"] == {"Task": "a", "items": "40", "observed score": "75.0", "MDE (points)": "27.2"}
    assert rows["b"]["MDE (points)"] == "36.1"
    assert "**Underpowered comparisons** (2 of 4)" in power
    assert "- lifealign vs seqft, pref\\_acc Last: Δ 4.00, MDE 12.30" in power
    assert "- ewc vs seqft, pref\\_acc BWT: Δ -1.50, MDE 9.00" in power


def test_no_comparison_rows_no_sections(tmp_path: Path) -> None:
    md = comparisons_md(tmp_path, {"baseline": "seqft", "alpha": 0.05, "rows": [], "power": {}})
    assert "## Paired tests" not in md and "## Power" not in md


def test_comparisons_json_is_read_beside_scores_and_a_bad_one_is_named(tmp_path: Path) -> None:
    assert read_comparisons(tmp_path) is None
    (tmp_path / "comparisons.json").write_text(json.dumps(COMPARISONS))
    assert read_comparisons(tmp_path)["rows"][0]["method"] == "lifealign"
    (tmp_path / "comparisons.json").write_text('{"rows": 5}')
    with pytest.raises(ScoresFileError, match=r"comparisons\.json: 'rows' must be a list"):
        read_comparisons(tmp_path)
    (tmp_path / "comparisons.json").write_text('{"rows": [')
    with pytest.raises(ScoresFileError, match=r"comparisons\.json: truncated JSON"):
        read_comparisons(tmp_path)


# ---------------------------------------------------------------------------------------------------------- figures


def error_bars(ax) -> list[tuple[float, float, float]]:
    """``(x, lo, hi)`` of every error bar on ``ax``."""
    out = []
    for container in ax.containers:
        if isinstance(container, ErrorbarContainer):
            for (x0, y0), (_, y1) in container.lines[2][0].get_segments():
                out.append((float(x0), float(min(y0, y1)), float(max(y0, y1))))
    return sorted(out)


def test_task_curves_carry_the_cells_intervals_as_error_bars() -> None:
    s = uncertain_summary(0.4)
    fig = task_curves_figure(s, "seqft — pref_acc", ylabel="pref_acc")
    ax = fig.axes[0]
    bars = error_bars(ax)
    assert len(bars) == 6  # the evaluated (lower-triangle) cells
    ci = np.array(s["matrix_ci"], dtype=float)
    expected = sorted((i, j) for j in range(3) for i in range(j, 3))
    got = {(round(lo, 9), round(hi, 9)) for _, lo, hi in bars}
    assert got == {(round(ci[i, j, 0], 9), round(ci[i, j, 1], 9)) for i, j in expected}
    # The legend still stands right of the plotting area.
    fig.canvas.draw()
    assert ax.get_legend().get_window_extent().x0 >= ax.get_window_extent().x1


def test_task_curves_without_intervals_have_no_error_bars() -> None:
    old = ScoreMatrix(tasks=TASKS, matrix=[[50.0, None, None], [40.0, 60.0, None], [30.0, 55.0, 70.0]]).summary()
    assert error_bars(task_curves_figure(old, "seqft — pref_acc").axes[0]) == []


def test_method_bars_show_bwt_and_last_with_their_intervals() -> None:
    summaries = {"seqft": uncertain_summary(0.4), "lifealign": uncertain_summary(0.68, seed=1)}
    fig = method_bars_figure(summaries, "pref_acc")
    assert [ax.get_title() for ax in fig.axes] == ["BWT", "Last"]
    for ax, stat in zip(fig.axes, ("bwt", "last")):
        heights = [patch.get_height() for patch in ax.patches]
        assert heights == pytest.approx([summaries[m][stat] for m in summaries])
        bars = error_bars(ax)
        expected = [(k, *summaries[m][f"{stat}_ci"]) for k, m in enumerate(summaries)]
        assert np.allclose(bars, expected)


def test_write_report_with_comparisons_figures_and_references(tmp_path: Path) -> None:
    scores = {
        m: {"pref_acc": uncertain_summary(f, seed=k)}
        for k, (m, f) in enumerate([("seqft", 0.4), ("lifealign", 0.68), ("ewc", 0.5)])
    }
    write_scores(tmp_path / "run", scores)
    (tmp_path / "run" / "comparisons.json").write_text(json.dumps(COMPARISONS))
    md = write_report([tmp_path / "run"], tmp_path / "out").read_text()
    assert "## Paired tests" in md and "## Power" in md and "✓ significant" in md
    assert "![pref\\_acc BWT and Last per method](methods__pref_acc_bwt_last.png)" in md
    assert (tmp_path / "out" / "methods__pref_acc_bwt_last.png").is_file()
    assert md.rstrip().splitlines()[-1].startswith("| ")  # the reference tables close the report
    assert "## Reference (published; not comparable)" in md
    assert md.index("## Reference") > md.index("## Score matrices")
    bare = write_report([tmp_path / "run"], tmp_path / "bare", references=False).read_text()
    assert "## Reference" not in bare
