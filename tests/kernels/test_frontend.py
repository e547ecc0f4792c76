"""kernels.frontend (patch embedding + label/time tokens + position embedding) against UViT.embed's ops."""
import pytest
import torch

from .conftest import DTYPES, assert_within_torch_error


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,c,img,p,d,conditional", [
    (2, 3, 8, 2, 40, False), (3, 4, 8, 2, 24, True), (1, 3, 12, 4, 72, True),
])
def test_frontend_matches_torch(device, poisoned, dtype, b, c, img, p, d, conditional):
    from duodiff_fast.kernels import frontend, frontend_reference

    g = torch.Generator().manual_seed(img * 10 + d)
    extras = 2 if conditional else 1
    nt = extras + (img // p) ** 2
    images = torch.randn(b, c, img, img, generator=g).to(device, dtype)
    w = (torch.randn(d, c, p, p, generator=g) * 0.3).to(device, dtype)
    bias = torch.randn(d, generator=g).to(device, dtype)
    pos = torch.randn(1, nt, d, generator=g).to(device, dtype)
    time_tok = torch.randn(b, d, generator=g).to(device)
    table = torch.randn(7, d, generator=g).to(device, dtype) if conditional else None
    y = torch.randint(0, 7, (b,), generator=g).to(device) if conditional else None
    out = frontend(images, w, bias, pos, time_tok, table, y)
    assert out.shape == (b, nt, d)
    d64 = lambda t: t.double() if t is not None else None  # noqa: E731
    exact = frontend_reference(d64(images), d64(w), d64(bias), d64(pos), d64(time_tok), d64(table), y)
    torch_low = frontend_reference(images, w, bias, pos, time_tok, table, y)
    assert_within_torch_error(out, torch_low, exact, dtype, f"frontend b{b} c{c} img{img} p{p} d{d}")


def test_frontend_rejects_wrong_pos_embed(device):
    from duodiff_fast.kernels import frontend

    with pytest.raises(ValueError, match="pos_embed"):
        frontend(torch.randn(1, 3, 4, 4, device=device), torch.randn(8, 3, 2, 2, device=device),
                 torch.randn(8, device=device), torch.randn(1, 4, 8, device=device),
                 torch.randn(1, 8, device=device))
