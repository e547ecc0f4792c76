"""duodiff-fast: fast sampling from U-ViT diffusion models (DuoDiff, AdaDiff, ASE, multistage).

Subpackages: ``models`` (U-ViT, configs, checkpoints), ``schedules`` (noise schedules),
``samplers`` (DDPM, DDIM, DPM-Solver, classifier-free guidance), ``methods`` (DuoDiff and the
denoiser wrappers), ``training`` (autograd training), ``cli`` (the ``duodiff-fast`` command).
Submodules are imported lazily so ``import duodiff_fast`` stays cheap.
"""
from .version import __version__

__all__ = ["__version__"]
