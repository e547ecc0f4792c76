"""No host synchronisation per sampling step: every method is sampled on the CPU while a torch
function mode counts the reads of device values (``item``, ``tolist``, ``nonzero``, ``bool()``,
``int()``, ``float()``, ...) inside the denoiser calls. On a GPU each of them waits for the device.

Which tensors are "on the device" is tracked, since on a CPU every tensor lives on the host: the
models' parameters, the tensors the solver hands the denoiser (sample, time vector, labels), and
everything computed from them. Tensors the host builds from host values (a route probe) are not.
The per-step count is the difference between a 4-step and a 2-step run, divided by 2 (one-off
checks before the loop cancel).
"""
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from duodiff_fast.methods import (AdaDiff, AdaDiffUViT, ASEDenoiser, DuoDiff, ModelDenoiser, MultistageDenoiser,
                                  MultistageUViT)
from duodiff_fast.methods.adadiff import set_synthetic_exit_profile
from duodiff_fast.models import create_model, get_config
from duodiff_fast.samplers import ClassifierFreeGuidance, sample
from duodiff_fast.schedules import get_schedule
from duodiff_fast.validation import inputs_validated

# Reads of a device value (each one a device-to-host copy and a wait on a GPU).
READS = {"item", "tolist", "nonzero", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy",
         "masked_select", "unique", "active_indices", "equal", "allclose"}
_MARK = "_on_device_in_test"


def _on_device(obj) -> bool:
    return isinstance(obj, torch.Tensor) and getattr(obj, _MARK, False)


def _mark(obj) -> None:
    for leaf in tree_flatten(obj)[0]:
        if isinstance(leaf, torch.Tensor):
            try:
                setattr(leaf, _MARK, True)
            except (AttributeError, RuntimeError):  # a tensor type without a __dict__
                pass


class DeviceReads(TorchFunctionMode):
    """Counts reads of device values (see the module docstring); ``sites`` says where."""

    def __init__(self):
        super().__init__()
        self.sites = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "") or str(func)
        device_input = any(_on_device(a) for a in tree_flatten((args, kwargs))[0])
        if device_input and name in READS:
            self.sites.append(f"{name} at {_caller()}")
        out = func(*args, **kwargs)
        if device_input:
            _mark(out)
        return out

    def watch(self, denoiser):
        """``denoiser`` whose call inputs count as device values."""
        return _Watched(denoiser, self)


class _Watched:
    def __init__(self, inner, mode):
        self.inner, self.mode = inner, mode

    def __getattr__(self, name):  # check, host_route, ... of the wrapped denoiser
        return getattr(self.inner, name)

    def __call__(self, x, t, y=None):
        _mark((x, t, y))
        return self.inner(x, t, y)


def _caller() -> str:
    import traceback

    frames = [f for f in traceback.extract_stack() if "duodiff_fast" in f.filename]
    return f"{frames[-1].filename.split('duodiff_fast/')[-1]}:{frames[-1].lineno}" if frames else "?"


def reads_per_step(denoiser, models, y=None, solver="ddim", batch=4, schedule="vp-linear") -> tuple:
    """(device reads per solver step inside the denoiser calls, where the 4-step run read)."""
    for m in models:
        _mark(list(m.parameters()) + list(m.buffers()))
    counts = {}
    for steps in (2, 4):
        with DeviceReads() as mode:
            sample(mode.watch(denoiser), get_schedule(schedule), (batch, 4, 8, 8), solver=solver,
                   num_steps=steps, y=None if y is None else y.clone(), base_seed=0, progress=False)
        counts[steps] = mode.sites
    return (len(counts[4]) - len(counts[2])) / 2, counts[4]


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    full = create_model("tiny-latent").eval()
    shallow = create_model("tiny-latent", depth=0).eval()
    torch.manual_seed(1)
    ms = MultistageUViT((0.4, 0.7), stage_widths=[64, 32, 48], **dict(get_config("tiny-latent"))).eval()
    ada = AdaDiffUViT(full).eval()
    set_synthetic_exit_profile(ada, get_schedule("vp-linear"), t_switch=0.6, exit_layer=2, theta=0.07,
                               sample_spread=0.0)
    return dict(full=full, shallow=shallow, multistage=ms, adadiff=ada)


def _routed(name, models):
    schedule = get_schedule("vp-linear")
    if name == "base":
        return ModelDenoiser(models["full"], schedule), [models["full"]]
    if name == "duodiff":
        return DuoDiff(models["shallow"], models["full"], schedule, t_s=500), [models["shallow"], models["full"]]
    if name == "ase":
        return ASEDenoiser(models["full"], schedule, [2, 1, 0]), [models["full"]]
    if name == "multistage":
        return MultistageDenoiser(models["multistage"], schedule), [models["multistage"]]
    raise AssertionError(name)


Y = torch.tensor([1, 5, 0, 9])


@pytest.mark.parametrize("solver", ["ddim", "dpm_solver"])
@pytest.mark.parametrize("name", ["base", "duodiff", "ase", "multistage"])
@pytest.mark.parametrize("guided", [False, True])
def test_routed_methods_read_nothing_per_step(models, name, guided, solver, one_thread):
    den, mods = _routed(name, models)
    if guided:
        den = ClassifierFreeGuidance(den, 1.5, models["full"].null_class)
    per_step, sites = reads_per_step(den, mods, Y, solver)
    assert per_step == 0, f"{name} (guided={guided}, {solver}) reads the device {per_step} times a step: {sites}"


@pytest.mark.parametrize("mode,budget", [("simulated", 0), ("shrinking", "layers"), ("bucketed", "layers")])
def test_adadiff_reads_at_most_once_per_layer_with_exits(models, mode, budget, one_thread):
    ada = models["adadiff"]
    layers_with_exits = len(ada.uems)
    limit = layers_with_exits if budget == "layers" else budget
    den = AdaDiff(ada, get_schedule("vp-linear"), 0.07, mode=mode)
    per_step, sites = reads_per_step(den, [ada], Y)
    assert per_step <= limit, f"AdaDiff {mode}: {per_step} device reads a step > {limit}: {sites}"


def test_the_counter_sees_reads(models, one_thread):
    # Per-row device times (no host time to route from): DuoDiff must split the rows on the device.
    den, mods = _routed("duodiff", models)
    for m in mods:
        _mark(list(m.parameters()))
    x = torch.randn(4, 4, 8, 8)
    t = torch.tensor([0.9, 0.2, 0.5, 0.95])
    with DeviceReads() as mode, torch.no_grad(), inputs_validated():
        mode.watch(den)(x, t, Y.clone())
    assert any(s.startswith(("nonzero", "active_indices")) for s in mode.sites), mode.sites
    # ... and a shrinking AdaDiff call really reads (once per layer with exits, not more).
    ada = models["adadiff"]
    _mark(list(ada.parameters()))
    with DeviceReads() as mode, torch.no_grad(), inputs_validated():
        mode.watch(AdaDiff(ada, get_schedule("vp-linear"), 0.07))(x, t, Y.clone())
    assert 1 <= len(mode.sites) <= len(ada.uems), mode.sites


@pytest.mark.parametrize("policy,arch", [("deepcache", "uvit"), ("fora", "uvit"), ("tome", "uvit"),
                                         ("fora", "dit"), ("tome", "dit")])  # DeepCache needs U-ViT's skips
def test_caching_and_merging_read_nothing_per_step(policy, arch, one_thread):
    """DeepCache, FORA and ToMe decide everything on the host: their steps read no device value
    (ToMe draws its destinations on the host and takes the sources as their complement there)."""
    from duodiff_fast.methods.caching import BlockCachePolicy, CachingDenoiser, DeepCachePolicy
    from duodiff_fast.methods.tome import ToMePolicy

    torch.manual_seed(0)
    model = create_model("tiny-latent" if arch == "uvit" else "dit-tiny").eval()
    make = {"deepcache": lambda: DeepCachePolicy(2), "fora": lambda: BlockCachePolicy(2),
            "tome": lambda: ToMePolicy(0.5, 2, seed=0)}[policy]
    schedule = "vp-linear" if arch == "uvit" else "linear"  # DiT's improved-DDPM needs betas
    den = CachingDenoiser(model, get_schedule(schedule), make())
    per_step, sites = reads_per_step(den, [model], Y, schedule=schedule)
    assert per_step == 0, f"{policy} on {arch} reads the device {per_step} times a step: {sites}"
