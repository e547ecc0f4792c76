"""Independent U-ViT pieces written out module by module, as references for the method tests
(they share no code with the package's layer program)."""
import torch

from duodiff_fast.models.uvit import timestep_embedding, unpatchify


def embed(m, x, ts, y):
    """Tokens [label, time, patches] + pos_embed of U-ViT ``m``: (B, C, H, W) -> (B, E + L, D)."""
    tokens = m.patch_embed.proj(x).flatten(2).transpose(1, 2)
    front = [m.time_embed(timestep_embedding(ts, m.embed_dim)).unsqueeze(1)]
    if y is not None:
        front.insert(0, m.label_emb(y).unsqueeze(1))
    return torch.cat([*front, tokens], dim=1) + m.pos_embed


def block(blk, h, skip=None, transform=True):
    """One block: the skip merge (when ``skip`` is given), then attention + MLP (when ``transform``)."""
    if skip is not None:
        h = blk.skip_linear(torch.cat([h, skip], dim=-1))
    if transform:
        h = h + blk.attn(blk.norm1(h))
        h = h + blk.mlp(blk.norm2(h))
    return h


def final(head, extras, channels, h):
    """LayerNorm, patch prediction, drop the extra tokens, unpatchify, conv."""
    out = head.decoder_pred(head.norm(h))[:, extras:, :]
    return head.final_layer(unpatchify(out, channels))


def deepcache_step(model, x, ts, y, full: bool, depth: int, inner):
    """One DeepCache step of U-ViT ``model`` written out over its blocks.

    A full step runs every block and returns the input of the last ``depth`` out-blocks as the new
    cache; a cached step runs only the first ``depth`` in-blocks and reuses ``inner``.
    Returns (decoded output (B, C, H, W), cache (B, E + L, D)).
    """
    n = len(model.in_blocks)
    outs = list(model.out_blocks)
    h = model.embed(x, ts, y)
    skips = []
    if full:
        for b in model.in_blocks:
            h = b(h)
            skips.append(h)
        h = model.mid_block(h)
        for b in outs[:n - depth]:
            h = b(h, skips.pop())
        inner = h
    else:
        for b in list(model.in_blocks)[:depth]:
            h = b(h)
            skips.append(h)
        h = inner
    for b in outs[n - depth:]:
        h = b(h, skips.pop())
    return model.decode(h), inner
