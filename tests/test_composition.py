"""Composition and the contract for LISA and SPSA: library defaults are dtrain train's, LISA rides on
every other algorithm (frozen blocks hold no outer state under DiLoCo and NoLoCo), and keys that
would do nothing are refused with one line."""

from __future__ import annotations

import dataclasses
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from dtrain import config
from dtrain.algorithms import diloco, lisa, noloco, spsa
from dtrain.algorithms.base import AttachContext
from dtrain.comm.local import LocalGroup, run_local
from dtrain.config import ConfigError
from dtrain.train import Parts, run

REPO = Path(__file__).resolve().parents[1]
TINY_LM = ["workload.n_layer=4", "workload.d_model=16", "workload.n_head=2", "workload.seq_len=16", "workload.batch_size=4",
           "workload.eval_batches=1", "workload.eval_batch_size=4", "progress=false", "plot=false", "threads=1",
           "ckpt_every=0", "eval_every=100"]


class Blocks(nn.Module):
    """A toy regression model with a ModuleList of residual blocks (what LISA samples from)."""

    def __init__(self, seed: int, n_blocks: int = 4, width: int = 8) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(6, width), nn.Linear(width, 1)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(n_blocks))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        for block in self.blocks:
            h = h + torch.tanh(block(h))
        return self.out(h).squeeze(-1)


def tensor_bytes(obj) -> int:
    """Bytes of every tensor in a (nested) state dict: what an algorithm holds."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def nbytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def train_composed(outer_cls, *, workers: int = 2, steps: int = 18, blocks_on: int = 2, interval: int = 3,
                   with_lisa: bool = True, notify: bool = True, **outer_kwargs) -> list[dict]:
    """LISA (optional) + ``outer_cls`` over SGD on the toy model; per worker: params after each
    outer step, the outer state's bytes then and what the held parameters would need."""

    def work(comm):
        model = Blocks(seed=comm.rank)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        lsa = lisa.LISA(opt, comm, model=model, gamma=blocks_on, interval=interval, seed=3) if with_lisa else None
        outer = outer_cls(opt, comm, **outer_kwargs)
        if lsa is not None and notify:
            lsa.notify(outer)
        g = torch.Generator().manual_seed(50 + comm.rank)
        w = torch.linspace(-1, 1, 6)
        rounds = []
        for step in range(steps):
            x = torch.randn(16, 6, generator=g)
            ((model(x) - torch.sin(x @ w)) ** 2).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if (step + 1) % outer.cfg.sync_every == 0:
                trained = [p for p in model.parameters() if p.requires_grad]
                rounds.append({"params": [p.detach().clone() for p in model.parameters()],
                               "outer_bytes": tensor_bytes(outer.state_dict()), "trained_bytes": nbytes(trained),
                               "all_bytes": nbytes(model.parameters()), "active": list(lsa.active) if lsa else None})
        if isinstance(outer, noloco.NoLoCo):
            comm.barrier()
        return {"rounds": rounds, "params": [p.detach().clone() for p in model.parameters()]}

    return run_local(workers, work)


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# -- library defaults are dtrain train's ------------------------------------------------------------------

def test_spsa_library_defaults_equal_config_defaults():
    comm = LocalGroup(1).comm(0)
    lib = spsa.SPSA(Blocks(0).parameters(), comm)
    cfg = config.load(None, ["algo.name=spsa"])
    via = spsa.make_optimizer(cfg.algo, Blocks(0), comm, lr=cfg.optim.lr, seed=cfg.seed)
    fields = [f.name for f in dataclasses.fields(spsa.Config)]
    assert {f: getattr(lib.cfg, f) for f in fields} == {f: getattr(via.cfg, f) for f in fields}
    assert dataclasses.asdict(lib.cfg) == dataclasses.asdict(spsa.Config())
    assert lib.param_groups[0]["lr"] == via.param_groups[0]["lr"] == spsa.Config().lr
    assert (lib.seed, via.seed) == (0, cfg.seed)


def test_lisa_library_defaults_equal_config_defaults():
    model = Blocks(0)
    lib = lisa.LISA(torch.optim.SGD(model.parameters(), lr=0.1), None, model=model)
    cfg = config.load(None, ["algo=[lisa,ddp]"])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ctx = AttachContext(model=model, optimizer=opt, comm=None, seed=cfg.seed, total_steps=cfg.steps, lr=0.1)
    via = lisa.LISA.attach(cfg.lisa, ctx).algorithm
    fields = [f.name for f in dataclasses.fields(lisa.Config)]
    assert {f: getattr(lib.cfg, f) for f in fields} == {f: getattr(via.cfg, f) for f in fields}
    assert dataclasses.asdict(lib.cfg) == dataclasses.asdict(lisa.Config())
    assert (lib.seed, via.seed, via.history) == (0, cfg.seed, lib.history)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # only the schedule is read here
def test_spsa_is_the_loops_optimizer_and_its_scheduler_drives_its_lr():
    cfg = config.load(REPO / "configs/spsa.yaml", ["comm.name=local", "optim.warmup_steps=4", "optim.lr=0.01", *TINY_LM])
    parts = Parts.build(cfg, LocalGroup(1).comm(0))
    assert isinstance(parts.optimizer, spsa.SPSA) and parts.algorithm is parts.optimizer
    assert parts.scheduler.optimizer is parts.optimizer
    lrs = []
    for _ in range(5):
        lrs.append(parts.optimizer.param_groups[0]["lr"])
        parts.scheduler.step()
    assert lrs[0] < lrs[2] < lrs[4] == pytest.approx(0.01)  # warm-up acts on SPSA's own param_groups


def test_spsa_state_dict_is_torchs_with_its_counters():
    def work(comm):
        model = Blocks(0)
        opt = spsa.SPSA(model.parameters(), comm, lr=0.01, check_every=0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
        x = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
        for _ in range(3):
            opt.step(lambda: (model(x) ** 2).mean())
            sched.step()
        fresh = spsa.SPSA(Blocks(0).parameters(), comm, lr=0.5, check_every=0)
        fresh.load_state_dict(opt.state_dict())
        return opt.state_dict(), fresh

    state, fresh = run_local(1, work)[0]
    assert set(state) == {"state", "param_groups", "spsa"} and state["state"] == {}
    assert fresh.steps_done == 3 and fresh.param_groups[0]["lr"] == pytest.approx(0.01 / 4)
    assert "params" not in state["spsa"]  # weights travel with the model, never in the optimizer's state


# -- LISA composes: outer state of frozen blocks is freed -------------------------------------------------

@pytest.mark.parametrize("interval", [3, 2])  # switches at the outer steps, and in between
def test_lisa_diloco_frees_frozen_blocks_outer_state_and_replicas_agree(interval):
    out = train_composed(diloco.DiLoCo, interval=interval, sync_every=3, outer_lr=0.7, outer_momentum=0.9)
    for r in out[0]["rounds"]:
        assert r["outer_bytes"] == 2 * r["trained_bytes"] < 2 * r["all_bytes"]  # φ + outer momentum, held only
    for a, b in zip(out[0]["rounds"], out[1]["rounds"], strict=True):
        assert same(a["params"], b["params"])  # frozen blocks too: bit-identical replicas after each sync


def test_lisa_diloco_with_every_block_is_diloco_bit_for_bit():
    kw = {"sync_every": 3, "outer_lr": 0.7, "outer_momentum": 0.9}
    composed = train_composed(diloco.DiLoCo, blocks_on=4, **kw)
    plain = train_composed(diloco.DiLoCo, with_lisa=False, **kw)
    for a, b in zip(composed, plain, strict=True):
        assert same(a["params"], b["params"])


DILOCO_NO_MOMENTUM = {"sync_every": 3, "outer_lr": 0.7, "outer_momentum": 0.0, "nesterov": False}
NOLOCO_NO_MOMENTUM = {"sync_every": 3, "outer_lr": 0.7, "outer_momentum": 0.0, "gamma": 0.7}


@pytest.mark.parametrize("outer_cls, kw, interval", [
    (diloco.DiLoCo, DILOCO_NO_MOMENTUM, 3), (diloco.DiLoCo, DILOCO_NO_MOMENTUM, 2), (noloco.NoLoCo, NOLOCO_NO_MOMENTUM, 3),
], ids=["diloco-at-syncs", "diloco-between", "noloco-at-syncs"])
def test_freeing_outer_state_changes_no_number_without_outer_momentum(outer_cls, kw, interval):
    # Without outer momentum a frozen block's Δ is 0 and (2 workers in one group) the pull too, so
    # keeping its φ would leave it unchanged: released or kept, the trajectory is the same. (NoLoCo
    # lets a block unfrozen between outer steps rejoin at the next one, so only switches at outer
    # steps compare there.)
    freed = train_composed(outer_cls, interval=interval, **kw)
    kept = train_composed(outer_cls, interval=interval, notify=False, **kw)
    for a, b in zip(freed, kept, strict=True):
        assert same(a["params"], b["params"])
    for f, k in zip(freed[0]["rounds"], kept[0]["rounds"], strict=True):  # the outer state shrinks to the trained share
        assert f["outer_bytes"] * k["all_bytes"] == k["outer_bytes"] * f["trained_bytes"] and f["trained_bytes"] < k["all_bytes"]


def test_lisa_noloco_frees_frozen_blocks_outer_state():
    out = train_composed(noloco.NoLoCo, workers=3, interval=3, sync_every=3, outer_lr=0.7, outer_momentum=0.5)
    for w in out:
        for r in w["rounds"]:
            assert r["outer_bytes"] == 2 * r["trained_bytes"] < 2 * r["all_bytes"]  # φ + δ, held only
        assert all(torch.isfinite(p).all() for p in w["params"])


# -- composition through dtrain train ---------------------------------------------------------------------

@pytest.mark.timeout(180)
@pytest.mark.parametrize("outer", ["ddp", "diloco", "noloco", "none", "hdet", "spsa"])
def test_dtrain_train_composes_lisa_with(outer, tmp_path):
    extra = {"diloco": ["algo.sync_every=3"], "noloco": ["algo.sync_every=3"], "spsa": ["algo.check_every=0"]}
    overrides = [f"algo=[lisa,{outer}]", "lisa.interval=3", "comm.name=local", "comm.workers=2", "steps=6",
                 f"out_dir={tmp_path}", *TINY_LM, *extra.get(outer, [])]
    if outer == "spsa":
        overrides.append("optim.lr=0.001")
    elif outer != "hdet":  # HDET is the schedule (it refuses optim.schedule)
        overrides.append("optim.schedule=constant")
    summary = run(config.load(None, overrides))
    assert summary["algorithms"] == ["lisa", outer] and summary["algorithm"] == outer
    for w in summary["workers"]:
        assert w["lisa"]["switches"] == 3 and len(w["lisa"]["active_blocks"]) == 2
        assert w["lisa"]["trainable_params"] < w["lisa"]["total_params"]
    assert summary["workers"][0]["lisa"]["history"] == summary["workers"][1]["lisa"]["history"]


@pytest.mark.parametrize("path, overrides, algorithms", [
    (None, ["algo=[lisa,diloco]", "algo.sync_every=7", "lisa.gamma=3"], ["lisa", "diloco"]),
    (None, ["algo.sync_every=7", "algo=[diloco,lisa]"], ["lisa", "diloco"]),  # any order, options after or before
    (None, ["algo=[lisa,{name: diloco, sync_every: 7}]"], ["lisa", "diloco"]),
    ("configs/lisa.yaml", [], ["lisa", "ddp"]),
    ("configs/lisa.yaml", ["algo.name=diloco", "algo.sync_every=7"], ["lisa", "diloco"]),
    ("configs/lisa.yaml", ["algo=[diloco]", "algo.sync_every=7"], ["diloco"]),
    (None, ["algo=hdet"], ["hdet"]),
    (None, ["algo=[lisa,hdet]"], ["lisa", "hdet"]),
])
def test_composition_forms(path, overrides, algorithms):
    cfg = config.load(REPO / path if path else None, overrides)
    assert (["lisa"] if cfg.lisa is not None else []) + [cfg.algo.name] == algorithms
    if "algo.sync_every=7" in " ".join(overrides) or "sync_every: 7" in " ".join(overrides):
        assert cfg.algo.sync_every == 7
    if "lisa.gamma=3" in overrides:
        assert cfg.lisa.gamma == 3


# -- keys that would do nothing are refused ---------------------------------------------------------------

@pytest.mark.parametrize("overrides, match", [
    (["algo.name=spsa", "optim.grad_clip=0.5"], "optim.grad_clip is ignored under algo.name=spsa: SPSA computes no gradients"),
    (["algo.name=spsa", "optim.weight_decay=0.01"], "optim.weight_decay is ignored under algo.name=spsa: .*algo.weight_decay"),
    (["algo.name=spsa", "optim.name=sgd"], "optim.name is ignored under algo.name=spsa"),
    (["algo.name=spsa", "optim.betas=[0.9,0.9]"], "optim.betas is ignored under algo.name=spsa"),
    (["algo.name=spsa", "algo.lr=0.1"], "algo.lr is set by dtrain train from optim.lr; set optim.lr instead"),
    (["algo.name=spsa", "algo.seed=1"], "unknown key algo.seed"),
    (["lisa.gamma=3"], "lisa.gamma is set but LISA is off"),
    (["lisa.enabled=true"], "lisa.enabled is no longer a key"),
    (["algo.name=lisa"], "algo.name=lisa: LISA composes"),
    (["algo=[lisa]"], "algo lists only lisa"),
    (["algo=[ddp,diloco]"], "only LISA composes"),
    (["algo=[lisa,lisa,ddp]"], "lists lisa twice"),
    (["algo=[lisa,ddp]", "lisa.bogus=1"], "unknown key lisa.bogus"),
    (["algo=[lisa,ddp]", "lisa.seed=1"], "unknown key lisa.seed"),  # the run's seed is used
    (["algo=[lisa,ddp]", "lisa.interval=0"], "lisa.interval must be >= 1"),
    (["algo=[lisa,nope]"], "algo.name='nope' is not known"),
])
def test_refused_keys(overrides, match):
    with pytest.raises(ConfigError, match=match) as e:
        config.load(None, overrides)
    assert "\n" not in str(e.value)


def test_a_yaml_lisa_section_without_lisa_in_algo_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("algo: [diloco]\nlisa:\n  gamma: 3\n")
    with pytest.raises(ConfigError, match="lisa.gamma is set but LISA is off"):
        config.load(path)


def test_replaces_refuses_a_set_key_and_accepts_the_default():
    module = types.ModuleType("composition_test_algo")

    @dataclasses.dataclass
    class Config:
        name: str = "fixed_schedule"

    module.Config = Config
    module.REPLACES = {"optim": ("schedule", "warmup_steps", "min_lr_ratio")}
    module.REPLACES_WHY = "it sets the learning-rate schedule"
    sys.modules[module.__name__] = module
    config.register_algorithm("fixed_schedule", module.__name__)
    try:
        config.load(None, ["algo.name=fixed_schedule", "optim.schedule=cosine"])  # the default: nothing is lost
        with pytest.raises(ConfigError, match=r"^optim.warmup_steps is ignored under algo.name=fixed_schedule: it sets "
                                              r"the learning-rate schedule; remove it$"):
            config.load(None, ["algo.name=fixed_schedule", "optim.warmup_steps=5"])
    finally:
        config.ALGORITHMS.pop("fixed_schedule", None)
        sys.modules.pop(module.__name__, None)


# -- every spsa and lisa key changes what runs ---------------------------------------------------------

def _spsa_run(overrides: list[str]) -> list[dict]:
    cfg = config.load(None, ["algo.name=spsa", "optim.lr=0.05", *overrides])

    def work(comm):
        model = Blocks(seed=comm.rank)
        opt = spsa.make_optimizer(cfg.algo, model, comm, lr=cfg.optim.lr, seed=cfg.seed)
        g = torch.Generator().manual_seed(7 + comm.rank)
        for _ in range(4):
            x = torch.randn(16, 6, generator=g)
            opt.step(lambda x=x: ((model(x) - x.sum(1).sin()) ** 2).mean())
        buffer = max(b.numel() for b in opt._buffers(opt._active()).values())
        return {"params": [p.detach().clone() for p in model.parameters()], "report": opt.report(),
                "bytes": comm.stats.bytes_sent, "buffer": buffer}

    return run_local(2, work)


SPSA_KEYS = ["algo.eps=0.01", "algo.perturbations=2", "algo.weight_decay=0.5", "algo.quantize=false", "algo.quant_scale=4.0",
             "algo.exact_restore=false", "algo.check_every=2", "algo.broadcast_init=false", "algo.chunk_numel=7"]


def test_every_spsa_key_has_a_case():
    covered = {item.split("=")[0].removeprefix("algo.") for item in SPSA_KEYS}
    assert covered | set(spsa.LOOP_SETS) | {"name"} == {f.name for f in dataclasses.fields(spsa.Config)}


@pytest.mark.parametrize("item", SPSA_KEYS)
def test_every_spsa_key_changes_the_run(item):
    ref, changed = _spsa_run([]), _spsa_run([item])
    differs = any(a["report"] != b["report"] or a["bytes"] != b["bytes"] or a["buffer"] != b["buffer"]
                  or not same(a["params"], b["params"]) for a, b in zip(ref, changed, strict=True))
    assert differs, f"{item} changed nothing"


class TwoLists(Blocks):
    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.side = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        for a, b in zip(self.blocks, self.side, strict=True):
            h = h + torch.tanh(a(h)) + torch.tanh(b(h))
        return self.out(h).squeeze(-1)


def _lisa_run(overrides: list[str]) -> dict:
    cfg = config.load(None, ["algo=[lisa,none]", "lisa.interval=2", *overrides])
    model = TwoLists(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ctx = AttachContext(model=model, optimizer=opt, comm=None, seed=cfg.seed, total_steps=8, lr=0.1)
    lsa = lisa.LISA.attach(cfg.lisa, ctx).algorithm
    g = torch.Generator().manual_seed(3)
    for _ in range(8):
        x = torch.randn(16, 6, generator=g)
        ((model(x) - x.sum(1).sin()) ** 2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {"params": [p.detach().clone() for p in model.parameters()], "history": lsa.history,
            "held": tensor_bytes(lsa.state_dict())}


LISA_KEYS = ["lisa.blocks=side", "lisa.gamma=3", "lisa.interval=3", "lisa.probabilities=[0.7,0.1,0.1,0.1]",
             "lisa.offload_state=true"]


def test_every_lisa_key_has_a_case():
    assert {i.split("=")[0].removeprefix("lisa.") for i in LISA_KEYS} | {"name"} == {f.name for f in dataclasses.fields(lisa.Config)}


@pytest.mark.parametrize("item", LISA_KEYS)
def test_every_lisa_key_changes_the_run(item):
    ref, changed = _lisa_run([]), _lisa_run([item])
    assert ref["history"] != changed["history"] or ref["held"] != changed["held"] or not same(ref["params"], changed["params"])


@pytest.mark.parametrize("path, overrides", [("configs/lisa.yaml", ["algo.name=noloco"]), ("configs/spsa.yaml", [])])
def test_the_config_a_run_writes_loads_back_the_same(path, overrides, tmp_path):
    cfg = config.load(REPO / path, overrides)
    saved = tmp_path / "config.yaml"
    saved.write_text(config.to_yaml(cfg))  # what a run writes to out_dir/config.yaml
    assert config.load(saved) == cfg
