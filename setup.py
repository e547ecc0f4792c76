"""Build script for duodiff-fast.

``kernels/`` (Triton kernels) is shipped as the subpackage ``duodiff_fast.kernels`` when it holds a
package, and ``csrc/`` (C++/CUDA ops) is compiled into ``duodiff_fast._C`` with
``torch.utils.cpp_extension``:

* ``DUODIFF_FAST_BUILD=cuda|cpu|none`` picks the build; unset: ``cuda`` when a CUDA toolkit is found
  (``CUDA_HOME``, else ``/usr/local/cuda`` when present) and there is a GPU to build for (one is
  visible, or ``TORCH_CUDA_ARCH_LIST`` names the architectures), ``cpu`` otherwise: compiling the
  CUDA kernels for every architecture on a machine without a GPU takes long and gives nothing to run.
* ``TORCH_CUDA_ARCH_LIST`` (default: the visible GPUs' architectures; with ``DUODIFF_FAST_BUILD=cuda``
  and no GPU visible, ``DEFAULT_CUDA_ARCHS``) and ``MAX_JOBS`` are honoured.
* torch must be importable while building: install torch (and setuptools, wheel, ninja) first, then
  ``pip install --no-build-isolation``. When the extension cannot be built (torch not importable,
  e.g. under pip's build isolation, or no C++ compiler) the build stops with ONE line saying why
  and how to proceed; ``DUODIFF_FAST_BUILD=none`` installs without it on purpose.
* pip hides a build's own output unless ``-v``, so the build mode is written into the version's
  local label, which pip prints: ``Successfully installed duodiff-fast-0.1.0+cpu`` (CPU kernels),
  ``...+cuda.sm80.sm86.sm89.sm90`` (CUDA kernels for those architectures, CPU ones too), ``...+noext``;
  ``...+cpu.nogpu`` is the CPU build chosen because a toolkit was found but no GPU to build for.
"""
import os
import shutil
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _read_version() -> str:
    about = {}
    with open(os.path.join(HERE, "duodiff_fast", "version.py")) as f:
        exec(f.read(), about)
    return about["__version__"]


packages = find_packages(include=["duodiff_fast", "duodiff_fast.*"])
package_dir = {}
if os.path.isfile(os.path.join(HERE, "kernels", "__init__.py")):
    # The Triton kernels live in the top-level kernels/ (they import nothing of the package) and
    # install as duodiff_fast.kernels; the bare tree cannot import them under that name.
    packages.append("duodiff_fast.kernels")
    package_dir["duodiff_fast.kernels"] = "kernels"

# ---- duodiff_fast._C ----------------------------------------------------------------------------
DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0+PTX"  # A100, RTX 30xx/A10, L4/RTX 40xx, H100/H200 (+ PTX)


def _cannot_build(why: str):
    """Stop the build with one line (pip shows a failed build's output)."""
    raise SystemExit(f"duodiff-fast: cannot build duodiff_fast._C: {why}. Install torch, setuptools, wheel and "
                     "ninja first and use `pip install --no-build-isolation`, or set DUODIFF_FAST_BUILD=none to "
                     "install without the native kernels")


def _visible_gpu_archs(torch) -> str:
    """The visible GPUs' architectures as a TORCH_CUDA_ARCH_LIST ("9.0"), or "" without a GPU."""
    try:
        if not torch.cuda.is_available():
            return ""
        caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    except Exception:  # a broken driver: treat as no GPU (the CPU build is still made)
        return ""
    return ";".join(f"{major}.{minor}" for major, minor in sorted(caps))


def _native_extensions():
    """([extension], cmdclass, label) for duodiff_fast._C; label is the build mode for the version."""
    mode = os.environ.get("DUODIFF_FAST_BUILD", "").strip().lower() or "auto"
    if mode not in ("auto", "cuda", "cpu", "none"):
        raise SystemExit(f"DUODIFF_FAST_BUILD must be cuda, cpu or none, got {mode!r}")
    csrc = os.path.join(HERE, "csrc")
    cpp = sorted(f for f in os.listdir(csrc) if f.endswith(".cpp")) if os.path.isdir(csrc) else []
    cu = sorted(f for f in os.listdir(csrc) if f.endswith(".cu")) if os.path.isdir(csrc) else []
    if mode == "none" or not cpp:
        return [], {}, "noext"
    try:
        import torch  # noqa: F401
        from torch.utils import cpp_extension
    except ImportError:
        _cannot_build("torch is not importable while building (pip's build isolation hides it)")
    cxx_compiler = os.environ.get("CXX", "c++").split()[0]
    if not shutil.which(cxx_compiler):
        _cannot_build(f"no C++ compiler ({cxx_compiler!r} is not on PATH)")
    if not os.environ.get("CUDA_HOME") and os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
        cpp_extension.CUDA_HOME = "/usr/local/cuda"
    has_cuda = cpp_extension.CUDA_HOME is not None and torch.version.cuda is not None
    if mode == "cuda" and not has_cuda:
        raise SystemExit("DUODIFF_FAST_BUILD=cuda but no CUDA toolkit (CUDA_HOME) or no CUDA build of torch")
    gpu_archs = _visible_gpu_archs(torch)
    target_known = bool(os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()) or bool(gpu_archs)
    use_cuda = has_cuda and (mode == "cuda" or (mode == "auto" and target_known))
    rel = lambda names: [os.path.join("csrc", n) for n in names]  # noqa: E731
    cxx = ["-O3"]  # the C++ standard comes from torch.utils.cpp_extension (C++20 for torch >= 2.10)
    if use_cuda:
        archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", gpu_archs or DEFAULT_CUDA_ARCHS)
        # e.g. "8.0;9.0+PTX" -> 80_90_PTX: one preprocessor token, no quotes to lose in the shell
        tag = "".join(c if c.isalnum() else ("" if c == "." else "_") for c in archs.strip())
        macros = [("DUODIFF_WITH_CUDA", "1"), ("DUODIFF_CUDA_ARCHS", tag or "unknown")]
        ext = cpp_extension.CUDAExtension(
            "duodiff_fast._C", rel(cpp + cu), define_macros=macros,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]})
        sms = sorted({a.split("+")[0].replace(".", "") for a in archs.replace(",", ";").replace(" ", ";").split(";")
                      if a.strip()})
        label = "cuda." + ".".join(f"sm{a}" for a in sms if a.isalnum())
    else:
        ext = cpp_extension.CppExtension("duodiff_fast._C", rel(cpp), extra_compile_args={"cxx": cxx})
        label = "cpu.nogpu" if (has_cuda and mode == "auto") else "cpu"
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}, label


ext_modules, cmdclass, build_label = _native_extensions()

setup(
    name="duodiff-fast",
    version=f"{_read_version()}+{build_label}",  # pip prints it: the build mode of duodiff_fast._C
    description="Fast U-ViT diffusion sampling: DuoDiff, AdaDiff, ASE and multistage models",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir=package_dir,
    install_requires=[
        "torch>=2.4",
        "numpy>=1.23",
        "tqdm>=4.60",
        "pillow>=9.0",
        "safetensors>=0.4",
    ],
    extras_require={
        "test": ["pytest>=7", "scipy>=1.8"],  # scipy: the FID tests' direct reference computation
        # FID (torch-fidelity's Inception-v3; pulls torchvision) and the eval command's plot
        "eval": ["torch-fidelity>=0.4", "matplotlib>=3.5"],
    },
    entry_points={"console_scripts": ["duodiff-fast=duodiff_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
