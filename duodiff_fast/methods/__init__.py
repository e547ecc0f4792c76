"""Acceleration methods and denoiser adapters (DuoDiff; AdaDiff, ASE and multistage come later)."""
from .denoiser import ModelDenoiser
from .duodiff import DuoDiff

__all__ = ["ModelDenoiser", "DuoDiff"]
