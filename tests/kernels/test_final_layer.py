"""kernels.final_layer (LayerNorm + decoder_pred + drop extras + unpatchify) against UViT.decode's ops."""
import pytest
import torch

from .conftest import DTYPES, assert_within_torch_error


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,extras,grid,p,c,d", [
    (2, 1, 4, 2, 3, 40), (1, 2, 3, 2, 4, 24), (2, 2, 2, 4, 3, 72),
])
def test_final_layer_matches_torch(device, poisoned, dtype, b, extras, grid, p, c, d):
    from duodiff_fast.kernels import final_layer, final_layer_reference
    from duodiff_fast.models.functional import unpatchify

    g = torch.Generator().manual_seed(grid * 100 + d)
    tokens = (torch.randn(b, extras + grid * grid, d, generator=g) * 2 + 0.5).to(device, dtype)
    nw, nb = torch.randn(d, generator=g).to(device), torch.randn(d, generator=g).to(device)
    pw = (torch.randn(p * p * c, d, generator=g) / d ** 0.5).to(device, dtype)
    pb = torch.randn(p * p * c, generator=g).to(device, dtype)
    out = final_layer(tokens, nw, nb, 1e-6, pw, pb, extras, c)
    assert out.shape == (b, c, grid * p, grid * p)
    exact = final_layer_reference(tokens.double(), nw.double(), nb.double(), 1e-6, pw.double(), pb.double(),
                                  extras, c, unpatchify=unpatchify)
    torch_low = final_layer_reference(tokens, nw.to(dtype), nb.to(dtype), 1e-6, pw, pb, extras, c,
                                      unpatchify=unpatchify)
    assert_within_torch_error(out, torch_low, exact, dtype, f"final_layer b{b} g{grid} p{p} c{c} d{d}")
