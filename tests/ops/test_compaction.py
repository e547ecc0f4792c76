import pytest
import torch

from duodiff_fast.ops import active_indices, gather_rows, scatter_rows


@pytest.mark.parametrize("batch", [1, 5, 17])
def test_round_trip(batch):
    g = torch.Generator().manual_seed(batch)
    keep = torch.rand(batch, generator=g) < 0.5
    x, skip = torch.randn(batch, 7, 3, generator=g), torch.randn(batch, 7, 3, generator=g)
    idx = active_indices(keep)
    assert idx.tolist() == [i for i in range(batch) if keep[i]]
    cx, cs = gather_rows([x, skip], idx)
    assert torch.equal(cx, x[keep]) and torch.equal(cs, skip[keep])
    out = torch.full_like(x, float("nan"))
    scatter_rows(out, idx, cx)
    scatter_rows(out, active_indices(~keep), x[~keep])
    assert torch.equal(out, x)


def test_bad_inputs():
    with pytest.raises(ValueError, match="bool mask"):
        active_indices(torch.ones(3))
    with pytest.raises(IndexError):
        gather_rows([torch.zeros(2, 1)], torch.tensor([2]))
    with pytest.raises(ValueError, match="does not fit"):
        scatter_rows(torch.zeros(3, 2), torch.tensor([0]), torch.zeros(1, 3))
