"""Report: ``scores.json`` and ``comparisons.json`` in, a Markdown report with tables and PNG plots out. Computes no
metrics: intervals, paired tests and power are rendered as the engine wrote them."""

from lifealign.report.markdown import escape_markdown, render_report, write_report
from lifealign.report.reference import load_references
from lifealign.report.results import collect_comparisons, collect_runs, read_comparisons, read_scores, write_scores

__all__ = [
    "collect_comparisons",
    "collect_runs",
    "escape_markdown",
    "load_references",
    "read_comparisons",
    "read_scores",
    "render_report",
    "write_report",
    "write_scores",
]
