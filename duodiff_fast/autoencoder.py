"""The Stable Diffusion KL-f8 autoencoder, used to map latent-space U-ViT samples to images.

Latent U-ViT models (ImageNet 256/512, MS-COCO) work on the latents of the KL-regularised
autoencoder from latent diffusion ("KL-f8": 8x spatial downsampling, 4 latent channels). This
module re-implements that autoencoder with the original parameter names, so the published state
dicts (``encoder.*``, ``decoder.*``, ``quant_conv.*``, ``post_quant_conv.*``) load strictly.

Shapes (f = 2 ** (len(ch_mult) - 1), 8 for the real model; E = embed_dim, 4 for the real model)::

    images  (B, in_channels, H, W), values in [-1, 1]
      -> encoder          (B, 2 * z_channels, H/f, W/f)
      -> quant_conv       (B, 2 * E, H/f, W/f)      = posterior mean | log-variance
      -> mean or sample   (B, E, H/f, W/f)
      -> * scale_factor   latents fed to the diffusion model
    latents (B, E, h, w)
      -> / scale_factor -> post_quant_conv (B, z_channels, h, w)
      -> decoder          (B, out_ch, h*f, w*f), values roughly in [-1, 1]

Typical use::

    ae = AutoencoderKL.from_checkpoint("autoencoder_kl.pth")      # SD config inferred from weights
    with torch.inference_mode():
        images = ae.decode(latents, batch_size=16)                  # (B, 3, 256, 256) in ~[-1, 1]
    uint8 = AutoencoderKL.to_uint8(images)                          # (B, 3, 256, 256) uint8
"""
from __future__ import annotations

import math
import os
import re
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .models.checkpoint import CheckpointError, key_mismatch_lines, read_checkpoint_file

__all__ = [
    "AutoencoderKL",
    "Encoder",
    "Decoder",
    "ResnetBlock",
    "AttnBlock",
    "Downsample",
    "Upsample",
    "SD_KL_F8_DDCONFIG",
    "SD_SCALE_FACTOR",
    "infer_ddconfig",
    "extract_autoencoder_state_dict",
    "CheckpointError",
]

#: Latent scale of the Stable Diffusion KL-f8 autoencoder (latents = posterior * scale_factor).
SD_SCALE_FACTOR = 0.18215

#: ``ddconfig`` of the real Stable Diffusion KL-f8 autoencoder (``embed_dim`` = 4).
SD_KL_F8_DDCONFIG: Dict[str, Any] = dict(
    double_z=True,
    z_channels=4,
    resolution=256,
    in_channels=3,
    out_ch=3,
    ch=128,
    ch_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    attn_resolutions=[],
    dropout=0.0,
)
_SD_EMBED_DIM = 4

_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
_DDCONFIG_KEYS = tuple(SD_KL_F8_DDCONFIG)


# --------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------
def _norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups and eps=1e-6, as in latent diffusion."""
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def _conv3(cin: int, cout: int, stride: int = 1, padding: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=padding)


def _conv1(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1)


class ResnetBlock(nn.Module):
    """Pre-activation residual block: (B, cin, H, W) -> (B, cout, H, W).

    norm1 -> swish -> conv1 -> norm2 -> swish -> dropout -> conv2, plus the input (through a
    1x1 ``nin_shortcut`` when cin != cout).
    """

    def __init__(self, in_channels: int, out_channels: Optional[int] = None, dropout: float = 0.0):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = _norm(in_channels)
        self.conv1 = _conv3(in_channels, out_channels)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _conv3(out_channels, out_channels)
        if in_channels != out_channels:
            self.nin_shortcut = _conv1(in_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections: (B, C, H, W) -> same.

    Every pixel attends to every pixel of its image (H*W tokens of width C, scale C**-0.5).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = _conv1(channels, channels)
        self.k = _conv1(channels, channels)
        self.v = _conv1(channels, channels)
        self.proj_out = _conv1(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        # (B, C, H, W) -> (B, 1, H*W, C): one head, tokens = pixels
        q, k, v = (t.reshape(b, 1, c, h * w).transpose(-1, -2) for t in (self.q(y), self.k(y), self.v(y)))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, H*W, C), softmax(q k^T / sqrt(C)) v
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after zero-padding right/bottom by one: (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv3(channels, channels, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv: (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ``block`` (ResnetBlocks), ``attn`` (AttnBlocks, possibly empty) and
    an optional ``downsample``/``upsample`` attribute (named as in the original key layout)."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()

    def run_blocks(self, h: torch.Tensor) -> torch.Tensor:
        for i, blk in enumerate(self.block):
            h = blk(h)
            if len(self.attn) > 0:
                h = self.attn[i](h)
        return h


class _Mid(nn.Module):
    """block_1 -> attn_1 -> block_2 at the lowest resolution (always present)."""

    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


def _check_ddconfig(ddconfig: Mapping[str, Any]) -> Dict[str, Any]:
    if not isinstance(ddconfig, Mapping):
        raise TypeError(f"ddconfig must be a dict, got {type(ddconfig).__name__}")
    missing = [k for k in ("z_channels", "in_channels", "out_ch", "ch", "ch_mult", "num_res_blocks") if k not in ddconfig]
    if missing:
        raise ValueError(f"ddconfig is missing {missing}; expected keys {list(_DDCONFIG_KEYS)}")
    cfg = dict(SD_KL_F8_DDCONFIG)
    cfg.update(ddconfig)
    cfg["ch_mult"] = [int(m) for m in cfg["ch_mult"]]
    cfg["attn_resolutions"] = [int(r) for r in (cfg.get("attn_resolutions") or [])]
    if not cfg["ch_mult"]:
        raise ValueError("ddconfig['ch_mult'] must not be empty")
    widths = [cfg["ch"]] + [cfg["ch"] * m for m in cfg["ch_mult"]]
    bad = [w for w in widths if w <= 0 or w % 32]
    if bad:
        raise ValueError(f"every block width (ch * ch_mult) must be a positive multiple of 32 (GroupNorm(32)); got {widths}")
    return cfg


class Encoder(nn.Module):
    """Images (B, in_channels, H, W) -> moments (B, 2*z_channels if double_z else z_channels, H/f, W/f)."""

    def __init__(self, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int, attn_resolutions: Iterable[int],
                 in_channels: int, resolution: int, z_channels: int, double_z: bool = True,
                 dropout: float = 0.0, out_ch: Optional[int] = None, **ignored: Any):
        super().__init__()
        attn_resolutions = set(int(r) for r in attn_resolutions)
        self.num_resolutions = len(ch_mult)
        self.conv_in = _conv3(in_channels, ch)
        in_mult = (1,) + tuple(ch_mult)
        cur_res = resolution
        self.down = nn.ModuleList()
        block_in = ch
        for i, mult in enumerate(ch_mult):
            level = _Level()
            block_in, block_out = ch * in_mult[i], ch * mult
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if cur_res in attn_resolutions:
                    level.attn.append(AttnBlock(block_in))
            if i != self.num_resolutions - 1:
                level.downsample = Downsample(block_in)
                cur_res //= 2
            self.down.append(level)
        self.mid = _Mid(block_in, dropout)
        self.norm_out = _norm(block_in)
        self.conv_out = _conv3(block_in, 2 * z_channels if double_z else z_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level.run_blocks(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latents z (B, z_channels, h, w) -> images (B, out_ch, h*f, w*f)."""

    def __init__(self, *, ch: int, out_ch: int, ch_mult: Sequence[int], num_res_blocks: int,
                 attn_resolutions: Iterable[int], resolution: int, z_channels: int,
                 dropout: float = 0.0, **ignored: Any):
        super().__init__()
        attn_resolutions = set(int(r) for r in attn_resolutions)
        self.num_resolutions = len(ch_mult)
        block_in = ch * ch_mult[-1]
        cur_res = resolution // 2 ** (self.num_resolutions - 1)
        self.conv_in = _conv3(z_channels, block_in)
        self.mid = _Mid(block_in, dropout)
        levels: List[_Level] = []
        for i in reversed(range(self.num_resolutions)):  # built lowest resolution first
            level = _Level()
            block_out = ch * ch_mult[i]
            for _ in range(num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if cur_res in attn_resolutions:
                    level.attn.append(AttnBlock(block_in))
            if i != 0:
                level.upsample = Upsample(block_in)
                cur_res *= 2
            levels.insert(0, level)  # up[i] is level i, matching the original key names
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(block_in)
        self.conv_out = _conv3(block_in, out_ch)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for i in reversed(range(self.num_resolutions)):
            level = self.up[i]
            h = level.run_blocks(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# --------------------------------------------------------------------------------------------
# state-dict helpers
# --------------------------------------------------------------------------------------------
_ATTN_PROJ = re.compile(r"\.attn(_1|\.\d+)\.(q|k|v|proj_out)\.weight$")


def extract_autoencoder_state_dict(obj: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """Pull the autoencoder weights out of a loaded checkpoint object.

    Accepts a plain state dict, a dict with a ``state_dict`` (the latent-diffusion ``.ckpt``
    layout) or ``model_state_dict`` entry, keys under ``first_stage_model.`` (a full LDM/SD model
    checkpoint) or ``module.`` (DDP). Only ``encoder.``/``decoder.``/``quant_conv.``/
    ``post_quant_conv.`` keys are kept (``loss.*`` discriminator weights and the like are
    dropped). Attention projections stored as linear weights (C, C) are reshaped to (C, C, 1, 1).
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"expected a dict of tensors, got {type(obj).__name__}")
    for key in ("state_dict", "model_state_dict"):
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    keys = [k for k in obj if isinstance(k, str)]
    for prefix in ("module.", "first_stage_model."):
        if not any(k.startswith(_PREFIXES) for k in keys) and any(k.startswith(prefix) for k in keys):
            obj = {k[len(prefix):]: v for k, v in obj.items() if k.startswith(prefix)}
            keys = list(obj)
    sd: Dict[str, torch.Tensor] = {}
    for k in keys:
        if not k.startswith(_PREFIXES):
            continue
        v = obj[k]
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"checkpoint entry {k!r} is a {type(v).__name__}, not a tensor")
        if v.ndim == 2 and _ATTN_PROJ.search(k):
            v = v[:, :, None, None]
        sd[k] = v
    if not sd:
        hint = ""
        if any(k.startswith(("encoder.down_blocks", "decoder.up_blocks")) for k in keys):
            hint = " (this looks like the diffusers layout; convert it to the original latent-diffusion key names)"
        shown = sorted(keys)[:10]
        raise CheckpointError(
            f"no autoencoder weights found: no keys start with {', '.join(_PREFIXES)}{hint}; "
            f"first keys: {shown}"
        )
    return sd


def infer_ddconfig(state_dict: Mapping[str, torch.Tensor], resolution: int = 256) -> Tuple[Dict[str, Any], int]:
    """Recover ``(ddconfig, embed_dim)`` from an autoencoder state dict's keys and shapes.

    ``resolution`` cannot be read from the weights; it only decides at which levels the
    (optional) per-level attention sits, so attention blocks found at encoder level i are
    reported as ``attn_resolutions`` entries ``resolution // 2**i``. ``dropout`` is 0.
    """
    try:
        conv_in = state_dict["encoder.conv_in.weight"]  # (ch, in_channels, 3, 3)
        enc_out = state_dict["encoder.conv_out.weight"]  # (2 z or z, C, 3, 3)
        dec_in = state_dict["decoder.conv_in.weight"]  # (C, z, 3, 3)
        dec_out = state_dict["decoder.conv_out.weight"]  # (out_ch, ch, 3, 3)
        pqc = state_dict["post_quant_conv.weight"]  # (z, embed_dim, 1, 1)
    except KeyError as e:
        raise CheckpointError(f"not a KL autoencoder state dict: missing key {e.args[0]!r}") from None
    ch, in_channels = int(conv_in.shape[0]), int(conv_in.shape[1])
    z_channels = int(dec_in.shape[1])
    levels = sorted({int(k.split(".")[2]) for k in state_dict if k.startswith("encoder.down.")})
    if not levels or levels != list(range(len(levels))):
        raise CheckpointError(f"cannot read the encoder levels from the state dict (found {levels})")
    ch_mult = []
    for i in levels:
        w = state_dict.get(f"encoder.down.{i}.block.0.conv1.weight")
        if w is None:
            raise CheckpointError(f"missing key 'encoder.down.{i}.block.0.conv1.weight'")
        ch_mult.append(int(w.shape[0]) // ch)
    num_res_blocks = len({k.split(".")[4] for k in state_dict if k.startswith("encoder.down.0.block.")})
    attn_resolutions = sorted(
        {resolution // 2 ** i for i in levels if any(k.startswith(f"encoder.down.{i}.attn.") for k in state_dict)},
        reverse=True,
    )
    ddconfig = dict(
        double_z=int(enc_out.shape[0]) == 2 * z_channels,
        z_channels=z_channels,
        resolution=resolution,
        in_channels=in_channels,
        out_ch=int(dec_out.shape[0]),
        ch=ch,
        ch_mult=ch_mult,
        num_res_blocks=num_res_blocks,
        attn_resolutions=attn_resolutions,
        dropout=0.0,
    )
    return ddconfig, int(pqc.shape[1])


def _mismatch_report(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> Optional[str]:
    lines = key_mismatch_lines(model, sd, what="autoencoder checkpoint")
    if not lines:
        return None
    try:
        cfg, emb = infer_ddconfig(sd)
        lines.append(f"  the weights look like ddconfig={cfg}, embed_dim={emb}")
    except CheckpointError:
        pass
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# the autoencoder
# --------------------------------------------------------------------------------------------
class AutoencoderKL(nn.Module):
    """KL-regularised autoencoder of latent diffusion / Stable Diffusion (inference use).

    Args:
        ddconfig: encoder/decoder config with the original keys (double_z, z_channels,
            resolution, in_channels, out_ch, ch, ch_mult, num_res_blocks, attn_resolutions,
            dropout). ``double_z`` must be True (the encoder predicts mean and log-variance).
        embed_dim: latent channels E seen by the diffusion model (4 for Stable Diffusion).
        scale_factor: latents = posterior * scale_factor (0.18215 for Stable Diffusion).

    The state dict has exactly the original keys (``encoder.*``, ``decoder.*``, ``quant_conv.*``,
    ``post_quant_conv.*``); ``scale_factor`` is a plain attribute, not a buffer.
    """

    def __init__(self, ddconfig: Mapping[str, Any], embed_dim: int, scale_factor: float = SD_SCALE_FACTOR):
        super().__init__()
        cfg = _check_ddconfig(ddconfig)
        if not cfg["double_z"]:
            raise ValueError("AutoencoderKL needs ddconfig['double_z']=True (mean and log-variance)")
        if int(embed_dim) <= 0:
            raise ValueError(f"embed_dim must be positive, got {embed_dim}")
        try:
            sf = float(scale_factor)
        except (TypeError, ValueError):
            sf = float("nan")
        if isinstance(scale_factor, bool) or not (math.isfinite(sf) and sf > 0):
            raise ValueError(f"scale_factor must be a positive finite number, got {scale_factor!r}")
        self.ddconfig = cfg
        self.embed_dim = int(embed_dim)
        self.scale_factor = sf
        self.downsample_factor = 2 ** (len(cfg["ch_mult"]) - 1)
        self.encoder = Encoder(**cfg)
        self.decoder = Decoder(**cfg)
        z = int(cfg["z_channels"])
        self.quant_conv = nn.Conv2d(2 * z, 2 * self.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(self.embed_dim, z, 1)

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def sd_kl_f8(cls, scale_factor: float = SD_SCALE_FACTOR) -> "AutoencoderKL":
        """The real Stable Diffusion KL-f8 architecture (ch=128, ch_mult [1,2,4,4], 2 res blocks,
        z_channels=4, embed_dim=4, resolution 256), randomly initialised: load weights with
        ``load_state_dict`` or use :meth:`from_checkpoint`."""
        return cls(dict(SD_KL_F8_DDCONFIG), _SD_EMBED_DIM, scale_factor)

    @classmethod
    def from_state_dict(
        cls,
        state_dict: Mapping[str, Any],
        ddconfig: Optional[Mapping[str, Any]] = None,
        embed_dim: Optional[int] = None,
        scale_factor: float = SD_SCALE_FACTOR,
        freeze: bool = True,
    ) -> "AutoencoderKL":
        """Build an autoencoder from an already-loaded checkpoint dict (see :meth:`from_checkpoint`)."""
        sd = extract_autoencoder_state_dict(state_dict)
        if ddconfig is None:
            ddconfig, inferred = infer_ddconfig(sd)
            embed_dim = inferred if embed_dim is None else embed_dim
        elif embed_dim is None:
            w = sd.get("post_quant_conv.weight")
            embed_dim = int(w.shape[1]) if w is not None else _SD_EMBED_DIM
        model = cls(ddconfig, embed_dim, scale_factor)
        report = _mismatch_report(model, sd)
        if report:
            raise CheckpointError(report)
        model.load_state_dict(sd, strict=True)
        if freeze:
            model.eval().requires_grad_(False)
        return model

    @classmethod
    def from_checkpoint(
        cls,
        path: Union[str, "os.PathLike[str]"],
        ddconfig: Optional[Mapping[str, Any]] = None,
        embed_dim: Optional[int] = None,
        scale_factor: float = SD_SCALE_FACTOR,
        freeze: bool = True,
    ) -> "AutoencoderKL":
        """Load an autoencoder checkpoint safely and return the model on the CPU.

        Args:
            path: ``.safetensors`` file or torch file (read with ``weights_only=True``, no pickled
                code runs). A plain state dict, or a latent-diffusion ``.ckpt`` layout
                ``{"state_dict": {...}}``; keys under ``first_stage_model.`` are accepted too.
                Keys other than ``encoder.``/``decoder.``/``quant_conv.``/``post_quant_conv.``
                (e.g. ``loss.*``) are ignored. Training ``.ckpt`` files that pickle Lightning
                objects (callbacks, optimizer classes) are refused by ``weights_only=True``; save
                their ``state_dict`` entry (or a ``.safetensors`` export) instead.
            ddconfig: architecture; None infers it from the weights (for the released SD
                autoencoder this yields :data:`SD_KL_F8_DDCONFIG`).
            embed_dim: None reads it from ``post_quant_conv.weight``.
            scale_factor: latent scale (0.18215 for Stable Diffusion).
            freeze: put the model in eval mode with ``requires_grad=False`` (the usual frozen
                first stage; decoding then builds no autograd graph).

        Raises:
            FileNotFoundError: no such file.
            CheckpointError: unreadable file, no autoencoder keys, or keys/shapes that do not match
                the architecture (the message lists missing and unexpected keys).
        """
        obj = read_checkpoint_file(path)
        try:
            return cls.from_state_dict(obj, ddconfig, embed_dim, scale_factor, freeze)
        except CheckpointError as e:
            raise CheckpointError(f"{os.fspath(path)}: {e}") from None

    # ---- helpers -------------------------------------------------------------------------------
    def _param(self) -> torch.Tensor:
        return self.post_quant_conv.weight

    def _check(self, x: torch.Tensor, name: str, channels: int, spatial_multiple: int) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
        if x.ndim != 4:
            raise ValueError(f"{name} must have shape (B, {channels}, H, W), got {tuple(x.shape)}")
        if x.shape[1] != channels:
            raise ValueError(
                f"{name} must have {channels} channels (shape (B, {channels}, H, W)), got shape {tuple(x.shape)}"
            )
        if spatial_multiple > 1 and (x.shape[2] % spatial_multiple or x.shape[3] % spatial_multiple):
            raise ValueError(
                f"{name} height and width must be multiples of {spatial_multiple} (the downsampling "
                f"factor), got {tuple(x.shape[2:])}"
            )

    @staticmethod
    def _chunks(n: int, batch_size: Optional[int]) -> List[slice]:
        if batch_size is None:
            return [slice(0, n)]
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
        return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]

    # ---- encoder -------------------------------------------------------------------------------
    def encode_moments(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Posterior of unscaled latents: images (B, in_channels, H, W) in [-1, 1] ->
        ``(mean, logvar)``, each (B, embed_dim, H/f, W/f) (logvar clamped to [-30, 20])."""
        self._check(images, "images", self.ddconfig["in_channels"], self.downsample_factor)
        p = self._param()
        moments = self.quant_conv(self.encoder(images.to(device=p.device, dtype=p.dtype)))
        mean, logvar = torch.chunk(moments, 2, dim=1)
        return mean, torch.clamp(logvar, -30.0, 20.0)

    def encode(
        self,
        images: torch.Tensor,
        sample: bool = False,
        generator: Optional[torch.Generator] = None,
        batch_size: Optional[int] = None,
    ) -> torch.Tensor:
        """Images (B, in_channels, H, W) in [-1, 1] -> scaled latents (B, embed_dim, H/f, W/f).

        Returns ``scale_factor * mean`` of the posterior, or with ``sample=True`` (implied by
        passing ``generator``) ``scale_factor * (mean + std * eps)``, eps ~ N(0, I) drawn from
        ``generator`` (which must live on the model's device). ``batch_size`` encodes in chunks.
        The result has the input's device and dtype.
        """
        self._check(images, "images", self.ddconfig["in_channels"], self.downsample_factor)
        sample = sample or generator is not None
        outs = []
        for sl in self._chunks(images.shape[0], batch_size):
            mean, logvar = self.encode_moments(images[sl])
            z = mean
            if sample:
                eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
                z = mean + torch.exp(0.5 * logvar) * eps
            outs.append((z * self.scale_factor).to(device=images.device, dtype=images.dtype))
        if not outs:  # empty batch
            f = self.downsample_factor
            return images.new_zeros((0, self.embed_dim, images.shape[2] // f, images.shape[3] // f))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)

    # ---- decoder -------------------------------------------------------------------------------
    def decode(self, latents: torch.Tensor, batch_size: Optional[int] = 16) -> torch.Tensor:
        """Scaled latents (B, embed_dim, h, w) -> images (B, out_ch, h*f, w*f), roughly in [-1, 1].

        Computes ``decoder(post_quant_conv(latents / scale_factor))`` ``batch_size`` latents at a
        time (None: all at once). Each chunk runs on the model's device and dtype and is moved
        back to the latents' device and dtype, so decoding thousands of CPU latents with a GPU
        model keeps only one chunk on the GPU. Wrap in ``torch.inference_mode()`` (or use a frozen
        model, see :meth:`from_checkpoint`) to avoid keeping autograd graphs.
        """
        self._check(latents, "latents", self.embed_dim, 1)
        f = self.downsample_factor
        out_shape = (0, self.ddconfig["out_ch"], latents.shape[2] * f, latents.shape[3] * f)
        p = self._param()
        outs = []
        for sl in self._chunks(latents.shape[0], batch_size):
            z = latents[sl].to(device=p.device, dtype=p.dtype) / self.scale_factor
            x = self.decoder(self.post_quant_conv(z))
            outs.append(x.to(device=latents.device, dtype=latents.dtype))
        if not outs:
            return latents.new_zeros(out_shape)
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)

    def forward(self, images: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """Reconstruction: images (B, C, H, W) in [-1, 1] -> decode(encode(images)), same shape."""
        return self.decode(self.encode(images, sample=sample), batch_size=None)

    @staticmethod
    def to_uint8(images: torch.Tensor) -> torch.Tensor:
        """Decoded images in [-1, 1] (B, C, H, W) -> uint8 in [0, 255], same shape (values clamped)."""
        if not images.is_floating_point():
            raise TypeError(f"images must be a floating-point tensor, got dtype {images.dtype}")
        return ((images.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)

    def extra_repr(self) -> str:
        c = self.ddconfig
        return (f"ch={c['ch']}, ch_mult={c['ch_mult']}, num_res_blocks={c['num_res_blocks']}, "
                f"z_channels={c['z_channels']}, embed_dim={self.embed_dim}, scale_factor={self.scale_factor}")
