"""U-ViT and DiT models, the named config registry and checkpoint loading."""
from .checkpoint import (
    CheckpointError,
    CheckpointInfo,
    checkpoint_info,
    checkpoint_spec,
    extract_state_dict,
    infer_config,
    infer_dit_config,
    load_model,
    load_weights,
    read_checkpoint_file,
    resolve_time_input,
    save_weights,
)
from .configs import (
    PAPER_CONFIGS,
    REGISTRY,
    TIME_INPUTS,
    ModelSpec,
    check_time_input,
    create_model,
    describe,
    get_config,
    get_spec,
    list_configs,
    matching_configs,
    shallow_name,
    shallow_spec,
    spec_json,
)
from .dit import DiT
from .model_types import MODEL_TYPES, ModelType, get_model_type, register_model_type
from .pretrained import is_pretrained_folder, load_pretrained, resolve_pretrained_folder, save_pretrained
from .uvit import UViT, patchify, timestep_embedding, unpatchify

__all__ = [
    "UViT", "DiT", "infer_dit_config", "timestep_embedding", "patchify", "unpatchify",
    "ModelSpec", "REGISTRY", "PAPER_CONFIGS", "create_model", "get_config", "get_spec",
    "list_configs", "matching_configs", "shallow_name", "describe",
    "CheckpointError", "read_checkpoint_file", "extract_state_dict", "infer_config",
    "load_weights", "load_model", "save_weights",
    "TIME_INPUTS", "check_time_input", "CheckpointInfo", "checkpoint_info", "resolve_time_input",
    "checkpoint_spec", "shallow_spec", "spec_json", "MODEL_TYPES", "ModelType", "get_model_type",
    "register_model_type", "is_pretrained_folder", "load_pretrained", "resolve_pretrained_folder", "save_pretrained",
]
