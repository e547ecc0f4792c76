"""EDM's DDPM++ U-Net (``SongUNet``) and the multistage authors' ``MultistageUNet``.

Both are written here from the architecture EDM describes (Karras et al. 2022, appendix; Song et al.
2021's DDPM++), with EDM's module names, so that a state dict exported from EDM's or the authors'
code loads unchanged: ``map_layer0``, ``map_layer1``, ``enc.{res}x{res}_{conv,down,blockK}``,
``dec.{res}x{res}_{in0,in1,up,blockK,aux_norm,aux_conv}`` (``decs.{s}.*`` for the multistage net).

Supported: positional (DDPM++) or Fourier (NCSN++) noise embeddings, the standard encoder and
decoder, any resample filter, class labels and EDM's augmentation labels. EDM's 'skip'/'residual'
encoders and 'skip' decoder (NCSN++) are refused by name.

The networks take (x, noise_labels, class_labels): x (B, C, H, W) already scaled by c_in,
noise_labels (B,) or (1,) = c_noise, class_labels (B, label_dim) float or None, and return F (B, C, H, W).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SongUNet", "MultistageUNet", "UNetBlock", "Conv2d", "stage_from_sigma"]


def _xavier(t: Tensor, gain: float = 1.0) -> Tensor:
    """EDM's 'xavier_uniform' init (fan_in = in k k, fan_out = out k k) times ``gain``."""
    with torch.no_grad():
        nn.init.xavier_uniform_(t)
        t.mul_(gain)
    return t


class Conv2d(nn.Module):
    """k x k convolution with optional 2x up/down resampling by a separable FIR filter.

    The filter is stored as the buffer ``resample_filter`` (1, 1, f, f) only when resampling, as EDM
    does. Up: transposed depthwise conv with 4 f (stride 2), then the conv. Down: depthwise conv with
    f (stride 2), then the conv.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, up: bool = False, down: bool = False,
                 resample_filter: Sequence[int] = (1, 1), gain: float = 1.0):
        super().__init__()
        if up and down:
            raise ValueError("a Conv2d resamples up or down, not both")
        self.in_channels, self.out_channels, self.up, self.down = in_channels, out_channels, up, down
        self.weight = nn.Parameter(_xavier(torch.empty(out_channels, in_channels, kernel, kernel), gain))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        f = torch.as_tensor(list(resample_filter), dtype=torch.float32)
        f = torch.outer(f, f)[None, None] / f.sum().square()
        self.register_buffer("resample_filter", f if (up or down) else None)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.to(x.dtype)
        if self.resample_filter is not None:
            f = self.resample_filter.to(x.dtype)
            pad = (f.shape[-1] - 1) // 2
            if self.up:
                x = F.conv_transpose2d(x, (f * 4).tile(self.in_channels, 1, 1, 1), groups=self.in_channels,
                                       stride=2, padding=pad)
            else:
                x = F.conv2d(x, f.tile(self.in_channels, 1, 1, 1), groups=self.in_channels, stride=2, padding=pad)
        return F.conv2d(x, w, self.bias.to(x.dtype), padding=w.shape[-1] // 2)


def _linear(cin: int, cout: int, bias: bool = True) -> nn.Linear:
    lin = nn.Linear(cin, cout, bias=bias)
    _xavier(lin.weight)
    if bias:
        nn.init.zeros_(lin.bias)
    return lin


def _group_norm(channels: int, eps: float = 1e-6) -> nn.GroupNorm:
    """EDM's GroupNorm: min(32, C // 4) groups."""
    return nn.GroupNorm(min(32, channels // 4), channels, eps=eps)


class UNetBlock(nn.Module):
    """DDPM++ residual block (additive embedding, skip scale 1/sqrt(2)) with optional 1-head attention.

    x (B, cin, H, W), emb (B or 1, E) -> (B, cout, H', W') with H' = 2H (up), H/2 (down) or H.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False,
                 down: bool = False, attention: bool = False, dropout: float = 0.0,
                 resample_filter: Sequence[int] = (1, 1)):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.dropout = float(dropout)
        self.skip_scale = math.sqrt(0.5)
        self.norm0 = _group_norm(in_channels)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter)
        self.affine = _linear(emb_channels, out_channels)
        self.norm1 = _group_norm(out_channels)
        self.conv1 = Conv2d(out_channels, out_channels, 3, gain=1e-5)
        self.skip = None
        if out_channels != in_channels or up or down:  # DDPM++ projects the skip (resample_proj)
            self.skip = Conv2d(in_channels, out_channels, 1, up=up, down=down, resample_filter=resample_filter)
        self.attention = bool(attention)
        if attention:
            self.norm2 = _group_norm(out_channels)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1, gain=math.sqrt(0.2))
            self.proj = Conv2d(out_channels, out_channels, 1, gain=1e-5)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(x.dtype)
        x = F.silu(self.norm1(x + params))
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = (x + (self.skip(orig) if self.skip is not None else orig)) * self.skip_scale
        if self.attention:
            x = (self.proj(self._attend(self.qkv(self.norm2(x)))) + x) * self.skip_scale
        return x

    @staticmethod
    def _attend(qkv: Tensor) -> Tensor:
        """One-head self-attention over pixels. qkv (B, 3C, H, W) holds q, k, v interleaved per
        channel (channel 3c + j is q/k/v[j] of channel c), as EDM's reshape reads it."""
        b, c3, h, w = qkv.shape
        q, k, v = qkv.reshape(b, c3 // 3, 3, h * w).unbind(2)  # each (B, C, HW)
        # Softmax in float32 (EDM's AttentionOp does the same for fp16 inputs).
        a = F.scaled_dot_product_attention(q.transpose(1, 2)[:, None].float(), k.transpose(1, 2)[:, None].float(),
                                           v.transpose(1, 2)[:, None].float())  # (B, 1, HW, C)
        return a[:, 0].transpose(1, 2).reshape(b, c3 // 3, h, w).to(qkv.dtype)


class PositionalEmbedding(nn.Module):
    """DDPM++ noise embedding: [cos(x f), sin(x f)], f_i = 10000^(-i/(C/2 - 1)) (endpoint included)."""

    def __init__(self, num_channels: int, max_positions: int = 10000):
        super().__init__()
        self.num_channels, self.max_positions = num_channels, max_positions

    def forward(self, x: Tensor) -> Tensor:
        half = self.num_channels // 2
        freqs = (1 / self.max_positions) ** (torch.arange(half, dtype=torch.float32, device=x.device) / (half - 1))
        x = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """NCSN++ noise embedding: [cos(2 pi x f), sin(2 pi x f)] with random frequencies (buffer ``freqs``)."""

    def __init__(self, num_channels: int, scale: float = 16.0):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


def _check_types(embedding_type: str, encoder_type: str, decoder_type: str) -> None:
    if embedding_type not in ("positional", "fourier"):
        raise ValueError(f"embedding_type must be 'positional' or 'fourier', got {embedding_type!r}")
    if encoder_type != "standard":
        raise ValueError(f"encoder_type {encoder_type!r} is not supported (only EDM's 'standard' DDPM++ encoder)")
    if decoder_type != "standard":
        raise ValueError(f"decoder_type {decoder_type!r} is not supported (only EDM's 'standard' decoder)")


class _MappingAndEncoder(nn.Module):
    """The shared front of both U-Nets: noise/label mapping to ``emb`` and the encoder with its skips."""

    def __init__(self, img_resolution, in_channels, label_dim, augment_dim, model_channels, channel_mult,
                 channel_mult_emb, num_blocks, attn_resolutions, dropout, label_dropout, embedding_type,
                 channel_mult_noise, encoder_type, decoder_type, resample_filter):
        super().__init__()
        _check_types(embedding_type, encoder_type, decoder_type)
        if img_resolution % (1 << (len(channel_mult) - 1)):
            raise ValueError(f"img_resolution {img_resolution} is not divisible by 2^{len(channel_mult) - 1}")
        self.img_resolution, self.img_channels = int(img_resolution), int(in_channels)
        self.label_dim, self.label_dropout = int(label_dim), float(label_dropout)
        self.channel_mult, self.num_blocks = list(channel_mult), int(num_blocks)
        self.attn_resolutions = list(attn_resolutions)
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        self.block_kwargs = dict(emb_channels=emb_channels, dropout=dropout, resample_filter=list(resample_filter))
        self.map_noise = (PositionalEmbedding(noise_channels) if embedding_type == "positional"
                          else FourierEmbedding(noise_channels))
        self.map_label = _linear(label_dim, noise_channels) if label_dim else None
        self.map_augment = _linear(augment_dim, noise_channels, bias=False) if augment_dim else None
        self.map_layer0 = _linear(noise_channels, emb_channels)
        self.map_layer1 = _linear(emb_channels, emb_channels)
        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(cout, model_channels, 3)
                cout = model_channels
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **self.block_kwargs)
            for idx in range(num_blocks):
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cout, model_channels * mult, attention=res in self.attn_resolutions, **self.block_kwargs)
                cout = model_channels * mult
        self.bottom_channels = cout
        self.skip_channels = [m.out_channels for m in self.enc.values()]

    def embed(self, noise_labels: Tensor, class_labels: Optional[Tensor], augment_labels: Optional[Tensor],
              batch: int) -> Tensor:
        """emb (B or 1, E) from c_noise (B,) or (1,)."""
        dtype = self.map_layer0.weight.dtype  # the embedding is computed in float32, the MLP in the weights' dtype
        emb = self.map_noise(noise_labels.float())
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(emb.shape).to(dtype)  # [sin, cos] as DDPM++
        if self.map_label is not None:
            if class_labels is None:
                raise ValueError(f"this U-Net is class-conditional (label_dim {self.label_dim}): pass class_labels")
            tmp = class_labels
            if self.training and self.label_dropout:
                tmp = tmp * (torch.rand(batch, 1, device=tmp.device) >= self.label_dropout).to(tmp.dtype)
            emb = emb + self.map_label((tmp * math.sqrt(self.label_dim)).to(dtype))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(dtype))
        return F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

    def encode(self, x: Tensor, emb: Tensor) -> List[Tensor]:
        """Run the encoder; returns every module's output (the decoder's skips, last = bottom)."""
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        return skips

    def make_decoder(self, model_channels: int, out_channels: int) -> nn.ModuleDict:
        """A standard DDPM++ decoder of base width ``model_channels`` over this encoder's skips."""
        dec = nn.ModuleDict()
        skips = list(self.skip_channels)
        cout = self.bottom_channels
        last = len(self.channel_mult) - 1
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            res = self.img_resolution >> level
            if level == last:
                dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **self.block_kwargs)
                dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **self.block_kwargs)
            else:
                dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **self.block_kwargs)
            for idx in range(self.num_blocks + 1):
                cin = cout + skips.pop()
                cout = model_channels * mult
                attn = idx == self.num_blocks and res in self.attn_resolutions
                dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **self.block_kwargs)
        dec[f"{self.img_resolution}x{self.img_resolution}_aux_norm"] = _group_norm(cout)
        dec[f"{self.img_resolution}x{self.img_resolution}_aux_conv"] = Conv2d(cout, out_channels, 3, gain=1e-5)
        return dec

    @staticmethod
    def decode(dec: nn.ModuleDict, skips: List[Tensor], emb: Tensor) -> Tensor:
        """Run a decoder made by :meth:`make_decoder`; consumes ``skips`` (a copy is not needed)."""
        skips = list(skips)
        x = skips[-1]
        tmp = None
        for name, block in dec.items():
            if name.endswith("_aux_norm"):
                tmp = block(x)
            elif name.endswith("_aux_conv"):
                return block(F.silu(tmp))
            else:
                if "_block" in name:  # every decoder block takes the next skip
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        raise RuntimeError("decoder has no aux_conv output layer")


_DEFAULTS = dict(label_dim=0, augment_dim=0, channel_mult=(1, 2, 2, 2), channel_mult_emb=4, num_blocks=4,
                 attn_resolutions=(16,), dropout=0.10, label_dropout=0.0, embedding_type="positional",
                 channel_mult_noise=1, encoder_type="standard", decoder_type="standard", resample_filter=(1, 1))


class SongUNet(_MappingAndEncoder):
    """EDM's DDPM++ U-Net: x (B, C, H, W), noise_labels (B,) -> F (B, out_channels, H, W).

    Constructor arguments are EDM's (``img_resolution``, ``in_channels``, ``out_channels``,
    ``model_channels``, ``channel_mult``, ``num_blocks``, ``attn_resolutions``, ``dropout``, ...).
    """

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, model_channels: int = 128,
                 **kwargs):
        unknown = set(kwargs) - set(_DEFAULTS)
        if unknown:
            raise TypeError(f"SongUNet got unknown arguments {sorted(unknown)}")
        opts = {**_DEFAULTS, **kwargs}
        super().__init__(img_resolution, in_channels, model_channels=model_channels, **opts)
        self.out_channels = int(out_channels)
        self.dec = self.make_decoder(model_channels, out_channels)

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Optional[Tensor] = None,
                augment_labels: Optional[Tensor] = None) -> Tensor:
        emb = self.embed(noise_labels, class_labels, augment_labels, x.shape[0])
        return self.decode(self.dec, self.encode(x, emb), emb)


def stage_from_sigma(sigma0: float, stage_interval) -> int:
    """The multistage authors' rule: the last stage with an interval whose lower bound is below sigma0.

    With ascending, contiguous (lo, hi] intervals this is the stage holding sigma0."""
    stage = None
    for s, intervals in enumerate(stage_interval):
        for lo, _hi in intervals:
            if sigma0 > lo:
                stage = s
    if stage is None:
        raise ValueError(f"noise level {sigma0} lies below every stage of {stage_interval}")
    return stage


class MultistageUNet(_MappingAndEncoder):
    """The multistage authors' DDPM++ U-Net: a shared encoder of width ``en_model_channels`` and one
    standard decoder per stage of width ``de_model_channels[s]`` (``decs.{s}.*``).

    The decoder runs for one stage per batch: ``stage`` when given, else the stage of row 0's noise
    level sigma = exp(4 c_noise) (EDM's c_noise = ln(sigma)/4) under ``stage_interval`` (per stage a
    list of (lo, hi] intervals on sigma).
    """

    CIFAR10_STAGE_INTERVAL = [[[0.0, 2.5103]], [[2.5103, 7.6577]], [[7.6577, math.inf]]]

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, en_model_channels: int = 128,
                 de_model_channels: Sequence[int] = (192, 128, 16), stage_num: int = 3,
                 stage_interval=None, **kwargs):
        unknown = set(kwargs) - set(_DEFAULTS)
        if unknown:
            raise TypeError(f"MultistageUNet got unknown arguments {sorted(unknown)}")
        stage_interval = self.CIFAR10_STAGE_INTERVAL if stage_interval is None else stage_interval
        if not (stage_num == len(de_model_channels) == len(stage_interval)):
            raise ValueError(f"stage_num {stage_num}, de_model_channels {list(de_model_channels)} and "
                             f"stage_interval ({len(stage_interval)} stages) disagree")
        super().__init__(img_resolution, in_channels, model_channels=en_model_channels, **{**_DEFAULTS, **kwargs})
        self.out_channels = int(out_channels)
        self.stage_num = int(stage_num)
        self.stage_interval = [[(float(lo), float(hi)) for lo, hi in st] for st in stage_interval]
        self.de_model_channels = [int(c) for c in de_model_channels]
        self.decs = nn.ModuleList(self.make_decoder(c, out_channels) for c in self.de_model_channels)

    def stage_of(self, noise_labels: Tensor) -> int:
        """Stage of the batch from row 0 (one host read)."""
        return stage_from_sigma(float(torch.exp(noise_labels.reshape(-1)[0].float() * 4)), self.stage_interval)

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Optional[Tensor] = None,
                augment_labels: Optional[Tensor] = None, stage: Optional[int] = None) -> Tensor:
        if stage is None:
            stage = self.stage_of(noise_labels)
        elif not 0 <= stage < self.stage_num:
            raise ValueError(f"stage must be in [0, {self.stage_num}), got {stage}")
        emb = self.embed(noise_labels, class_labels, augment_labels, x.shape[0])
        return self.decode(self.decs[stage], self.encode(x, emb), emb)
