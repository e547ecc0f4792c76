"""edm.auto_backend: ``--backend auto`` for EDM U-Nets -- the small check net, the self-check against the
float32 reference (every multistage decoder), skipping a failing candidate with one warning, the
shared per-machine cache, and ``sample``'s resolution (reference on a CPU)."""
import argparse
import json
import warnings

import pytest
import torch

from duodiff_fast import auto_backend as ab
from duodiff_fast.edm import build_edm_net, get_edm_config
from duodiff_fast.edm import auto_backend as eab


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DUODIFF_FAST_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / ab.CACHE_FILE


TINY = get_edm_config("multistage-tiny-ddpmpp")


def test_check_config_is_a_smaller_net_of_the_same_layout():
    for name in ("edm-cifar10-ddpmpp", "multistage-cifar10-ddpmpp"):
        cfg = get_edm_config(name)
        small = eab.edm_check_config(cfg)
        assert small["num_blocks"] == 1 and small["dropout"] == 0.0
        for key in ("img_resolution", "channel_mult", "attn_resolutions", "precond", "model_type", "label_dim"):
            assert small[key] == cfg[key]
        if cfg["model_type"] == "MultistageUNet":
            assert small["stage_interval"] == cfg["stage_interval"]
            assert len(small["de_model_channels"]) == 3
            assert all(c % 4 == 0 and c <= eab.CHECK_CHANNELS for c in small["de_model_channels"])
            assert small["de_model_channels"][0] > small["de_model_channels"][2]  # the widths keep their order
        else:
            assert small["model_channels"] == eab.CHECK_CHANNELS
        big = sum(p.numel() for p in build_edm_net(cfg).parameters())
        assert sum(p.numel() for p in build_edm_net(small).parameters()) < big / 10


def test_the_check_covers_every_stage():
    from duodiff_fast.edm.unet import stage_from_sigma

    net = build_edm_net(eab.edm_check_config(TINY))
    sigmas = eab._check_sigmas(net)
    assert [stage_from_sigma(s, net.model.stage_interval) for s in sigmas] == [0, 1, 2]


def test_auto_on_the_cpu_is_the_reference_without_a_check(cache, monkeypatch):
    monkeypatch.setattr(eab, "edm_self_check", lambda *a: pytest.fail("no self-check on a CPU"))
    choice = eab.choose_edm_backend(TINY, "cpu")
    assert choice.backend == "reference" and choice.reason.startswith("auto: reference")
    assert not cache.exists()


def test_self_check_passes_bf16_and_catches_a_wrong_net(monkeypatch):
    err = eab.edm_self_check("eager-bf16", TINY, "cpu")
    assert 0 < err < ab.TOLERANCE[torch.bfloat16]
    from duodiff_fast.edm import backends

    real = backends.prepare_edm_net

    def broken(net, backend="reference", *a, **kw):
        m = real(net, backend, *a, **kw)
        if backend != "reference":  # a "fast" path computing another function: one decoder off
            with torch.no_grad():
                for p in m.model.decs[1].parameters():
                    p.mul_(1.5)
        return m

    monkeypatch.setattr(backends, "prepare_edm_net", broken)
    with pytest.raises(AssertionError, match="at sigma .* exceeds the bfloat16 tolerance"):
        eab.edm_self_check("eager-bf16", TINY, "cpu")


def test_a_passing_backend_is_chosen_and_cached(cache, monkeypatch):
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*backend auto")
        choice = eab.choose_edm_backend(TINY, "cpu", candidates=("eager-bf16", "reference"), name="multistage-tiny-ddpmpp")
    assert choice.backend == "eager-bf16" and not choice.cached
    assert choice.reason.startswith("auto: eager-bf16 passed the EDM U-Net self-check on cpu")
    stored = json.loads(cache.read_text())
    assert list(stored.values()) == [{"backend": "eager-bf16", "reason": choice.reason}]
    assert "edm:multistage-tiny-ddpmpp" in next(iter(stored))
    monkeypatch.setattr(eab, "edm_self_check", lambda *a: pytest.fail("the cached choice must not be checked again"))
    again = eab.choose_edm_backend(TINY, "cpu", candidates=("eager-bf16", "reference"), name="multistage-tiny-ddpmpp")
    assert again.backend == "eager-bf16" and again.cached and str(cache) in again.reason


def test_a_failing_backend_is_skipped_with_one_warning(cache, monkeypatch):
    monkeypatch.setitem(ab.TOLERANCE, torch.bfloat16, 0.0)  # nothing meets it
    with pytest.warns(RuntimeWarning) as record:
        choice = eab.choose_edm_backend(TINY, "cpu", candidates=("eager-bf16", "reference"))
    messages = [str(w.message) for w in record if "backend auto" in str(w.message)]
    assert len(messages) == 1 and "eager-bf16 failed the EDM U-Net self-check" in messages[0]
    assert choice.backend == "reference" and "skipped: eager-bf16 failed" in choice.reason


def test_triton_is_never_a_unet_candidate():
    assert "triton" not in eab.EDM_AUTO_ORDER
    with pytest.raises(ValueError, match="EDM U-Nets run on"):
        eab.choose_edm_backend(TINY, "cpu", candidates=("triton", "reference"))


def _args(**kw):
    base = dict(config="edm-tiny-ddpmpp", solver="heun", backend="auto", checkpoint=None)
    base.update(kw)
    return argparse.Namespace(**base)


def test_sample_resolves_auto_for_edm_runs_on_the_cpu(cache):
    from duodiff_fast.eval.sample_cmd import resolve_backend_arg

    args = _args()
    assert resolve_backend_arg(args, torch.device("cpu")) == "reference"
    assert args.backend == "reference" and "auto: reference (on cpu" in args.backend_choice
    explicit = _args(backend="eager-bf16")
    assert resolve_backend_arg(explicit, torch.device("cpu")) == "eager-bf16"
    assert explicit.backend_choice == "requested: eager-bf16"


def test_sample_self_checks_the_edm_config_on_a_gpu_device(cache, monkeypatch):
    """On a CUDA device auto asks choose_edm_backend with the run's config (faked here: no GPU)."""
    from duodiff_fast.eval import sample_cmd

    seen = {}

    def fake(config, device, candidates=None, use_cache=True, name=None):
        seen.update(config=config, name=name)
        return ab.BackendChoice("torch.compile", "auto: torch.compile passed (fake)")

    monkeypatch.setattr(eab, "choose_edm_backend", fake)
    args = _args(config="multistage-tiny-ddpmpp")
    assert sample_cmd.resolve_backend_arg(args, torch.device("cuda", 0)) == "torch.compile"
    assert seen == {"config": TINY, "name": "multistage-tiny-ddpmpp"}
    assert args.backend_choice == "auto: torch.compile passed (fake)"


@pytest.mark.gpu
def test_auto_on_a_gpu_checks_the_unet_candidates(cache):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    choice = eab.choose_edm_backend(get_edm_config("multistage-cifar10-ddpmpp"), "cuda", name="multistage-cifar10-ddpmpp")
    assert choice.backend in eab.EDM_AUTO_ORDER and choice.backend != "reference", choice.reason
    assert "passed the EDM U-Net self-check" in choice.reason and torch.cuda.get_device_name() in choice.reason
    assert eab.choose_edm_backend(get_edm_config("multistage-cifar10-ddpmpp"), "cuda", name="multistage-cifar10-ddpmpp").cached
