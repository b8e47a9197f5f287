"""Run configuration: OmegaConf structured configs merged from YAML and key=value overrides.

The sections ``workload``, ``algo`` and ``comm`` each carry a ``name``; the dataclass that
validates the rest of the section is the ``Config`` of the module that name selects (see the
registries below). Unknown keys and bad values are rejected before any worker starts, with a
`ConfigError` whose message names the key.

Composition: ``algo`` may also be a list, ``algo: [lisa, diloco]`` in YAML (items are names or
mappings with a name: ``[lisa, {name: diloco, sync_every: 50}]``), ``algo=[lisa,diloco]`` on the
command line. ``algo: [hdet, diloco]`` is HDET over DiLoCo: one ``hdet`` section with ``outer: diloco`` and
the DiLoCo item's keys as ``outer_options`` (see `dtrain.algorithms.hdet_outer`). It is stored as one ``algo`` section (the algorithm LISA rides on) and a ``lisa``
section (LISA's options, ``name: lisa``; null when LISA is off), so ``algo.name=X``,
``algo.KEY=V`` and ``lisa.KEY=V`` overrides act on a composed run as on any other. A command-line
``algo=[...]`` replaces the YAML's composition. A ``lisa.KEY`` set while LISA is off is refused.

Keys that would do nothing are refused, naming the key and why: an algorithm module's
``REPLACES = {"optim": ("schedule", ...)}`` (or ``{"optim": {"schedule": "why"}}``; the reason of a
tuple is its ``REPLACES_WHY``) lists keys of other sections it makes meaningless, refused when set
to anything but their default; ``LOOP_SETS = {"lr": "optim.lr"}`` lists its `Config` fields that
the loop fills from its own keys (they are no keys of its section).
"""

from __future__ import annotations

import dataclasses
import importlib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from dtrain.hierarchy import Config as ParallelConfig

# name -> module with a `Config` dataclass (and `attach` / `build` / `connect`).
ALGORITHMS = {
    "none": "dtrain.algorithms.local_only",
    "ddp": "dtrain.algorithms.ddp",
    "diloco": "dtrain.algorithms.diloco",
    "noloco": "dtrain.algorithms.noloco",
    "streaming_diloco": "dtrain.algorithms.streaming",
    "streaming_noloco": "dtrain.algorithms.streaming_noloco",
    "hdet": "dtrain.algorithms.hdet",
    "spsa": "dtrain.algorithms.spsa",
}
WORKLOADS = {
    "char_lm": "dtrain.workloads.char_lm",
    "digits_cnn": "dtrain.workloads.digits_cnn",
    "ctr": "dtrain.workloads.ctr",
    "seq_rnn": "dtrain.workloads.seq_rnn",
    "hf_causal_lm": "dtrain.workloads.hf_causal_lm",  # needs the hf extra (transformers, tokenizers, datasets)
}
COMMS = {
    "torch": "dtrain.comm.torch_backend",
    "local": "dtrain.comm.local",
    "hivemind": "dtrain.comm.hivemind",
}
SECTIONS = {"workload": WORKLOADS, "algo": ALGORITHMS, "comm": COMMS}


def register_workload(name: str, module: str) -> None:
    """Make ``workload.name=NAME`` build from ``module`` (it defines ``Config`` and ``build``)."""
    _register(WORKLOADS, "workload", name, module)


def register_algorithm(name: str, module: str) -> None:
    """Make ``algo.name=NAME`` attach from ``module`` (it defines ``Config`` and ``attach``)."""
    _register(ALGORITHMS, "algo", name, module)


def register_backend(name: str, module: str) -> None:
    """Make ``comm.name=NAME`` connect through ``module`` (it defines ``Config`` and ``connect``)."""
    _register(COMMS, "comm", name, module)


def _register(registry: dict[str, str], section: str, name: str, module: str) -> None:
    if registry.get(name, module) != module:
        raise ValueError(f"{section}.name={name!r} is already registered for {registry[name]}; pick another name")
    registry[name] = module


class ConfigError(ValueError):
    """A user-fixable config problem; the message is one line and names the key."""


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | sgd | nadamw | prodigy | ... (see dtrain.optim.OPTIMIZERS)
    preset: str = ""  # a named hyperparameter point of the optimizer (e.g. algoperf)
    lr: float | None = None  # None: the optimizer's own default (dtrain's 3e-3 for adamw and sgd)
    weight_decay: float = 0.1
    # None: the optimizer's default (adamw: betas [0.9, 0.95], eps 1e-8; sgd: momentum 0.9). A key the
    # chosen optimizer does not take is refused, as is any kwargs.NAME its constructor lacks.
    betas: list[float] | None = None
    momentum: float | None = None
    eps: float | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)  # any other constructor argument, passed as is
    grad_clip: float = 1.0  # 0 disables clipping
    schedule: str = "cosine"  # cosine | constant | linear
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1


@dataclass
class RunConfig:
    workload: Any = None
    algo: Any = None
    comm: Any = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    lisa: Any = None  # LISA's options (dtrain.algorithms.lisa.Config) when algo lists lisa; None = off
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # hierarchical workers (dtrain.hierarchy)
    steps: int = 300
    seed: int = 0
    eval_every: int = 50
    log_every: int = 10
    ckpt_every: int = 100  # 0 disables checkpoints
    out_dir: str = "runs/default"
    resume: bool = False  # a torchrun restart (--max-restarts) resumes regardless
    if_exists: str = "refuse"  # a fresh run into an out_dir holding another run: refuse | move_aside (to OUT.prev-*)
    max_nonfinite: int = 10  # consecutive skipped steps before the run stops
    progress: bool = True
    plot: bool = True
    stop_at_target: bool = False
    threads: int = 0  # torch intra-op threads per worker; 0 = cores / local workers
    precision: str = "fp32"  # fp32 | bf16 | fp16 (CUDA): autocast forward + loss; weights stay fp32 (dtrain.step)
    grad_accum: int = 1  # micro-batches per optimizer step; workload.batch_size is split into this many
    compile: bool = False  # torch.compile the model's forward
    tensorboard: bool = False  # also write metrics.jsonl's scalars as TensorBoard events in OUT/tensorboard/
    device: str = "auto"  # auto (cuda when available, else cpu) | cpu | cuda: where the model and batches live (dtrain.device)


DEFAULTS = {"workload": "char_lm", "algo": "diloco", "comm": "torch"}


def section_module(section: str, name: str) -> ModuleType:
    registry = SECTIONS[section]
    if section == "workload" and name not in registry and ":" in name:  # the user's own model (module:factory)
        from dtrain.workloads.factory import FactoryError, factory_module

        try:
            return factory_module(name)
        except FactoryError as e:
            raise ConfigError(str(e)) from None
    if name not in registry:
        hint = " or module.path:factory for your own model" if section == "workload" else ""
        raise ConfigError(f"{section}.name={name!r} is not known; choose one of {sorted(registry)}{hint}")
    return importlib.import_module(registry[name])


def _one_line(e: Exception) -> str:
    key = getattr(e, "full_key", None)
    if isinstance(e, (ConfigKeyError, ConfigAttributeError)) and key:
        return f"unknown key {key}; remove it or fix its spelling (`dtrain config` prints every valid key)"
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if key and key not in msg:
        msg = f"{key}: {msg}"
    return msg


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> DictConfig:
    """Merge defaults, the YAML at ``path`` and ``key=value`` overrides; validate everything."""
    try:
        user = OmegaConf.load(path) if path else OmegaConf.create({})
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found; pass a YAML from configs/ or a path to one") from None
    except Exception as e:  # noqa: BLE001 - YAML parser errors are many types
        raise ConfigError(f"config file {path} is not valid YAML: {_one_line(e)}") from None
    if not isinstance(user, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. algo.sync_every=50)")
    # A command-line algo=[...] is the whole composition: applied before the other overrides,
    # whatever their order, so algo.KEY=V and lisa.KEY=V act on the algorithms it names.
    composition = [o for o in overrides or [] if o.split("=", 1)[0].strip() == "algo"]
    try:
        user = _compose(user)
        if composition:
            user = _recompose(user, _compose(OmegaConf.from_dotlist(composition[-1:])))
        cli = OmegaConf.from_dotlist([o for o in overrides or [] if o not in composition])
        merged_raw = OmegaConf.merge(user, cli)
    except OmegaConfBaseException as e:
        raise ConfigError(_one_line(e)) from None
    schema = OmegaConf.structured(RunConfig)
    names: dict[str, str] = {}
    for section, default in DEFAULTS.items():
        raw = merged_raw.get(section)
        if raw is not None and not isinstance(raw, DictConfig):
            raise ConfigError(f"{section} must be a mapping with a name (e.g. {section}.name={default})")
        names[section] = str((raw or {}).get("name", default))
        if section == "algo" and names[section] == "lisa":
            raise ConfigError(f"algo.name=lisa: {_LISA_RIDES}")
        schema[section] = _section_schema(section, section_module(section, names[section]), names[section], raw)
    if _lisa_on(merged_raw.get("lisa")):
        schema["lisa"] = _section_schema("lisa", importlib.import_module(LISA_MODULE), "lisa", merged_raw.lisa)
    try:
        cfg = OmegaConf.merge(schema, merged_raw)
    except OmegaConfBaseException as e:
        raise ConfigError(_one_line(e)) from None
    _refuse_replaced(cfg)
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def validate(cfg: DictConfig) -> None:
    """Cross-field checks, plus each section module's own ``validate(section_cfg)`` if it has one."""
    positive = {"steps": cfg.steps, "log_every": cfg.log_every, "eval_every": cfg.eval_every}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    if cfg.ckpt_every < 0:
        raise ConfigError(f"ckpt_every must be >= 0 (0 disables), got {cfg.ckpt_every}")
    if cfg.if_exists not in ("refuse", "move_aside"):
        raise ConfigError(f"if_exists must be refuse or move_aside, got {cfg.if_exists!r}")
    if cfg.max_nonfinite < 1:
        raise ConfigError(f"max_nonfinite must be >= 1, got {cfg.max_nonfinite}")
    o = cfg.optim
    if o.lr is not None and o.lr <= 0:
        raise ConfigError(f"optim.lr must be > 0, got {o.lr}")
    if o.weight_decay < 0:
        raise ConfigError(f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    if o.betas is not None and (len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas)):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {list(o.betas)}")
    from dtrain.optim import check_reaches_constructor

    try:
        check_reaches_constructor(o)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if o.schedule not in ("cosine", "constant", "linear"):
        raise ConfigError(f"optim.schedule must be cosine, constant or linear, got {o.schedule!r}")
    if o.warmup_steps < 0 or o.grad_clip < 0 or not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError("optim.warmup_steps and optim.grad_clip must be >= 0 and optim.min_lr_ratio in [0, 1]")
    if o.preset:
        from dtrain.optim import preset_of

        try:
            preset_of(o)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    from dtrain import device, step, tensorboard_log  # device; precision, grad_accum, compile; tensorboard

    try:
        device.check(cfg)
        step.check(cfg)
        tensorboard_log.check(cfg.tensorboard)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    from dtrain import hierarchy  # parallel.* and comm.inner_size together

    try:
        hierarchy.validate(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    sections = {s: section_module(s, cfg[s].name) for s in SECTIONS}
    if cfg.get("lisa") is not None:
        sections["lisa"] = importlib.import_module(LISA_MODULE)
    for section, module in sections.items():
        check = getattr(module, "validate", None)
        if check is not None:
            node = cfg[section]
            if getattr(module, "LOOP_SETS", None):  # its section lacks those fields: check a whole Config
                node = module.Config(**OmegaConf.to_container(node, resolve=True))
            try:
                check(node)
            except (ValueError, TypeError) as e:
                raise ConfigError(_one_line(e)) from None


# -- composition and refused keys (see the module docstring) -----------------------------------

LISA_MODULE = "dtrain.algorithms.lisa"
_LISA_RIDES = "LISA composes with the algorithm it rides on; use algo=[lisa,ddp] (YAML: algo: [lisa, ddp]; [lisa, none] on one worker)"


def _lisa_on(lisa: Any) -> bool:
    """Whether a raw ``lisa`` section turns LISA on; refuses one that would be ignored."""
    if lisa is None:
        return False
    if not isinstance(lisa, DictConfig):
        raise ConfigError("lisa must be a mapping of LISA's options (e.g. lisa.gamma=2) with LISA listed in algo=[lisa,...]")
    if "enabled" in lisa:
        raise ConfigError(f"lisa.enabled is no longer a key: {_LISA_RIDES}; remove lisa.enabled")
    if lisa.get("name", None) != "lisa":
        key = next((k for k in lisa if k != "name"), "name")
        raise ConfigError(f"lisa.{key} is set but LISA is off; {_LISA_RIDES}, or remove lisa.{key}")
    return True


def _compose(raw: DictConfig) -> DictConfig:
    """``raw`` with an ``algo`` name or list in the stored form: ``algo`` the algorithm LISA rides
    on, ``lisa`` LISA's options (``name: lisa``) or None. A mapping ``algo`` passes unchanged."""
    algo = raw.get("algo")
    if algo is None or isinstance(algo, DictConfig):
        return raw
    items = list(algo) if isinstance(algo, ListConfig) else [algo]
    sections: dict[str, Any] = {}
    for item in items:
        section = OmegaConf.create({"name": item}) if isinstance(item, str) else item
        if not isinstance(section, DictConfig) or not isinstance(section.get("name", None), str):
            raise ConfigError(f"algo list items are algorithm names or mappings with a name (e.g. algo=[lisa,diloco]), got {item!r}")
        if section.name in sections:
            raise ConfigError(f"algo lists {section.name} twice; name each algorithm once")
        sections[section.name] = section
    lisa = sections.pop("lisa", None)
    _fold_hdet_outer(sections)
    if len(sections) != 1:
        listed = ", ".join(sections) or "only lisa"
        raise ConfigError(f"algo lists {listed}: {_LISA_RIDES}" if lisa is not None or not sections else
                          f"algo lists {listed}; only LISA composes with another algorithm (algo=[lisa,{next(iter(sections))}]), "
                          "and HDET with one outer algorithm (algo=[hdet,diloco])")
    out = OmegaConf.merge(raw, {})
    out.algo = next(iter(sections.values()))
    given = raw.get("lisa")
    if lisa is None:
        if given is not None:  # options for a LISA this list leaves out
            _lisa_on(given)
            raise ConfigError(f"lisa is set but algo does not list lisa; {_LISA_RIDES}")
        out.lisa = None
    else:
        out.lisa = OmegaConf.merge(lisa, given) if isinstance(given, DictConfig) else lisa
    return out


def _fold_hdet_outer(sections: dict[str, Any]) -> None:
    """``algo=[hdet,diloco]`` (issue 19): HDET over an outer algorithm is one ``hdet`` section with
    ``outer: diloco`` and that item's other keys as ``outer_options`` (HDET builds the outer algorithm)."""
    if "hdet" not in sections or len(sections) != 2:
        return
    hdet = sections.pop("hdet")
    (name, outer), = sections.items()
    sections.clear()
    options = {k: v for k, v in outer.items() if k != "name"}
    sections["hdet"] = OmegaConf.merge(hdet, {"outer": name, "outer_options": options})


def _recompose(user: DictConfig, cli: DictConfig) -> DictConfig:
    """The YAML with the command line's composition: its algorithms, keeping the YAML's options of
    an algorithm it names again."""
    out = OmegaConf.merge(user, {})
    old = user.get("algo")
    same = isinstance(old, DictConfig) and old.get("name", DEFAULTS["algo"]) == cli.algo.name
    out.algo = OmegaConf.merge(old, cli.algo) if same else cli.algo
    old_lisa = user.get("lisa")
    out.lisa = None if cli.lisa is None else OmegaConf.merge(old_lisa, cli.lisa) if isinstance(old_lisa, DictConfig) else cli.lisa
    return out


def _section_schema(section: str, module: ModuleType, name: str, raw: Any) -> DictConfig:
    """The structured schema of ``section`` from ``module.Config``, less the fields the loop sets."""
    loop_sets: dict[str, str] = getattr(module, "LOOP_SETS", {})
    for key, source in loop_sets.items():
        if isinstance(raw, DictConfig) and key in raw:
            raise ConfigError(f"{section}.{key} is set by dtrain train from {source}; set {source} instead")
    made = module.Config(name=name)
    if not loop_sets:
        return OmegaConf.structured(made)
    hints = typing.get_type_hints(module.Config)
    kept = [(f.name, hints[f.name], field(default_factory=lambda v=getattr(made, f.name): v))
            for f in dataclasses.fields(made) if f.name not in loop_sets]
    return OmegaConf.structured(dataclasses.make_dataclass(type(made).__name__, kept)())


def _refuse_replaced(cfg: DictConfig) -> None:
    """Refuse a key another section's algorithm makes meaningless, when it is not at its default."""
    defaults = OmegaConf.structured(RunConfig)
    modules = [section_module("algo", cfg.algo.name)]
    if cfg.get("lisa") is not None:
        modules.append(importlib.import_module(LISA_MODULE))
    for module in modules:
        name = module.Config().name
        for section, keys in getattr(module, "REPLACES", {}).items():
            why = getattr(module, "REPLACES_WHY", f"{name} does not use it")
            reasons = keys if isinstance(keys, Mapping) else dict.fromkeys(keys, why)
            for key, reason in reasons.items():
                if cfg[section][key] != defaults[section][key]:
                    raise ConfigError(f"{section}.{key} is ignored under algo.name={name}: {reason}; remove it")


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)
