"""Former home of the native-extension loader; it lives in :mod:`duodiff_fast.ops.native` (and the
per-device answer in :mod:`duodiff_fast.ops.availability`). Kept so existing imports still work."""
from .ops.native import *  # noqa: F401,F403
from .ops.native import __all__  # noqa: F401
