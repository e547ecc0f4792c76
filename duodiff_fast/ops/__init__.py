"""The package's ops, in one home.

* :mod:`.impl`          the op implementation (native C++, Triton, PyTorch) of every op: the one
                        module that decides, the others ask it.
* :mod:`.availability`  what can run where (Triton kernels, native ops) and why not, per device.
* :mod:`.native`        loading of the C++/CUDA extension ``duodiff_fast._C`` (``torch.ops.duodiff``).
* :mod:`.triton_ops`    the Triton custom ops (``torch.ops.duodiff_triton``).
* :mod:`.dit_block`     one DiT block (and the final layer's tokens) composed from those ops.
* :mod:`.compaction`    batch compaction and row routing (native ops where they run, else PyTorch).
* :mod:`.embedding`     the sinusoidal timestep embedding (native kernel on CUDA, else PyTorch).
* :mod:`.solver_ops`    the native Philox noise and fused solver update (references in samplers/philox).
"""
from .availability import native_available, native_unavailable_reason, triton_unavailable_reason
from .compaction import active_indices, gather_rows, scatter_rows, split_rows, take_rows

__all__ = ["active_indices", "gather_rows", "scatter_rows", "split_rows", "take_rows", "native_available",
           "native_unavailable_reason", "triton_unavailable_reason"]
