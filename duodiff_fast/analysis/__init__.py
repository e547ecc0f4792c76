"""Analyses of sampling runs: AdaDiff's early-exit trends (exit statistics, figure 1, t_s proposal).

The names are loaded on first use (PEP 562), so that ``python -m duodiff_fast.analysis.exit_trends``
runs that module once, as ``__main__``, without runpy's "found in sys.modules" RuntimeWarning.
"""
from importlib import import_module

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


def __getattr__(name):
    if name in __all__:
        return getattr(import_module(".exit_trends", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
