import pytest
import torch

from duodiff_fast.models import UViT, create_model, patchify, timestep_embedding, unpatchify
from tests.conftest import rel_err


@pytest.mark.parametrize("case", ["pixel", "latent"])
def test_matches_official_golden(golden, case):
    c = golden[case]
    model = UViT(**c["config"])
    model.load_state_dict(c["state_dict"])  # official key names load strictly
    model.eval()
    with torch.no_grad():
        out = model(c["x"], c["timesteps"], c.get("y"))
    assert out.shape == c["out"].shape
    assert rel_err(out, c["out"]) < 1e-5


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("backend", ["eager-bf16", "torch.compile"])
@pytest.mark.parametrize("case", ["pixel", "latent"])
def test_matches_official_golden_on_bf16_backends(golden, case, backend, device):
    """The bfloat16 backends against the official outputs (inductor on the CPU: seconds per case)."""
    from duodiff_fast.backends import prepare_model
    from tests.conftest import device_or_skip

    device = device_or_skip(device, backend)
    c = golden[case]
    model = UViT(**c["config"])
    model.load_state_dict(c["state_dict"])
    model = prepare_model(model.to(device), backend)
    assert next(model.parameters()).dtype == torch.bfloat16
    y = c.get("y")
    with torch.no_grad():
        out = model(c["x"].to(device, torch.bfloat16), c["timesteps"].to(device),
                    None if y is None else y.to(device)).float().cpu()
    assert rel_err(out, c["out"]) < 2e-2  # bfloat16 weights and activations vs the official float32


def test_state_dict_keys_equal_official(golden):
    for case in ("pixel", "latent"):
        c = golden[case]
        model = UViT(**c["config"])
        assert set(model.state_dict()) == set(c["state_dict"])


def test_patchify_roundtrip_and_layout():
    x = torch.randn(2, 3, 6, 10)
    tokens = patchify(x, 2)
    assert tokens.shape == (2, 15, 12)
    # token 0 holds pixel block [0:2, 0:2] in (p1, p2, C) order
    assert torch.equal(tokens[0, 0], x[0, :, 0:2, 0:2].permute(1, 2, 0).reshape(-1))
    sq = torch.randn(2, 4, 8, 8)
    assert torch.equal(unpatchify(patchify(sq, 2), 4), sq)


def test_timestep_embedding_closed_form():
    t = torch.tensor([0.0, 3.0, 500.0])
    emb = timestep_embedding(t, 8)
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(4) / 4)
    ref = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=1)
    assert torch.allclose(emb, ref, atol=1e-6)
    assert timestep_embedding(t, 7).shape == (3, 7)


def test_layer_count_and_helpers():
    m = create_model("tiny", depth=6)
    assert m.num_layers == 7 and len(m.layers()) == 7
    assert m.null_class is None
    c = create_model("tiny-cond")
    assert c.null_class == 10 and c.is_conditional


def test_decomposed_forward_equals_forward():
    torch.manual_seed(0)
    m = create_model("tiny-cond").eval()
    x, t, y = torch.randn(3, 3, 16, 16), torch.tensor([1.0, 500.0, 999.0]), torch.tensor([0, 4, 10])
    with torch.no_grad():
        a = m(x, t, y)
        b = m.decode(m.run_blocks(m.embed(x, t, y)))
    assert torch.equal(a, b)


def test_attention_upcast_switch_changes_only_precision():
    torch.manual_seed(0)
    m = create_model("tiny").eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10.0, 20.0])
    with torch.no_grad():
        ref = m(x, t)
        m.set_attention_upcast(False)
        same = m(x, t)  # float32 input: identical function
    assert torch.allclose(ref, same, atol=1e-6)


def test_gradients_flow_through_all_parameters():
    torch.manual_seed(0)
    m = create_model("tiny-cond")
    out = m(torch.randn(2, 3, 16, 16), torch.tensor([1.0, 2.0]), torch.tensor([1, 10]))
    out.square().mean().backward()
    no_grad = [n for n, p in m.named_parameters() if p.grad is None]
    assert no_grad == []


def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(0)
    a = create_model("tiny")
    b = create_model("tiny", use_checkpoint=True)
    b.load_state_dict(a.state_dict())
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1.0, 2.0])
    for m in (a, b):
        m.train()
        m(x, t).square().mean().backward()
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), n


class TestBadInput:
    def setup_method(self):
        self.m = create_model("tiny")
        self.c = create_model("tiny-cond")
        self.t = torch.tensor([1.0, 2.0])

    def test_wrong_channels(self):
        with pytest.raises(ValueError, match=r"shape \(B, 3, 16, 16\).*\(2, 4, 16, 16\)"):
            self.m(torch.randn(2, 4, 16, 16), self.t)

    def test_wrong_size(self):
        with pytest.raises(ValueError, match="16, 16"):
            self.m(torch.randn(2, 3, 8, 8), self.t)

    def test_non_float(self):
        with pytest.raises(TypeError, match="floating-point"):
            self.m(torch.zeros(2, 3, 16, 16, dtype=torch.long), self.t)

    def test_timestep_shape(self):
        with pytest.raises(ValueError, match="timesteps"):
            self.m(torch.randn(2, 3, 16, 16), torch.ones(3))

    def test_labels_for_unconditional(self):
        with pytest.raises(ValueError, match="unconditional"):
            self.m(torch.randn(2, 3, 16, 16), self.t, torch.tensor([0, 1]))

    def test_missing_labels(self):
        with pytest.raises(ValueError, match="class-conditional"):
            self.c(torch.randn(2, 3, 16, 16), self.t)

    def test_label_out_of_range(self):
        with pytest.raises(ValueError, match=r"\[0, 10\].*\[0, 11\]"):
            self.c(torch.randn(2, 3, 16, 16), self.t, torch.tensor([0, 11]))

    def test_float_labels(self):
        with pytest.raises(TypeError, match="integer"):
            self.c(torch.randn(2, 3, 16, 16), self.t, torch.tensor([0.0, 1.0]))

    def test_bad_constructor(self):
        with pytest.raises(ValueError, match="divisible"):
            UViT(img_size=15, patch_size=2)
        with pytest.raises(ValueError, match="even"):
            UViT(img_size=16, patch_size=2, depth=3)
        with pytest.raises(ValueError, match="num_heads"):
            UViT(img_size=16, patch_size=2, embed_dim=30, num_heads=4, depth=2)


def test_bf16_weights_with_time_mlp_and_labels():
    """A bf16 model with mlp_time_embed (the latent configs) runs and stays close to float32."""
    torch.manual_seed(0)
    m = create_model("tiny-latent").eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 900.0]), torch.tensor([1, 10])
    with torch.no_grad():
        ref = m(x, t, y)
        low = m.to(torch.bfloat16).set_attention_upcast(False)(x.bfloat16(), t, y)
    assert low.dtype == torch.bfloat16
    assert rel_err(low.float(), ref) < 0.05
