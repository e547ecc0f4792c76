"""Analyses of sampling runs: AdaDiff's early-exit trends (exit statistics, figure 1, t_s proposal)."""
from .exit_trends import (
    CSV_FIELDS,
    ExitRecorder,
    collect_exit_stats,
    exit_stats,
    plot_exit_trends,
    propose_switch_point,
    read_stats_csv,
    write_stats_csv,
)

__all__ = [
    "CSV_FIELDS",
    "ExitRecorder",
    "collect_exit_stats",
    "exit_stats",
    "plot_exit_trends",
    "propose_switch_point",
    "read_stats_csv",
    "write_stats_csv",
]
