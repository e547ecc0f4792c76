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


def test_gather_validates_the_index_once(monkeypatch):
    """One min/max read per index, not one per tensor (each is a host sync on CUDA)."""
    from duodiff_fast.ops import compaction

    calls = []
    real = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda t, *a, **k: (calls.append(1), real(t, *a, **k))[1])
    tensors = [torch.randn(6, 3) for _ in range(5)]
    index = torch.tensor([4, 0, 2])
    out = compaction.gather_rows(tensors, index)
    assert len(calls) == 1
    for o, t in zip(out, tensors):
        assert torch.equal(o, t[index])
    with pytest.raises(IndexError, match="6 rows"):
        compaction.gather_rows(tensors, torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="same number of rows"):
        compaction.gather_rows([torch.zeros(3, 1), torch.zeros(4, 1)], torch.tensor([0]))


def test_split_rows_routes_and_skips_the_gather_for_one_route():
    from duodiff_fast.ops import split_rows

    x = torch.arange(5.0)
    route = torch.tensor([0, 2, 0, 2, 2])
    seen = []

    def run(v, rows):
        seen.append((v, None if rows is None else rows.tolist()))
        return (x if rows is None else x[rows]) * 10 + v

    out = split_rows(route, (0, 1, 2), run)
    assert torch.equal(out, torch.tensor([0.0, 12.0, 20.0, 32.0, 42.0]))
    assert seen == [(0, [0, 2]), (2, [1, 3, 4])]  # route 1 has no rows: not run
    seen.clear()
    assert torch.equal(split_rows(torch.full((5,), 2), (0, 2), run), x * 10 + 2)
    assert seen == [(2, None)]  # every row on one route: no gather, no scatter
    partial = split_rows(route == 2, (True,), lambda v, rows: x[rows] * 0, out=x)
    assert torch.equal(partial, torch.tensor([0.0, 0.0, 2.0, 0.0, 0.0]))  # other rows keep out's values
