"""Solvers, classifier-free guidance, reproducible noise, the sampling driver and output writers."""
from .ddim import DDIMSampler, ddim_sample
from .ddpm import DDPMSampler, alpha_bar_grid, ddpm_sample, respaced_indices
from .denoised import DenoisedCorrection, denoised_correction
from .dpm_solver import DPMSolver, dpm_solver_sample, fast_orders
from .dpm_solver_pp import DPMSolverPP, dpm_solver_pp_sample
from .driver import SOLVERS, generate, sample
from .guidance import ClassifierFreeGuidance, DiTGuidance, make_guidance
from .improved_ddpm import ImprovedDiffusion, space_timesteps
from .noise import NoiseSource, mix_seed, seeds_for
from .outputs import load_npz, make_grid, save_npz, save_png_grid, save_tensor, to_uint8

__all__ = [
    "DDIMSampler",
    "DDPMSampler",
    "DenoisedCorrection",
    "DPMSolver",
    "DPMSolverPP",
    "ClassifierFreeGuidance",
    "DiTGuidance",
    "ImprovedDiffusion",
    "NoiseSource",
    "SOLVERS",
    "alpha_bar_grid",
    "ddim_sample",
    "denoised_correction",
    "ddpm_sample",
    "dpm_solver_sample",
    "dpm_solver_pp_sample",
    "fast_orders",
    "generate",
    "load_npz",
    "make_grid",
    "make_guidance",
    "mix_seed",
    "respaced_indices",
    "sample",
    "save_npz",
    "save_png_grid",
    "save_tensor",
    "seeds_for",
    "space_timesteps",
    "to_uint8",
]
