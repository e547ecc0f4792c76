"""The layer program: one loop with hooks (row exits with compaction, kept blocks, decoders)."""
import pytest
import torch

from duodiff_fast.models import create_model
from duodiff_fast.models.executor import TorchExecutor, TritonExecutor, executor_for
from duodiff_fast.models.program import LayerProgram, program_for
from duodiff_fast.models.uvit import UViT
from tests.methods import explicit


def _setup(b=4):
    torch.manual_seed(0)
    m = create_model("tiny-cond", depth=4).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, 3, 16, 16, generator=g)
    ts = torch.rand(b, generator=g) * 999
    y = torch.randint(0, 10, (b,), generator=g)
    return m, x, ts, y


class _LeaveAt:
    """Rows ``rows`` leave before layer ``layer`` through the model's own final layer."""

    def __init__(self, model, layer, rows):
        self.model, self.layer, self.rows = model, layer, rows
        self.seen = []

    def head(self, i):
        return self.model

    def before_layer(self, i, state, program):
        self.seen.append((i, state.h.shape[0], len(state.skips)))
        if i != self.layer:
            return None
        leave = torch.zeros(state.h.shape[0], dtype=torch.bool)
        leave[self.rows] = True
        return leave


def test_exit_hook_compacts_rows_and_skips():
    m, x, ts, y = _setup()
    program = LayerProgram(m, TorchExecutor())
    hook = _LeaveAt(m, 2, [1, 3])
    with torch.no_grad():
        state = program.encode(x, ts, y, hook=hook)
        out = program.decode(state, hook=hook)
        tokens = m.embed(x, ts, y)
        early = m.decode(m.in_blocks[1](m.in_blocks[0](tokens)))  # rows 1, 3: two layers, then the head
        full = m(x, ts, y)
    assert state.exits.tolist() == [5, 2, 5, 2]
    assert state.rows.tolist() == [0, 2]  # the rows still active after the exit
    torch.testing.assert_close(out[[1, 3]], early[[1, 3]], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[[0, 2]], full[[0, 2]], rtol=1e-5, atol=1e-6)
    # the hook saw 4 rows before the exit and 2 after, with the skip stack compacted alongside
    assert hook.seen[:3] == [(0, 4, 0), (1, 4, 1), (2, 4, 2)] and hook.seen[3] == (3, 2, 2)


def test_every_row_leaving_stops_the_program():
    m, x, ts, y = _setup()
    program = LayerProgram(m, TorchExecutor())
    hook = _LeaveAt(m, 0, [0, 1, 2, 3])
    with torch.no_grad():
        out = program.run(x, ts, y, hook=hook)
        ref = m.decode(m.embed(x, ts, y))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert [s[0] for s in hook.seen] == [0]  # no layer ran


def _layers_by_hand(m, tokens):
    """The U-ViT layer walk written out (tests/methods/explicit.py's blocks): in-blocks push their
    outputs, the mid-block, out-blocks pop them as long skips."""
    h, skips = tokens, []
    for blk in m.in_blocks:
        h = explicit.block(blk, h)
        skips.append(h)
    h = explicit.block(m.mid_block, h)
    for blk in m.out_blocks:
        h = explicit.block(blk, h, skips.pop())
    return h


def test_run_layers_matches_a_hand_written_walk_and_program_for_checks_its_model():
    m, x, ts, y = _setup()
    with torch.no_grad():
        tokens = explicit.embed(m, x, ts, y)
        got = LayerProgram(m, TorchExecutor()).run_layers(tokens)
        torch.testing.assert_close(got, _layers_by_hand(m, tokens), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m.run_blocks(tokens), got, rtol=0, atol=0)
    with pytest.raises(TypeError, match="UViT"):
        program_for(torch.nn.Linear(2, 2), x)


@pytest.mark.parametrize("case", ["pixel", "latent"])
def test_program_reproduces_the_official_uvit(golden, case):
    """The layer program against the official U-ViT code's outputs (../shared/golden)."""
    c = golden[case]
    m = UViT(**c["config"])
    m.load_state_dict(c["state_dict"])
    m.eval()
    x, ts, y = c["x"], c["timesteps"], c.get("y")
    with torch.no_grad():
        out = LayerProgram(m, TorchExecutor()).run(x, ts, y)
    torch.testing.assert_close(out, c["out"], rtol=1e-5, atol=1e-5)


def test_executor_choice():
    cpu = torch.device("cpu")
    assert isinstance(executor_for("torch", cpu), TorchExecutor)
    assert not isinstance(executor_for("torch", cpu), TritonExecutor)
    assert isinstance(executor_for("triton", cpu, grad=True), TorchExecutor)  # gradients: eager
    assert executor_for("torch", cpu, checkpoint=True).checkpoint
