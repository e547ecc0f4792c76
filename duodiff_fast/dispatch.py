"""Former home of the op-implementation policy; kept so existing imports keep working.

The choice of implementation for each op (native C++, Triton, PyTorch) is made in
:mod:`duodiff_fast.ops.impl` ("op implementation", ``impl``), so that "backend" means only the
execution backends of :mod:`duodiff_fast.backends` (reference, eager-bf16, torch.compile, triton,
auto). The names below are aliases of that module's:

    use_backend(name)          -> ops.impl.use_impl(name)
    resolve_backend(...)       -> ops.impl.layer_impl(...)
    check_backend_choice(name) -> ops.impl.check_impl(name)
    BACKEND_CHOICES            -> ops.impl.IMPL_CHOICES ("auto", "torch", "triton")
    set_matmul / matmul_impl   -> ops.impl.set_matmul / matmul_impl
    BackendUnavailable         -> ops.impl.BackendUnavailable (the same class)

It also re-exports the Triton custom ops of :mod:`duodiff_fast.ops.triton_ops` and the
availability answers of :mod:`duodiff_fast.ops.availability` under their former names.
"""
from .ops.availability import (interpreter_enabled, triton_available, triton_import_error,  # noqa: F401
                               triton_unavailable_reason)
from .ops.impl import (IMPL_CHOICES, MATMUL_IMPLS, BackendUnavailable, check_impl, layer_impl,  # noqa: F401
                       matmul_impl, set_matmul, use_impl)
from .ops.triton_ops import (add_layernorm, attention_qkv, final_layer, frontend, layernorm, linear,  # noqa: F401
                             registered_ops)

BACKEND_CHOICES = IMPL_CHOICES
MATMUL_CHOICES = MATMUL_IMPLS
use_backend = use_impl
resolve_backend = layer_impl
check_backend_choice = check_impl
_triton_import_error = triton_import_error
