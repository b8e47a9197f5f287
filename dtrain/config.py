"""Run configuration: OmegaConf structured configs merged from YAML and key=value overrides.

The sections ``workload``, ``algo`` and ``comm`` each carry a ``name``; the dataclass that
validates the rest of the section is the ``Config`` of the module that name selects (see the
registries below). Unknown keys and bad values are rejected before any worker starts, with a
`ConfigError` whose message names the key.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

# name -> module with a `Config` dataclass (and `attach` / `build` / `connect`).
ALGORITHMS = {
    "none": "dtrain.algorithms.local_only",
    "ddp": "dtrain.algorithms.ddp",
    "diloco": "dtrain.algorithms.diloco",
    "noloco": "dtrain.algorithms.noloco",
    "hdet": "dtrain.algorithms.hdet",
    "spsa": "dtrain.algorithms.spsa",
}
WORKLOADS = {
    "char_lm": "dtrain.workloads.char_lm",
    "digits_cnn": "dtrain.workloads.digits_cnn",
    "ctr": "dtrain.workloads.ctr",
    "seq_rnn": "dtrain.workloads.seq_rnn",
}
COMMS = {
    "torch": "dtrain.comm.torch_backend",
    "local": "dtrain.comm.local",
    "hivemind": "dtrain.comm.hivemind",
}
SECTIONS = {"workload": WORKLOADS, "algo": ALGORITHMS, "comm": COMMS}


class ConfigError(ValueError):
    """A user-fixable config problem; the message is one line and names the key."""


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | sgd | nadamw | prodigy | ... (see dtrain.optim.OPTIMIZERS)
    preset: str = ""  # a named hyperparameter point of the optimizer (e.g. algoperf)
    lr: float | None = None  # None: the optimizer's own default (3e-3 for adamw and sgd)
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    momentum: float = 0.9  # sgd only
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    schedule: str = "cosine"  # cosine | constant | linear
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1


@dataclass
class LisaConfig:
    enabled: bool = False
    blocks: str = "blocks"  # attribute path of the nn.ModuleList of middle blocks
    gamma: int = 2
    interval: int = 20
    probabilities: list[float] | None = None
    offload_state: bool = False


@dataclass
class RunConfig:
    workload: Any = None
    algo: Any = None
    comm: Any = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    lisa: LisaConfig = field(default_factory=LisaConfig)
    steps: int = 300
    seed: int = 0
    eval_every: int = 50
    log_every: int = 10
    ckpt_every: int = 100  # 0 disables checkpoints
    out_dir: str = "runs/default"
    resume: bool = False
    max_nonfinite: int = 10  # consecutive skipped steps before the run stops
    progress: bool = True
    plot: bool = True
    stop_at_target: bool = False
    threads: int = 0  # torch intra-op threads per worker; 0 = cores / local workers


DEFAULTS = {"workload": "char_lm", "algo": "diloco", "comm": "torch"}


def section_module(section: str, name: str) -> ModuleType:
    registry = SECTIONS[section]
    if name not in registry:
        raise ConfigError(f"{section}.name={name!r} is not known; choose one of {sorted(registry)}")
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
    try:
        cli = OmegaConf.from_dotlist(list(overrides or []))
        merged_raw = OmegaConf.merge(user, cli)
    except OmegaConfBaseException as e:
        raise ConfigError(_one_line(e)) from None
    schema = OmegaConf.structured(RunConfig)
    for section, default in DEFAULTS.items():
        raw = merged_raw.get(section)
        if raw is not None and not isinstance(raw, DictConfig):
            raise ConfigError(f"{section} must be a mapping with a name (e.g. {section}.name={default})")
        name = (raw or {}).get("name", default)
        module = section_module(section, str(name))
        schema[section] = OmegaConf.structured(module.Config(name=str(name)))
    try:
        cfg = OmegaConf.merge(schema, merged_raw)
    except OmegaConfBaseException as e:
        raise ConfigError(_one_line(e)) from None
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
    if cfg.max_nonfinite < 1:
        raise ConfigError(f"max_nonfinite must be >= 1, got {cfg.max_nonfinite}")
    o = cfg.optim
    if o.lr is not None and o.lr <= 0:
        raise ConfigError(f"optim.lr must be > 0, got {o.lr}")
    if o.weight_decay < 0:
        raise ConfigError(f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {list(o.betas)}")
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
    if cfg.lisa.enabled and (cfg.lisa.gamma < 1 or cfg.lisa.interval < 1):
        raise ConfigError("lisa.gamma and lisa.interval must be >= 1")
    for section in SECTIONS:
        module = section_module(section, cfg[section].name)
        check = getattr(module, "validate", None)
        if check is not None:
            try:
                check(cfg[section])
            except (ValueError, TypeError) as e:
                raise ConfigError(_one_line(e)) from None


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)
