"""Small tensor ops with a PyTorch reference implementation (native kernels may replace them)."""
from .compaction import active_indices, gather_rows, scatter_rows

__all__ = ["active_indices", "gather_rows", "scatter_rows"]
