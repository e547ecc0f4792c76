"""EDM (Karras et al. 2022) and the multistage authors' EDM models: preconditionings, the DDPM++
U-Nets (``SongUNet``, ``MultistageUNet``), the Heun sampler and the training losses."""
from .configs import EDM_CONFIGS, MODEL_TYPES, build_edm_net, get_edm_config, normalize_config
from .objective import EDMObjective
from .loss import EDMLoss, EDMMultistageLoss, edm_weight, stage_of_sigma
from .precond import PRECONDITIONINGS, EDMPrecond, VEPrecond, VPPrecond
from .sampler import HeunConfig, heun_nfe, heun_sample, sigma_grid
from .unet import MultistageUNet, SongUNet, stage_from_sigma

__all__ = [
    "EDM_CONFIGS", "MODEL_TYPES", "build_edm_net", "get_edm_config", "normalize_config",
    "EDMObjective", "EDMLoss", "EDMMultistageLoss", "edm_weight", "stage_of_sigma",
    "PRECONDITIONINGS", "EDMPrecond", "VEPrecond", "VPPrecond",
    "HeunConfig", "heun_nfe", "heun_sample", "sigma_grid",
    "MultistageUNet", "SongUNet", "stage_from_sigma",
]
