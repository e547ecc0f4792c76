"""Build a denoiser for a named method from checkpoints, through the methods' public constructors.

A *method spec* names one row of a paper table: ``base``, ``duodiff:<t_s>``, ``adadiff:<theta>``,
``ase:<D1..D6>`` or ``multistage``. :func:`build_method` turns a spec plus the user's checkpoint
paths (:class:`MethodWeights`) into the denoiser a solver calls, using only

    ModelDenoiser(model, schedule)
    DuoDiff(shallow, full, schedule, t_s)
    AdaDiff(AdaDiffUViT(backbone, uem_hidden), schedule, theta, mode=...)
    ASEDenoiser(model, schedule, get_dropping_schedule(name))
    MultistageDenoiser(load_multistage(path), schedule)

Checkpoint formats read here:
    * full / shallow / ASE: U-ViT state dicts (``models.load_weights``: official files, trainer
      checkpoints, safetensors). An ASE checkpoint is a U-ViT fine-tuned for its dropping schedule;
      without one, the base weights run with blocks dropped (the paper's "before fine-tuning").
      D1..D6 are the paper's kept counts for 6 out-blocks (DiT: D1, D3, D4, D6-DiT for 28 blocks);
      other depths get them rescaled (``DroppingSchedule.rescaled``), recorded in ``BuiltMethod.details``.
    * AdaDiff: the state dict of an :class:`~duodiff_fast.methods.AdaDiffUViT` (keys ``backbone.*``,
      ``heads.*``, ``uems.*``), bare or inside a trainer checkpoint (``model_state_dict`` /
      ``ema_state_dict``), which is what the trainer writes for an AdaDiff model. A checkpoint
      without ``backbone.*`` keys (heads and UEMs only, the backbone was frozen) takes its backbone
      from the full checkpoint. The UEM width (``uem_hidden``) is read from the weights.
    * multistage: a file written by :func:`~duodiff_fast.methods.save_multistage`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

__all__ = ["METHODS", "CACHING_METHODS", "MethodSpec", "MethodWeights", "BuiltMethod", "parse_method", "parse_method_grid",
           "parse_ase_checkpoints", "build_method"]

METHODS = ("base", "duodiff", "adadiff", "ase", "multistage", "deepcache", "fora", "tome", "l2c")
# Training-free methods on the full U-ViT (duodiff_fast.methods.caching / tome); each composes with
# DuoDiff's shallow phase (t_s > 0: the shallow backbone serves the noisiest steps uncached).
CACHING_METHODS = ("deepcache", "fora", "tome", "l2c")
# The grid value of each: deepcache:<interval>, fora:<interval>, tome:<ratio>, l2c:<router file>
CACHING_DEFAULT_VALUE = {"deepcache": "3", "fora": "2", "tome": "0.5"}
ASE_NAMES = ("D1", "D2", "D3", "D4", "D5", "D6")
PAPER_OUT_BLOCKS = 6  # the ASE paper's D1..D6 count kept blocks of U-ViT-S/4's 6 out-blocks


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """One method setting.

    Attributes:
        method: one of :data:`METHODS`.
        t_s: DuoDiff switch point on the 1000-step axis (duodiff only, > 0).
        theta: AdaDiff exit threshold in [0, 1] (adadiff only).
        ase_schedule: ASE dropping schedule name "D1".."D6" (ase only).
        adadiff_mode: "shrinking" (real early exit) or "simulated" (every layer, then pick).
        value: a caching method's main setting as text: deepcache/fora interval, tome ratio, l2c
            router file.
        options: further caching options as sorted (name, value) pairs: ``depth``, and ``steps``
            (the non-uniform schedule, with ``center`` and ``power``) (deepcache), ``layers`` (fora,
            "0/3/5"), ``stride``, ``max_level`` or ``schedule`` ("F4"/"R4"/"B4") (tome), ``threshold`` (l2c).
    """

    method: str
    t_s: int = 0
    theta: Optional[float] = None
    ase_schedule: Optional[str] = None
    adadiff_mode: str = "shrinking"
    value: Optional[str] = None
    options: Tuple[Tuple[str, object], ...] = ()

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.method in CACHING_METHODS:
            self._check_caching()
        elif self.value is not None or self.options:
            raise ValueError(f"method {self.method!r} takes no caching value/options")
        if self.method in CACHING_METHODS and self.t_s:
            if isinstance(self.t_s, bool) or not isinstance(self.t_s, int) or self.t_s < 0:
                raise ValueError(f"the DuoDiff switch point of {self.method} must be an int >= 0, got {self.t_s!r}")
        elif self.method == "duodiff":
            if isinstance(self.t_s, bool) or not isinstance(self.t_s, int) or self.t_s <= 0:
                raise ValueError(f"duodiff needs an integer t_s > 0 (steps on the 1000-step axis), got {self.t_s!r}")
        elif self.t_s:
            raise ValueError(f"t_s is a DuoDiff setting; method {self.method!r} takes none (got {self.t_s})")
        if self.method == "adadiff":
            th = self.theta
            if isinstance(th, bool) or not isinstance(th, (int, float)) or not math.isfinite(th) or not 0 <= th <= 1:
                raise ValueError(f"adadiff needs a threshold theta in [0, 1], got {th!r}")
            if self.adadiff_mode not in ("shrinking", "simulated"):
                raise ValueError(f"adadiff mode must be 'shrinking' or 'simulated', got {self.adadiff_mode!r}")
        elif self.theta is not None:
            raise ValueError(f"theta is an AdaDiff setting; method {self.method!r} takes none")
        if self.method == "ase":
            name = str(self.ase_schedule or "").upper().replace("-U-VIT", "")
            if name not in ASE_NAMES:
                raise ValueError(f"ase needs a dropping schedule among {', '.join(ASE_NAMES)}, got {self.ase_schedule!r}")
            object.__setattr__(self, "ase_schedule", name)
        elif self.ase_schedule is not None:
            raise ValueError(f"an ASE schedule is an ASE setting; method {self.method!r} takes none")

    def _check_caching(self) -> None:
        value = self.value if self.value is not None else CACHING_DEFAULT_VALUE.get(self.method)
        if value is None:
            raise ValueError("l2c needs its router file: l2c:<path> (a state dict of '<step>.prob' logits)")
        object.__setattr__(self, "value", str(value))
        object.__setattr__(self, "options", tuple(sorted(dict(self.options).items())))
        self.policy()  # bad values raise here, before any weights load

    def option(self, name: str, default=None):
        return dict(self.options).get(name, default)

    def policy(self, arch: str = "uvit"):
        """A fresh caching policy of this spec (caching methods only) for a model of type ``arch``
        ("uvit" or "dit": Learning-to-Cache routers of a DiT follow the published DiT schedule)."""
        from .caching import BlockCachePolicy, DeepCachePolicy, RouterPolicy, load_router
        from .tome import ToMePolicy

        def number(kind, text):
            try:
                return kind(text)
            except (TypeError, ValueError):
                raise ValueError(f"{self.method}: {text!r} is not a valid {kind.__name__}") from None

        if self.method == "deepcache":
            steps = self.option("steps")  # with it: the non-uniform full steps (center, power)
            return DeepCachePolicy(number(int, self.value), number(int, self.option("depth", 1)),
                                   None if steps is None else number(int, steps),
                                   number(float, self.option("center", 0.3)), number(float, self.option("power", 1.4)))
        if self.method == "fora":
            layers = self.option("layers")
            if layers is not None:
                layers = [number(int, v) for v in str(layers).split("/") if v.strip()]
            return BlockCachePolicy(number(int, self.value), layers)
        if self.method == "tome":
            level = self.option("max_level")
            return ToMePolicy(number(float, self.value), number(int, self.option("stride", 2)),
                              max_level=None if level is None else number(int, level),
                              schedule=self.option("schedule"))
        if self.method == "l2c":
            import os

            if not os.path.isfile(self.value):
                raise ValueError(f"l2c: router file not found: {self.value}")
            router_cls = RouterPolicy
            if arch == "dit":
                from .caching_dit import DiTRouterPolicy as router_cls
            return router_cls(load_router(self.value), number(float, self.option("threshold", 0.1)), self.value)
        raise ValueError(f"{self.method} is not a caching method")

    @property
    def label(self) -> str:
        """Short row label: ``base``, ``duodiff t_s=300``, ``adadiff theta=0.05``, ``ase D3``, ``multistage``,
        ``fora 2``, ``tome 0.5``, ``l2c router.pth``, with `` +duodiff t_s=300`` when composed."""
        if self.method in CACHING_METHODS:
            import os

            text = os.path.basename(self.value) if self.method == "l2c" else self.value
            extra = "".join(f" {k}={v}" for k, v in self.options)
            return f"{self.method} {text}{extra}" + (f" +duodiff t_s={self.t_s}" if self.t_s else "")
        if self.method == "duodiff":
            return f"duodiff t_s={self.t_s}"
        if self.method == "adadiff":
            return f"adadiff theta={self.theta:g}" + ("" if self.adadiff_mode == "shrinking" else " (simulated)")
        if self.method == "ase":
            return f"ase {self.ase_schedule}"
        return self.method

    @property
    def slug(self) -> str:
        """File-name-safe form of :attr:`label` (``duodiff-ts300``, ``adadiff-theta0.05``, ``ase-D3``)."""
        if self.method in CACHING_METHODS:
            return "".join(c if c.isalnum() or c in ".=" else "-" for c in self.label)
        if self.method == "duodiff":
            return f"duodiff-ts{self.t_s}"
        if self.method == "adadiff":
            return f"adadiff-theta{self.theta:g}" + ("" if self.adadiff_mode == "shrinking" else "-simulated")
        if self.method == "ase":
            return f"ase-{self.ase_schedule}"
        return self.method

    def settings(self) -> Dict[str, object]:
        """The settings that matter for this method (for manifests and tables)."""
        out: Dict[str, object] = {"method": self.method}
        if self.method == "duodiff":
            out["t_s"] = self.t_s
        if self.method == "adadiff":
            out.update(theta=self.theta, adadiff_mode=self.adadiff_mode)
        if self.method == "ase":
            out["ase_schedule"] = self.ase_schedule
        if self.method in CACHING_METHODS:
            out.update(value=self.value, **dict(self.options), t_s=self.t_s)
        return out


def parse_method(text: str, adadiff_mode: str = "shrinking",
                 caching_options: Optional[Mapping[str, Mapping[str, object]]] = None) -> List[MethodSpec]:
    """Specs from one grid entry: ``base``, ``duodiff:300``, ``adadiff:0.05``, ``ase:D3``, ``ase:all``
    (D1..D6), ``multistage``. Values may be joined with ``/``: ``duodiff:300/400/500``.

    Caching methods take one value and an optional DuoDiff switch point after ``@``: ``deepcache``,
    ``deepcache:3`` (interval), ``fora:2@300`` (interval 2 after 300 shallow steps), ``tome:0.5``
    (ratio), ``l2c:routers.pth`` (router file). ``caching_options``: per method, its further options
    (e.g. {"deepcache": {"depth": 2}}).
    """
    name, _, values = text.strip().partition(":")
    name = name.strip().lower()
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r} in {text!r}; choose one of {', '.join(METHODS)}")
    if name in CACHING_METHODS:
        value, at, t_s = values.strip().rpartition("@") if "@" in values else (values.strip(), "", "")
        try:
            t_s = int(t_s) if at else 0
        except ValueError:
            raise ValueError(f"bad DuoDiff switch point {t_s!r} in {text!r} (write {name}:<value>@<t_s>)") from None
        opts = tuple(dict((caching_options or {}).get(name, {})).items())
        return [MethodSpec(name, t_s=t_s, value=value or None, options=opts)]
    vals = [v.strip() for v in values.split("/") if v.strip()]
    if name in ("base", "multistage"):
        if vals:
            raise ValueError(f"method {name!r} takes no value, got {text!r}")
        return [MethodSpec(name)]
    if not vals:
        example = {"duodiff": "duodiff:300", "adadiff": "adadiff:0.05", "ase": "ase:D3"}[name]
        raise ValueError(f"method {name!r} needs a value, e.g. {example!r}; got {text!r}")
    out = []
    for v in vals:
        if name == "duodiff":
            try:
                out.append(MethodSpec("duodiff", t_s=int(v)))
            except ValueError as e:
                raise ValueError(f"bad DuoDiff t_s {v!r} in {text!r}: {e}") from None
        elif name == "adadiff":
            try:
                theta = float(v)
            except ValueError:
                raise ValueError(f"bad AdaDiff theta {v!r} in {text!r}: not a number") from None
            out.append(MethodSpec("adadiff", theta=theta, adadiff_mode=adadiff_mode))
        else:
            names = ASE_NAMES if v.lower() == "all" else [v]
            out.extend(MethodSpec("ase", ase_schedule=n) for n in names)
    return out


def parse_method_grid(text: str, adadiff_mode: str = "shrinking",
                      caching_options: Optional[Mapping[str, Mapping[str, object]]] = None) -> List[MethodSpec]:
    """A comma-separated grid, e.g. ``"base,duodiff:300/400,adadiff:0.05,ase:all,multistage"``.

    Duplicates are an error (two rows with the same label would be ambiguous in a table).
    """
    specs: List[MethodSpec] = []
    for part in text.split(","):
        if part.strip():
            specs.extend(parse_method(part, adadiff_mode, caching_options))
    if not specs:
        raise ValueError(f"the method grid is empty: {text!r}")
    labels = [s.label for s in specs]
    dups = sorted({x for x in labels if labels.count(x) > 1})
    if dups:
        raise ValueError(f"the method grid repeats {dups}")
    return specs


@dataclasses.dataclass
class MethodWeights:
    """Checkpoint paths for the methods (None where not used).

    Attributes:
        full: the full U-ViT (base, DuoDiff's full backbone, AdaDiff's backbone when the AdaDiff
            checkpoint holds heads only, ASE without fine-tuned weights).
        shallow: DuoDiff's shallow backbone (config ``<config>-shallow``).
        adadiff: an AdaDiffUViT state dict (see the module docstring).
        ase: fine-tuned U-ViTs per ASE schedule, {"D3": path} ("*" applies to every schedule).
        multistage: a :func:`save_multistage` file.
        use_ema: read ``ema_state_dict`` of trainer checkpoints (U-ViT and AdaDiff files).
        random: random weights where a path is missing (smoke tests and timing only).
        seed: seed of the random weights.
    """

    full: Optional[str] = None
    shallow: Optional[str] = None
    adadiff: Optional[str] = None
    ase: Mapping[str, str] = dataclasses.field(default_factory=dict)
    multistage: Optional[str] = None
    use_ema: bool = False
    random: bool = False
    seed: int = 0

    def ase_path(self, name: str) -> Optional[str]:
        return self.ase.get(name) or self.ase.get("*")


@dataclasses.dataclass
class BuiltMethod:
    """What :func:`build_method` returns.

    Attributes:
        spec: the method spec.
        denoiser: ``eps = denoiser(x, t, y)`` for the solvers.
        model: the network whose interface (in_chans, img_size, num_classes, is_conditional) the
            samples have.
        checkpoints: {role: path} of every file read ("random" roles are absent).
        details: settings resolved while building (e.g. ASE's kept out-blocks per fifth of t).
    """

    spec: MethodSpec
    denoiser: object
    model: torch.nn.Module
    checkpoints: Dict[str, str]
    details: Dict[str, object] = dataclasses.field(default_factory=dict)

    @property
    def null_class(self) -> int:
        """The class id classifier-free guidance uses as "no label" (the last id)."""
        if not getattr(self.model, "is_conditional", False):
            raise ValueError(f"{self.spec.label}: classifier-free guidance needs a class-conditional model")
        return int(self.model.num_classes) - 1


def _missing(what: str, flag: str) -> ValueError:
    return ValueError(f"no weights for {what}: pass {flag} (or --random-weights for a smoke test)")


def _config_name(config) -> str:
    """How messages name a config (a registered name, a JSON path or a ModelSpec)."""
    return getattr(config, "name", None) or str(config)


def _uvit(config, path: Optional[str], weights: MethodWeights, what: str, flag: str):
    """A U-ViT of ``config`` (a name, JSON path or ModelSpec): loaded from ``path`` (a file, a
    checkpoint folder or a run folder; a config the file records must agree), or random (seeded)
    when allowed."""
    from ..models import create_model, load_weights

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(weights.seed)
        model = create_model(config)
    if path:
        load_weights(model, path, use_ema=weights.use_ema)
    elif not weights.random:
        raise _missing(what, flag)
    return model


def _adadiff_model(config, weights: MethodWeights, checkpoints: Dict[str, str]):
    """An AdaDiffUViT from an AdaDiff checkpoint (backbone from it or from the full checkpoint)."""
    from ..methods import AdaDiffUViT
    from ..models.checkpoint import CheckpointError, extract_state_dict, key_mismatch_lines, read_checkpoint_file

    if not weights.adadiff:
        if not weights.random:
            raise _missing("AdaDiff (heads and uncertainty modules)", "--adadiff-checkpoint")
        backbone = _uvit(config, weights.full, weights, "the AdaDiff backbone", "--checkpoint")
        if weights.full:
            checkpoints["full"] = weights.full
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(weights.seed)
            return AdaDiffUViT(backbone)
    obj = read_checkpoint_file(weights.adadiff)
    sd = extract_state_dict(obj, use_ema=weights.use_ema)
    checkpoints["adadiff"] = weights.adadiff
    if not any(k.startswith("uems.") for k in sd):
        # Not this package's layout: the DuoDiff authors' or AdaDiff's own early-exit files (mapped
        # onto AdaDiffUViT), else a CheckpointError that lists the key roots found.
        from ..models import get_spec
        from .adadiff_checkpoints import load_adadiff

        # The head count is in no weight shape: the sampling config's, unless the file's args say.
        heads = get_spec(config).kwargs.get("num_heads")
        if isinstance(obj.get("args"), Mapping) and obj["args"].get("num_heads"):
            heads = None
        return load_adadiff(weights.adadiff, num_heads=heads, use_ema=weights.use_ema)
    hidden = int(sd["uems.0.mlp.0.weight"].shape[0]) if "uems.0.mlp.2.weight" in sd else 0
    has_backbone = any(k.startswith("backbone.") for k in sd)
    if has_backbone:
        from ..models import create_model

        backbone = create_model(config)
    else:  # heads and UEMs only: the frozen backbone comes from the full checkpoint
        backbone = _uvit(config, weights.full, weights, "the AdaDiff backbone (the AdaDiff checkpoint has none)",
                         "--checkpoint")
        if weights.full:
            checkpoints["full"] = weights.full
    model = AdaDiffUViT(backbone, uem_hidden=hidden, init_heads_from_final=False)
    if not has_backbone:
        sd = dict(sd, **{f"backbone.{k}": v for k, v in backbone.state_dict().items()})
    lines = key_mismatch_lines(model, sd, what=f"AdaDiff checkpoint {weights.adadiff}")
    if lines:
        raise CheckpointError("\n".join(lines + [f"  (built for config {_config_name(config)!r}, uem_hidden={hidden})"]))
    model.load_state_dict(sd, strict=True)
    return model


def build_method(
    spec: MethodSpec,
    config,
    weights: MethodWeights,
    schedule,
    device: torch.device,
    backend: str = "reference",
) -> BuiltMethod:
    """The denoiser of ``spec`` for model config ``config`` (a registered name, a JSON model config
    path or a :class:`~duodiff_fast.models.ModelSpec`), on ``device`` with ``backend``.

    Raises ValueError (or CheckpointError, a ValueError) naming the missing or mismatched file
    before any network runs.
    """
    from ..backends import check_backend, prepare_model
    from ..methods import AdaDiff, ASEDenoiser, DuoDiff, ModelDenoiser, MultistageDenoiser
    from ..methods import load_multistage
    from ..models import shallow_spec
    from .ase import dropping_for

    check_backend(backend)
    name = _config_name(config)
    device = torch.device(device)
    checkpoints: Dict[str, str] = {}

    def prep(m):
        return prepare_model(m.to(device), backend)

    if spec.method in CACHING_METHODS:
        return _build_caching(spec, config, weights, schedule, backend, prep)
    if spec.method in ("base", "duodiff"):
        full = prep(_uvit(config, weights.full, weights, f"the full backbone ({name})", "--checkpoint"))
        if weights.full:
            checkpoints["full"] = weights.full
        if spec.method == "base":
            return BuiltMethod(spec, ModelDenoiser(full, schedule), full, checkpoints)
        twin = shallow_spec(config)
        shallow = prep(_uvit(twin, weights.shallow, weights,
                             f"DuoDiff's shallow backbone ({twin.name})", "--shallow-checkpoint"))
        if weights.shallow:
            checkpoints["shallow"] = weights.shallow
        return BuiltMethod(spec, DuoDiff(shallow, full, schedule, spec.t_s), full, checkpoints)
    if spec.method == "adadiff":
        model = prep(_adadiff_model(config, weights, checkpoints))
        return BuiltMethod(spec, AdaDiff(model, schedule, spec.theta, mode=spec.adadiff_mode), model, checkpoints)
    if spec.method == "ase":
        path = weights.ase_path(spec.ase_schedule) or weights.full
        role = "ase" if weights.ase_path(spec.ase_schedule) else "full"
        model = prep(_uvit(config, path, weights, f"ASE {spec.ase_schedule} ({name})",
                           "--ase-checkpoint or --checkpoint"))
        if path:
            checkpoints[role] = path
        # The paper's D1..D6 are written for U-ViT-S/4's 6 out-blocks and D1/D3/D4/D6-DiT for DiT-XL/2's
        # 28 blocks: other depths get them rescaled.
        dropping = dropping_for(model, spec.ase_schedule)
        details = {"ase_kept": list(dropping.kept), "ase_boundaries": list(dropping.boundaries)}
        return BuiltMethod(spec, ASEDenoiser(model, schedule, dropping), model, checkpoints, details)
    # multistage
    from ..models import get_spec

    if get_spec(config).arch != "uvit":
        raise ValueError(f"multistage decoders are implemented for U-ViT configs; {config} is a {get_spec(config).arch}")
    if weights.multistage:
        ms = load_multistage(weights.multistage)
        checkpoints["multistage"] = weights.multistage
    elif weights.random:
        from ..methods import MultistageUViT

        full = _uvit(config, weights.full, weights, f"the full backbone ({name})", "--checkpoint")
        if weights.full:
            checkpoints["full"] = weights.full
        ms = MultistageUViT.from_uvit(full)
    else:
        raise _missing("the multistage model", "--multistage-checkpoint")
    model = prep(ms)
    return BuiltMethod(spec, MultistageDenoiser(model, schedule), model, checkpoints)


def _build_caching(spec: MethodSpec, config: str, weights: MethodWeights, schedule, backend: str, prep) -> BuiltMethod:
    """A caching method (optionally after DuoDiff's shallow phase) on the full U-ViT or DiT."""
    from ..models import get_spec, shallow_spec
    from .caching import CACHING_BACKENDS, CachingDenoiser

    arch = get_spec(config).arch
    if spec.method == "deepcache" and arch == "dit":
        raise ValueError(f"deepcache caches the features behind U-ViT's long skips; {_config_name(config)} is a DiT "
                         "(no long skips): use fora, l2c or tome")
    if backend not in CACHING_BACKENDS:
        raise ValueError(f"{spec.method} runs the model's modules layer by layer and cannot use backend {backend!r}; "
                         f"choose one of {', '.join(CACHING_BACKENDS)}")
    checkpoints: Dict[str, str] = {}
    full = prep(_uvit(config, weights.full, weights, f"the full backbone ({config})", "--checkpoint"))
    if weights.full:
        checkpoints["full"] = weights.full
    shallow = None
    if spec.t_s:
        twin = shallow_spec(config)  # config may be a name, a JSON path or a ModelSpec
        shallow = prep(_uvit(twin, weights.shallow, weights, f"DuoDiff's shallow backbone ({twin.name})",
                             "--shallow-checkpoint"))
        if weights.shallow:
            checkpoints["shallow"] = weights.shallow
    policy = spec.policy(arch)
    if spec.method == "l2c":
        checkpoints["router"] = spec.value
    denoiser = CachingDenoiser(full, schedule, policy, shallow=shallow, t_s=spec.t_s)
    return BuiltMethod(spec, denoiser, full, checkpoints, dict(policy.details()))


def parse_ase_checkpoints(items: Optional[Sequence[str]]) -> Dict[str, str]:
    """``["path"]`` (every schedule) or ``["D1=a.pth", "D3=b.pth"]`` -> {"*" or name: path}."""
    out: Dict[str, str] = {}
    for item in items or ():
        name, sep, path = item.partition("=")
        if not sep:
            name, path = "*", item
        else:
            name = name.strip().upper()
            if name not in ASE_NAMES:
                raise ValueError(f"--ase-checkpoint {item!r}: {name!r} is not one of {', '.join(ASE_NAMES)}")
        if name in out:
            raise ValueError(f"--ase-checkpoint given twice for {name}")
        out[name] = path
    return out
