"""Reports: what happened in training, for a person. Reads results folders, never checkpoints.

from wdiff.report import write_report, compare
write_report("out/")                      # findings.json, metrics.csv, tensors.csv, report.html
compare("out/lr-1e-4", "out/lr-1e-3", "cmp/")   # ratios, side-by-side render, report.html
"""

from __future__ import annotations

from wdiff.report.build import FINDINGS, METRICS, REPORT, TENSORS, Report, write_report
from wdiff.report.compare import Comparison, compare

__all__ = ["FINDINGS", "METRICS", "REPORT", "TENSORS", "Comparison", "Report", "compare", "write_report"]
