"""Results JSON, Markdown report and plots: numbers pass through unchanged, files are real PNGs, text is escaped."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from lifealign.evaluation.matrix import ScoreMatrix
from lifealign.report.markdown import escape_markdown, render_report, write_report
from lifealign.report.plots import plot_bar, plot_histogram, plot_score_matrix
from lifealign.report.results import collect_runs, read_scores, write_scores

NAN = math.nan
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def summary(rows: list[list[float]], tasks: tuple[str, ...] = ("a", "b", "c")) -> dict:
    return ScoreMatrix(tasks=list(tasks), matrix=rows).summary()


# pref_acc: BWT ((30-50)+(55-60))/2 = -12.5, Last 155/3, AP (50+50+155/3)/3.
PREF = summary([[50.0, NAN, NAN], [40.0, 60.0, NAN], [30.0, 55.0, 70.0]])
# rouge_l: BWT ((12-10)+(20-20))/2 = 1, Last (12+20+30)/3 = 62/3, AP (10+15+62/3)/3.
ROUGE = summary([[10.0, NAN, NAN], [10.0, 20.0, NAN], [12.0, 20.0, 30.0]])
MARGIN = summary([[0.1, NAN, NAN], [0.0, 0.3, NAN], [-0.1, 0.2, 0.4]])
SCORES = {"seqft": {"pref_acc": PREF, "rouge_l": ROUGE, "margin": MARGIN}}


def is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > len(PNG_SIGNATURE) and path.read_bytes()[:8] == PNG_SIGNATURE


def table_rows(markdown: str, first_header: str) -> dict[str, dict[str, str]]:
    """Parse the first Markdown table whose first header cell is ``first_header`` into {row label: {col: cell}}."""
    lines = markdown.splitlines()
    start = next(k for k, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    header = [c.strip() for c in lines[start].strip("|").split(" | ")]
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        rows[cells[0]] = dict(zip(header, cells))
    return rows


def test_write_then_read_scores_round_trips_with_strict_json(tmp_path: Path) -> None:
    path = write_scores(tmp_path, SCORES)
    assert path == tmp_path / "scores.json"
    text = path.read_text()
    raw = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert raw["seqft"]["pref_acc"]["matrix"][0] == [50.0, None, None]
    assert raw["seqft"]["pref_acc"]["bwt"] == -12.5 and raw["seqft"]["pref_acc"]["fwt"] is None
    back = read_scores(path)
    assert back["seqft"]["rouge_l"]["last"] == pytest.approx(62 / 3)
    assert math.isnan(back["seqft"]["pref_acc"]["matrix"][0][1]) and math.isnan(back["seqft"]["pref_acc"]["fwt"])
    assert read_scores(tmp_path)["seqft"]["pref_acc"]["forgetting"] == pytest.approx([20.0, 5.0])


def test_write_scores_rejects_wrong_shape(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="matrix"):
        write_scores(tmp_path, {"seqft": {"pref_acc": {"bwt": 1.0}}})


def test_collect_runs_merges_method_folders_and_renames_duplicates(tmp_path: Path) -> None:
    write_scores(tmp_path / "run1", {"seqft": {"pref_acc": PREF}})
    write_scores(tmp_path / "run2" / "lifealign", {"lifealign": {"pref_acc": ROUGE}})
    write_scores(tmp_path / "run2" / "seqft", {"seqft": {"pref_acc": ROUGE}})
    merged = collect_runs([tmp_path / "run1", tmp_path / "run2"])
    assert list(merged) == ["seqft", "lifealign", "seqft@seqft"]
    assert merged["seqft"]["pref_acc"]["bwt"] == -12.5 and merged["seqft@seqft"]["pref_acc"]["bwt"] == 1.0
    with pytest.raises(FileNotFoundError):
        collect_runs([tmp_path / "missing"])


def test_summary_table_numbers_equal_inputs_and_avg_is_mean_of_score_metrics() -> None:
    scores = {
        "seqft": {**SCORES["seqft"], "reward_model": summary([[3.0, NAN, NAN], [2.0, 1.0, NAN], [0.0, 0.0, 0.0]])}
    }
    md = render_report(scores, {}, {})
    row = table_rows(md, "Method")["seqft"]  # metric names are escaped: pref_acc is written pref\\_acc
    assert row["pref\\_acc BWT"] == "-12.50" and row["pref\\_acc Last"] == f"{155 / 3:.2f}"
    assert row["pref\\_acc AP"] == f"{(50 + 50 + 155 / 3) / 3:.2f}"
    assert row["rouge\\_l BWT"] == "1.00" and row["rouge\\_l Last"] == f"{62 / 3:.2f}"
    # AVG over the 0-100 score metrics only (margin and reward_model are diagnostics): BWT (-12.5 + 1) / 2 = -5.75.
    assert row["AVG BWT"] == "-5.75"
    assert row["AVG Last"] == f"{(155 / 3 + 62 / 3) / 2:.2f}"
    assert not any(key.startswith(("margin", "reward")) for key in row)
    diag = table_rows(md.split("### Diagnostics", 1)[1], "Method")["seqft"]
    assert diag["margin BWT"] == f"{((-0.1 - 0.1) + (0.2 - 0.3)) / 2:.2f}"
    assert diag["reward\\_model BWT"] == f"{((0 - 3) + (0 - 1)) / 2:.2f}" and "AVG BWT" not in diag


def test_matrix_section_shows_every_cell() -> None:
    md = render_report({"seqft": {"pref_acc": PREF}}, {}, {"seqft/pref_acc": ["m.png"]})
    rows = table_rows(md, "after \\ on")
    assert rows["after c"] == {"after \\ on": "after c", "a": "30.00", "b": "55.00", "c": "70.00"}
    assert rows["after a"]["b"] == "–"
    assert "![seqft pref\\_acc](m.png)" in md
    assert "Forgetting: a 20.00, b 5.00" in md


def test_escape_markdown_neutralises_untrusted_text() -> None:
    out = escape_markdown("a|b <script>alert(1)</script> `rm` [x](javascript:y)\nline2\x1b[31m!\x07")
    assert "<script>" not in out and "&lt;script&gt;" in out
    assert "\\|" in out and "|" not in out.replace("\\|", "")
    assert "\\`rm\\`" in out and "\\[x\\](javascript:y)" in out
    assert "\x1b" not in out and "\x07" not in out and "[31m" not in out
    assert out.endswith("line2\\!")
    assert "a\\|b" in escape_markdown("a|b") and escape_markdown("x\\y") == "x\\\\y"


def test_generated_text_in_samples_cannot_break_the_table() -> None:
    samples = [{"task": "t|1", "prompt": "hi", "completion": "A | B\n| C | D |\n<img src=x>", "reference": "`ok`"}]
    md = render_report({"m": {"pref_acc": PREF}}, {"samples": samples}, {})
    section = md.split("## Sample generations", 1)[1].strip().splitlines()
    header, _, row = section[:3]
    unescaped_pipes = lambda line: line.replace("\\|", "").count("|")  # noqa: E731
    assert unescaped_pipes(row) == unescaped_pipes(header) == 5
    assert "<img" not in md and "&lt;img src=x&gt;" in row


def test_plots_write_valid_pngs(tmp_path: Path) -> None:
    assert is_png(plot_score_matrix(PREF, "m", tmp_path / "sub" / "heat.png"))
    assert is_png(plot_bar(["q_proj", "v_proj"], [0.9, NAN], "kept energy", tmp_path / "bar.png"))
    assert is_png(plot_histogram([-1.0, 0.5, 2.0, NAN], "impact", tmp_path / "hist.png", bins=5))
    with pytest.raises(ValueError):
        plot_bar(["a"], [1.0, 2.0], "t", tmp_path / "bad.png")


def test_write_report_makes_report_and_linked_pngs(tmp_path: Path) -> None:
    write_scores(tmp_path / "run", SCORES)
    path = write_report([tmp_path / "run"], tmp_path / "out")
    assert path == tmp_path / "out" / "report.md"
    md = path.read_text()
    links = [line.split("](", 1)[1].rstrip(")") for line in md.splitlines() if line.startswith("![")]
    assert len(links) == 2 * 3 + 2  # heatmap + curves per metric, BWT/Last bars per score metric (pref_acc, rouge_l)
    assert all(is_png(tmp_path / "out" / link) for link in links)
    assert table_rows(md, "Method")["seqft"]["pref\\_acc BWT"] == "-12.50"


def test_report_layer_does_not_import_torch() -> None:
    code = "import sys, lifealign.report; assert 'torch' not in sys.modules, 'report imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------ a corrupt scores.json, readable plots


@pytest.mark.parametrize(
    "content, problem",
    [
        (
            b'{"seqft": {"pref_acc": {"matrix": [[50.0, nu',
            r"truncated JSON \(the file ends at line 1 with 5 bracket\(s\) open",
        ),
        (b"", r"the file is empty"),
        (b'{"seqft": {"pref_acc": {"matrix": [[1]]}},}', r":1: invalid JSON: .* \(col \d+\)"),
        (b'{"seqft": \xff}', r"not UTF-8 text \(byte 0xff at offset 10\)"),
        (b"[1, 2]", r"expected a JSON object"),
        (b'{"seqft": {"pref_acc": {"matrix": [[1, "x"]]}}}', r"\['matrix'\] must be square"),
        (b'{"seqft": {"pref_acc": {"matrix": [["x"]]}}}', r"\['matrix'\] row 0 must hold numbers or null"),
        (b'{"seqft": {"pref_acc": {"matrix": 5}}}', r"\['matrix'\] must be a list of rows"),
    ],
)
def test_unusable_scores_file_names_the_file_and_the_problem(tmp_path: Path, content: bytes, problem: str) -> None:
    from lifealign.report.results import ScoresFileError

    (tmp_path / "scores.json").write_bytes(content)
    with pytest.raises(ScoresFileError, match=rf"{tmp_path / 'scores.json'}.*{problem}"):
        collect_runs([tmp_path])


def test_report_cli_on_a_truncated_scores_file_names_it(tmp_path: Path) -> None:
    write_scores(tmp_path / "run", SCORES)
    path = tmp_path / "run" / "scores.json"
    path.write_text(path.read_text()[:100])
    code = "import sys; from lifealign.cli.main import main; sys.exit(main(sys.argv[1:]))"
    result = subprocess.run(
        [sys.executable, "-c", code, "report", str(tmp_path / "run")], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert f"error: {path}: truncated JSON" in result.stderr and "Traceback" not in result.stderr


def test_percent_metrics_use_a_fixed_0_100_colour_scale_and_others_their_range() -> None:
    from lifealign.report.plots import score_matrix_figure

    for metric in ("pref_acc", "logp_acc", "rouge_l", "bleu4", "judge", "rule"):
        image = score_matrix_figure(PREF, f"seqft — {metric}").axes[0].images[0]
        assert image.get_clim() == (0.0, 100.0), metric
    assert score_matrix_figure(PREF, "anything", metric="pref_acc").axes[0].images[0].get_clim() == (0.0, 100.0)
    assert score_matrix_figure(MARGIN, "seqft — margin").axes[0].images[0].get_clim() == (-0.1, 0.4)


def test_small_quantities_keep_three_significant_digits() -> None:
    from lifealign.report.plots import score_matrix_figure

    kl = summary([[0.0123, NAN, NAN], [0.5, 0.00042, NAN], [1.5, 12.345, 0.0]])
    texts = [t.get_text() for t in score_matrix_figure(kl, "seqft — kl").axes[0].texts]
    assert texts == ["0.0123", "0.5", "0.00042", "1.5", "12.3", "0"]
    texts = [t.get_text() for t in score_matrix_figure(PREF, "seqft — pref_acc").axes[0].texts]
    assert texts == ["50.0", "40.0", "60.0", "30.0", "55.0", "70.0"]


def test_curve_legend_stands_outside_the_axes_and_inside_the_figure() -> None:
    from lifealign.report.plots import task_curves_figure

    long_names = summary(
        [[50.0, NAN, NAN], [40.0, 60.0, NAN], [30.0, 55.0, 70.0]], tasks=("arithmetic", "capitals-long", "c")
    )
    fig = task_curves_figure(long_names, "seqft — pref_acc")
    fig.canvas.draw()
    ax = fig.axes[0]
    legend, axes_box = ax.get_legend().get_window_extent(), ax.get_window_extent()
    assert legend.x0 >= axes_box.x1  # right of the plotting area: it cannot cover a line
    assert legend.x1 <= fig.bbox.x1 and legend.y0 >= fig.bbox.y0  # and not cut off
