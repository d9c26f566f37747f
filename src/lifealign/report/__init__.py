"""Report: ``scores.json`` results in, a Markdown report with tables and PNG plots out. Computes no metrics."""

from lifealign.report.markdown import escape_markdown, render_report, write_report
from lifealign.report.results import collect_runs, read_scores, write_scores

__all__ = ["collect_runs", "escape_markdown", "read_scores", "render_report", "write_report", "write_scores"]
