"""Build script for duodiff-fast.

The package is pure Python for now. ``kernels/`` (Triton kernels) is shipped as the
subpackage ``duodiff_fast.kernels`` when it holds a package, and ``csrc/`` (C++/CUDA ops for
``duodiff_fast._C``) is compiled here once it holds sources; with neither present the package
installs and imports as plain Python.
"""
import os

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
    # kernels/ lives at the top level (see DESIGN.md) but installs as duodiff_fast.kernels.
    packages.append("duodiff_fast.kernels")
    package_dir["duodiff_fast.kernels"] = "kernels"

setup(
    name="duodiff-fast",
    version=_read_version(),
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
        "test": ["pytest>=7"],
    },
    entry_points={"console_scripts": ["duodiff-fast=duodiff_fast.cli:main"]},
)
