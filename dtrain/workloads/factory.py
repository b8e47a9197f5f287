"""Your own model in `dtrain train`: ``workload.name=module.path:factory``.

The factory is any callable that returns a `dtrain.workloads.base.Workload`. Its keyword
parameters are the workload section's keys (``workload.hidden=64``), so a key it does not take is
refused like any other unknown key, and a parameter without a default must be set. A parameter
named ``seed`` is not a key: it gets the run's ``seed``. The section becomes a module-like object
with the ``Config`` / ``validate`` / ``build`` every built-in workload module has, so the rest of
dtrain (config checks, run identity, checkpoints) treats it as one of them.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import types
import typing
from collections.abc import Callable
from types import ModuleType
from typing import Any

from dtrain.workloads.base import Workload

_PLAIN = (int, float, str, bool)  # types OmegaConf can check; anything else is taken as it comes (Any)
_made: dict[str, ModuleType] = {}  # one Config class per factory: OmegaConf compares schemas by class


class FactoryError(ValueError):
    """A ``workload.name=module:factory`` that cannot be used; the message says what to change."""


def is_factory(name: str) -> bool:
    return ":" in name


def factory_module(spec: str) -> ModuleType:
    """The module-like section for ``spec`` (``module.path:factory``)."""
    if spec not in _made:
        _made[spec] = _section(spec, _resolve(spec))
    return _made[spec]


def _resolve(spec: str) -> Callable[..., Any]:
    where = f"workload.name={spec}"
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr or ":" in attr:
        raise FactoryError(f"{where} must look like module.path:factory (e.g. workload.name=my_models:make)")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise FactoryError(f"{where}: no module {module_name} on the Python path; fix the module path "
                               "(as you would write it in `import ...`) or run from the directory that holds it") from None
        raise FactoryError(f"{where}: importing {module_name} failed: {e}") from None
    except Exception as e:  # noqa: BLE001 - the user's module may fail in any way while importing
        raise FactoryError(f"{where}: importing {module_name} failed: {type(e).__name__}: {e}") from None
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise FactoryError(f"{where}: {module_name} has no {attr}; name a function in it that returns a Workload")
        target = getattr(target, part)
    if not callable(target):
        raise FactoryError(f"{where}: {module_name}.{attr} is not callable; name a function (or class) that returns a Workload")
    return target


def _section(spec: str, factory: Callable[..., Any]) -> ModuleType:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin without a signature: it takes no keys
        params = {}
    try:
        hints = typing.get_type_hints(factory.__init__ if isinstance(factory, type) else factory)  # a class: its __init__
    except Exception:  # noqa: BLE001 - unresolvable annotations only cost the type check
        hints = {}
    fields: list[tuple[str, Any, Any]] = [("name", str, dataclasses.field(default=spec))]
    required: list[str] = []
    takes_seed = False
    for p in params.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
            continue  # only named keywords can be keys: unknown keys stay refused
        if p.name == "seed":
            takes_seed = True
            continue
        if p.name == "name":
            raise FactoryError(f"workload.name={spec}: the factory's parameter `name` clashes with workload.name; rename it")
        kind = _key_type(hints.get(p.name, Any))
        if p.default is p.empty:
            required.append(p.name)
            fields.append((p.name, kind, dataclasses.field(default=None)))
        else:
            fields.append((p.name, kind, dataclasses.field(default=p.default)
                           if not isinstance(p.default, (list, dict)) else
                           dataclasses.field(default_factory=lambda v=p.default: type(v)(v))))
    config = dataclasses.make_dataclass("Config", [(n, t if n not in required else typing.Optional[t], f) for n, t, f in fields])
    keys = [n for n, _, _ in fields if n != "name"]

    def validate(cfg: Any) -> None:
        for key in required:
            if cfg.get(key) is None:
                raise FactoryError(f"workload.{key} is required by {spec}; set workload.{key}=...")

    def build(cfg: Any, *, seed: int) -> Workload:
        kwargs = {k: _plain(cfg[k]) for k in keys}
        if takes_seed:
            kwargs["seed"] = seed
        try:
            workload = factory(**kwargs)
        except TypeError as e:  # a factory whose signature lies (a decorator, say): say which call failed
            raise FactoryError(f"workload.name={spec}: calling it with {sorted(kwargs)} failed: {e}") from None
        if not isinstance(workload, Workload):
            raise FactoryError(f"workload.name={spec} returned {type(workload).__name__}, not a "
                               "dtrain.workloads.base.Workload; return an instance of a Workload subclass")
        if not workload.name:
            workload.name = spec  # summary.json names the workload; an unnamed one goes by its factory
        return workload

    section = ModuleType(f"dtrain.workloads.factory[{spec}]")
    section.Config, section.validate, section.build = config, validate, build
    return section


def _key_type(hint: Any) -> Any:
    """The hint if OmegaConf can check it (int, float, str, bool, optional ones, lists and dicts), else Any."""
    if hint in _PLAIN:
        return hint
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (list, dict):
        return hint if all(a in _PLAIN for a in args) else origin
    if origin in (typing.Union, types.UnionType) and type(None) in args and len(args) == 2:
        inner = _key_type(next(a for a in args if a is not type(None)))
        return Any if inner is Any else typing.Optional[inner]
    return Any


def _plain(value: Any) -> Any:
    """OmegaConf containers as plain lists and dicts: a user's factory should not need OmegaConf."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value
