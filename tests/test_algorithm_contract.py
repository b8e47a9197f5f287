"""The algorithm contract for DDP, DiLoCo, NoLoCo and none: one Config per algorithm (library and
`dtrain train` defaults equal), overrides win, unknown keywords refused, every algo.* key changes
what runs or is refused; mixed fp32/bf16 models; one shared-seed helper."""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import time

import pytest
import torch

from dtrain import config
from dtrain.algorithms import ddp, diloco, local_only, noloco, streaming, streaming_noloco
from dtrain.algorithms.base import AttachContext
from dtrain.comm.local import LocalGroup, run_local
from dtrain.config import ConfigError

MODULES = {"ddp": ddp, "diloco": diloco, "noloco": noloco, "none": local_only, "streaming_diloco": streaming,
           "streaming_noloco": streaming_noloco}
CLASSES = {"ddp": ddp.DDP, "diloco": diloco.DiLoCo, "noloco": noloco.NoLoCo, "none": local_only.LocalOnly,
           "streaming_diloco": streaming.StreamingDiLoCo, "streaming_noloco": streaming_noloco.StreamingNoLoCo}
# facts of the run that attach passes, not options
CONTEXT_ARGS = {"noloco": {"seed", "total_steps"}, "streaming_diloco": {"model", "total_steps"},
                "streaming_noloco": {"seed", "model", "total_steps"}}


def _opt(model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
    # four tensors: enough for streaming_diloco's default of 4 fragments
    return torch.optim.SGD((model or torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))).parameters(), lr=0.1)


def _ctx(opt: torch.optim.Optimizer, comm, *, seed: int = 0, total_steps: int = 300,
         model: torch.nn.Module | None = None) -> AttachContext:
    model = model or torch.nn.Module()
    return AttachContext(model=model, optimizer=opt, comm=comm, seed=seed, total_steps=total_steps, lr=0.1)


# -- one Config, two ways in ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(MODULES))
def test_library_defaults_equal_config_defaults(name):
    comm = LocalGroup(1).comm(0)
    lib = CLASSES[name](_opt(), comm)
    cfg = config.load(None, [f"algo.name={name}"])
    via_config = MODULES[name].attach(cfg.algo, _ctx(_opt(), comm, seed=cfg.seed, total_steps=cfg.steps)).algorithm
    assert type(via_config) is CLASSES[name]
    assert isinstance(lib.cfg, MODULES[name].Config) and isinstance(via_config.cfg, MODULES[name].Config)
    fields = [f.name for f in dataclasses.fields(MODULES[name].Config)]
    assert {f: getattr(lib.cfg, f) for f in fields} == {f: getattr(via_config.cfg, f) for f in fields}
    assert dataclasses.asdict(lib.cfg) == dataclasses.asdict(MODULES[name].Config())
    if name == "noloco":  # the run facts: the library's defaults are dtrain train's defaults too
        assert (lib.seed, via_config.seed) == (0, cfg.seed) and via_config.total_steps == cfg.steps


@pytest.mark.parametrize("name", list(MODULES))
def test_the_constructor_restates_no_option(name):
    params = set(inspect.signature(CLASSES[name].__init__).parameters)
    assert params == {"self", "optimizer", "comm", "cfg", "overrides"} | CONTEXT_ARGS.get(name, set())


@pytest.mark.parametrize("name", list(MODULES))
def test_an_unknown_keyword_is_a_one_line_type_error_naming_it(name):
    with pytest.raises(TypeError) as e:
        CLASSES[name](_opt(), LocalGroup(1).comm(0), sync_evry=5)
    assert "'sync_evry'" in str(e.value) and "\n" not in str(e.value)


def test_overrides_win_over_a_config_and_over_a_loaded_section():
    comm = LocalGroup(1).comm(0)
    algo = diloco.DiLoCo(_opt(), comm, diloco.Config(sync_every=7, outer_lr=0.5), sync_every=3)
    assert (algo.cfg.sync_every, algo.cfg.outer_lr, algo.cfg.outer_momentum) == (3, 0.5, 0.9)
    section = config.load(None, ["algo.name=noloco", "algo.sync_every=9", "algo.compression=int8"]).algo
    algo = noloco.NoLoCo(_opt(), comm, section, compression="bf16", seed=4)
    assert (algo.cfg.sync_every, algo.cfg.compression, algo.seed) == (9, "bf16", 4)
    algo = ddp.DDP(_opt(), comm, ddp.Config(robust="median"), robust_norm_bound=2.0)
    assert (algo.cfg.robust, algo.cfg.robust_norm_bound) == ("median", 2.0)


def test_validation_is_the_configs_own_for_the_library_and_for_dtrain_train():
    with pytest.raises(ValueError, match="algo.sync_every"):
        diloco.DiLoCo(_opt(), LocalGroup(1).comm(0), sync_every=0)
    with pytest.raises(ConfigError, match="algo.sync_every"):
        config.load(None, ["algo.name=diloco", "algo.sync_every=0"])
    with pytest.raises(ValueError, match="algo.gamma"):
        noloco.NoLoCo(_opt(), LocalGroup(1).comm(0), outer_momentum=0.9)


@pytest.mark.parametrize("override, key", [
    ("algo.bogus=1", "algo.bogus"),  # the none algorithm has no options at all
    ("algo.sync_every=5", "algo.sync_every"),
])
def test_the_none_algorithm_refuses_every_key(override, key):
    with pytest.raises(ConfigError, match=key):
        config.load(None, ["algo.name=none", override])


# -- every algo.* key changes what runs, or is refused ---------------------------------------------------

def _model(rank: int, *, dtype_of_second: torch.dtype = torch.float32) -> torch.nn.Module:
    """A tiny two-layer regression model; its init depends on the rank (so broadcast_init shows)."""
    g = torch.Generator().manual_seed(10 + rank)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    model[2].to(dtype_of_second)
    return model


def _forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    h = model[1](model[0](x))
    return model[2](h.to(model[2].weight.dtype)).float()


def _run(name: str, overrides: list[str], *, workers: int, steps: int = 12, slow: tuple[int, int, float] | None = None,
         dtype_of_second: torch.dtype = torch.float32) -> dict:
    """Train the toy model under ``algo.name=name`` + overrides (through dtrain.config and attach) on
    the local backend; per worker: final params, bytes sent after every step, stats and report."""
    cfg = config.load(None, [f"algo.name={name}", *overrides])
    module = config.section_module("algo", name)

    def work(comm):
        model = _model(comm.rank, dtype_of_second=dtype_of_second)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        algo = module.attach(cfg.algo, _ctx(opt, comm, seed=cfg.seed, total_steps=steps, model=model)).algorithm
        w_true = torch.linspace(-1, 1, 6)
        g = torch.Generator().manual_seed(100 + comm.rank)
        trace = []
        for step in range(steps):
            if slow is not None and (comm.rank, step) == slow[:2]:
                time.sleep(slow[2])
            x = torch.randn(8, 6, generator=g)
            ((_forward(model, x).squeeze(-1) - x @ w_true) ** 2).mean().backward()
            opt.step()
            opt.zero_grad()
            trace.append((comm.stats.bytes_sent, comm.stats.messages, comm.stats.collectives))
        if name in ("noloco", "streaming_noloco"):
            comm.barrier()  # lets a late partner finish its last exchange with us
        report = {k: v for k, v in algo.report().items() if not k.endswith("_s")}  # timings vary run to run
        return {"params": [p.detach().clone() for p in model.parameters()], "trace": trace, "report": report,
                "algo": algo}

    return run_local(workers, work)


def _differs(a: list[dict], b: list[dict]) -> bool:
    for x, y in zip(a, b, strict=True):
        if x["trace"] != y["trace"] or x["report"] != y["report"]:
            return True
        if any(not torch.equal(p, q) for p, q in zip(x["params"], y["params"])):
            return True
    return False


# (algorithm, key=value, the base overrides both runs share, workers, straggler)
KEY_CASES = [
    ("ddp", "algo.broadcast_init=false", [], 3, None),
    ("ddp", "algo.robust=median", [], 3, None),
    ("ddp", "algo.robust_trim=0.4", ["algo.robust=trimmed_mean"], 5, None),
    ("ddp", "algo.robust_norm_bound=1.0", [], 3, None),
    ("ddp", "algo.bucket_mb=0.00001", [], 3, None),  # ~10-byte buckets: more all-reduces per step
    ("ddp", "algo.compression=int8", [], 3, None),
    ("ddp", "algo.error_feedback=true", ["algo.compression=int4"], 3, None),
    ("ddp", "algo.error_feedback_decay=0.5", ["algo.compression=int4", "algo.error_feedback=true"], 3, None),
    ("ddp", "algo.block_size=4", ["algo.compression=int4"], 3, None),
    ("ddp", "algo.topk_density=0.5", ["algo.compression=topk"], 3, None),
    ("ddp", "algo.topk_chunk=8", ["algo.compression=topk"], 3, None),
    ("ddp", "algo.topk_value_bits=4", ["algo.compression=topk", "algo.topk_density=0.5"], 3, None),
    ("diloco", "algo.sync_every=4", ["algo.sync_every=3"], 3, None),
    ("diloco", "algo.outer_lr=0.4", ["algo.sync_every=3"], 3, None),
    ("diloco", "algo.outer_momentum=0.5", ["algo.sync_every=3"], 3, None),
    ("diloco", "algo.nesterov=false", ["algo.sync_every=3"], 3, None),
    ("diloco", "algo.broadcast_init=false", ["algo.sync_every=3"], 3, None),
    ("diloco", "algo.robust=median", ["algo.sync_every=3"], 3, None),
    ("diloco", "algo.robust_trim=0.4", ["algo.sync_every=3", "algo.robust=trimmed_mean"], 5, None),
    ("diloco", "algo.robust_norm_bound=1.0", ["algo.sync_every=3"], 3, None),
    ("diloco", "algo.compression=int8", ["algo.sync_every=3"], 3, None),
    ("diloco", "algo.error_feedback=true", ["algo.sync_every=3", "algo.compression=int4"], 3, None),
    ("diloco", "algo.error_feedback_decay=0.5", ["algo.sync_every=3", "algo.compression=int4", "algo.error_feedback=true"], 3, None),
    ("diloco", "algo.block_size=4", ["algo.sync_every=3", "algo.compression=int4"], 3, None),
    ("diloco", "algo.topk_density=0.5", ["algo.sync_every=3", "algo.compression=topk"], 3, None),
    ("diloco", "algo.topk_chunk=8", ["algo.sync_every=3", "algo.compression=topk"], 3, None),
    ("diloco", "algo.topk_value_bits=4", ["algo.sync_every=3", "algo.compression=topk", "algo.topk_density=0.5"], 3, None),
    ("diloco", "algo.outer_device=cpu", ["algo.sync_every=3"], 3, None),  # on a CPU machine: only the report says so
    *[("streaming_diloco", item, ["algo.sync_every=4", "algo.fragments=2", *base], 3, None) for item, base in [
        ("algo.sync_every=6", []), ("algo.outer_lr=0.4", []), ("algo.outer_momentum=0.5", []),
        ("algo.nesterov=false", []), ("algo.fragments=1", []), ("algo.fragment_paths=[0,2]", []),
        ("algo.overlap_steps=0", []), ("algo.mix_alpha=0.0", []), ("algo.broadcast_init=false", []),
        ("algo.compression=int8", []), ("algo.error_feedback=true", ["algo.compression=int4"]),
        ("algo.error_feedback_decay=0.5", ["algo.compression=int4", "algo.error_feedback=true"]),
        ("algo.block_size=4", ["algo.compression=int4"]), ("algo.topk_density=0.5", ["algo.compression=topk"]),
        ("algo.topk_chunk=8", ["algo.compression=topk"]), ("algo.topk_value_bits=4", ["algo.compression=topk", "algo.topk_density=0.5"]),
        ("algo.outer_device=cpu", [])]],
    *[("streaming_noloco", item, ["algo.sync_every=4", "algo.fragments=2", *base], 4, slow) for item, base, slow in [
        ("algo.sync_every=6", [], None), ("algo.outer_lr=0.9", [], None), ("algo.outer_momentum=0.3", [], None),
        ("algo.gamma=1.0", [], None), ("algo.nesterov=true", [], None), ("algo.group_size=4", [], None), ("algo.fragments=1", [], None),
        ("algo.fragment_paths=[0,2]", [], None), ("algo.overlap_steps=0", [], None), ("algo.mix_alpha=0.0", [], None),
        ("algo.compression=int8", [], None), ("algo.error_feedback=true", ["algo.compression=topk"], None),
        ("algo.error_feedback_decay=0.5", ["algo.compression=topk", "algo.error_feedback=true"], None),
        ("algo.block_size=4", ["algo.compression=int4"], None), ("algo.topk_density=0.5", ["algo.compression=topk"], None),
        ("algo.topk_chunk=8", ["algo.compression=topk"], None),
        ("algo.topk_value_bits=4", ["algo.compression=topk", "algo.topk_density=0.5"], None),
        ("algo.timeout_s=0.3", ["algo.overlap_steps=0"], (1, 4, 0.8)), ("algo.broadcast_init=false", [], None),
        ("algo.outer_device=cpu", [], None)]],
    ("noloco", "algo.sync_every=4", ["algo.sync_every=3"], 4, None),
    ("noloco", "algo.outer_lr=0.9", ["algo.sync_every=3"], 4, None),
    ("noloco", "algo.outer_momentum=0.3", ["algo.sync_every=3"], 4, None),
    ("noloco", "algo.gamma=1.0", ["algo.sync_every=3"], 4, None),
    ("noloco", "algo.nesterov=true", ["algo.sync_every=3"], 4, None),
    ("noloco", "algo.group_size=4", ["algo.sync_every=3"], 4, None),
    ("noloco", "algo.phi_lead_steps=1", ["algo.sync_every=3"], 4, None),  # φ sent later: bytes by step differ
    ("noloco", "algo.phi_lead_steps=0", ["algo.sync_every=3"], 4, None),  # φ with Δ: fewer messages
    ("noloco", "algo.compression=int8", ["algo.sync_every=3"], 4, None),
    ("noloco", "algo.block_size=4", ["algo.sync_every=3", "algo.compression=int8"], 4, None),
    ("noloco", "algo.error_feedback=true", ["algo.sync_every=3", "algo.compression=topk"], 4, None),
    ("noloco", "algo.error_feedback_decay=0.5", ["algo.sync_every=3", "algo.compression=topk", "algo.error_feedback=true"], 4, None),
    ("noloco", "algo.topk_density=0.5", ["algo.sync_every=3", "algo.compression=topk"], 4, None),
    ("noloco", "algo.topk_chunk=8", ["algo.sync_every=3", "algo.compression=topk"], 4, None),
    ("noloco", "algo.topk_value_bits=4", ["algo.sync_every=3", "algo.compression=topk", "algo.topk_density=0.5"], 4, None),
    ("noloco", "algo.outer_device=cpu", ["algo.sync_every=3"], 4, None),  # on a CPU machine: only the report says so
    ("noloco", "algo.timeout_s=0.3", ["algo.sync_every=3"], 2, (1, 4, 1.5)),  # a straggler is left out
    ("noloco", "algo.broadcast_init=false", ["algo.sync_every=3"], 4, None),
    ("noloco", "algo.robust=median", ["algo.sync_every=3", "algo.group_size=4"], 4, None),
    ("noloco", "algo.robust_trim=0.4", ["algo.sync_every=3", "algo.group_size=5", "algo.robust=trimmed_mean"], 5, None),
    ("noloco", "algo.robust_norm_bound=1.0", ["algo.sync_every=3"], 4, None),
]


_REFERENCES: dict[tuple, list[dict]] = {}


def test_every_key_of_every_algorithm_has_a_case():
    covered = {(name, item.split("=")[0].removeprefix("algo.")) for name, item, *_ in KEY_CASES}
    for name, module in MODULES.items():
        for f in dataclasses.fields(module.Config):
            if f.name != "name":
                assert (name, f.name) in covered, f"algo.{f.name} of {name} has no test that it changes the run"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name, item, base, workers, slow", KEY_CASES, ids=[f"{c[0]}-{c[1]}" for c in KEY_CASES])
def test_a_non_default_value_changes_the_run(name, item, base, workers, slow):
    key = (name, tuple(base), workers, slow)
    reference = _REFERENCES.get(key)
    if reference is None:  # many cases share a base run: it is run (twice) once per session
        reference = _run(name, base, workers=workers, slow=slow)
        assert not _differs(reference, _run(name, base, workers=workers, slow=slow)) or slow  # the runs are deterministic
        _REFERENCES[key] = reference
    assert _differs(_run(name, [*base, item], workers=workers, slow=slow), reference), f"{item} changed nothing"


@pytest.mark.parametrize("name, overrides, key", [
    ("ddp", ["algo.robust_trim=0.4"], "algo.robust_trim"),  # only trimmed_mean trims
    ("diloco", ["algo.robust_trim=0.4"], "algo.robust_trim"),
    ("noloco", ["algo.block_size=32"], "algo.block_size"),  # only int8/int4 have blocks
    ("diloco", ["algo.topk_density=0.1", "algo.compression=int4"], "algo.topk_density"),  # only topk keeps a fraction
    ("streaming_diloco", ["algo.error_feedback=true"], "algo.error_feedback"),  # nothing is lost uncompressed
    ("diloco", ["algo.compression=topk", "algo.error_feedback_decay=0.9"], "algo.error_feedback_decay"),  # no residual
    ("diloco", ["algo.compression=int8", "algo.robust=median"], "algo.compression"),  # robust gathers full Δs
    ("ddp", ["algo.compression=int8", "algo.robust=median"], "algo.compression"),
    ("noloco", ["algo.robust=median"], "algo.robust"),  # a median of a pair is its mean
])
def test_a_key_that_would_be_ignored_is_refused(name, overrides, key):
    with pytest.raises(ConfigError, match=key) as e:
        config.load(None, [f"algo.name={name}", *overrides])
    assert "\n" not in str(e.value)


# -- a mixed fp32/bf16 model -------------------------------------------------------------------------------

def _mixed_numel() -> tuple[int, int]:
    m = _model(0, dtype_of_second=torch.bfloat16)
    return sum(p.numel() for p in m[0].parameters()), sum(p.numel() for p in m[2].parameters())


@pytest.mark.parametrize("name", ["diloco", "noloco"])
def test_a_mixed_fp32_bf16_model_trains_with_outer_state_per_dtype(name):
    n32, n16 = _mixed_numel()
    # outer lr 1, no momentum: both algorithms average (DiLoCo over all 3, NoLoCo over its group)
    over = ["algo.sync_every=4", "algo.outer_lr=1.0", "algo.outer_momentum=0.0"]
    over += ["algo.nesterov=false"] if name == "diloco" else ["algo.group_size=3", "algo.gamma=1.0"]
    runs = _run(name, over, workers=3, steps=12, dtype_of_second=torch.bfloat16)
    start = _model(0, dtype_of_second=torch.bfloat16)
    for r in runs:
        a = r["algo"]
        assert [p.dtype for p in r["params"]] == [torch.float32] * 2 + [torch.bfloat16] * 2  # bf16 stays bf16
        state = a.outer_params if name == "diloco" else a.phi
        assert sorted({t.dtype for t in state}, key=str) == [torch.bfloat16, torch.float32]  # per dtype, never cast
        assert any(not torch.equal(p, q) for p, q in zip(r["params"], start.parameters()))  # it trained
    for p0, p1, p2 in zip(*(r["params"] for r in runs)):  # every worker ends on the same averaged φ
        assert torch.equal(p0, p1) and torch.equal(p0, p2)
    # bytes: the per-dtype payload formula (the broadcast at start, then 3 outer steps)
    per_round = 4 * n32 + 2 * n16
    if name == "diloco":  # ring all-reduce of each dtype group, one collective per group
        ring = sum(-(-2 * 2 * b // 3) for b in (4 * n32, 2 * n16))
        assert runs[1]["trace"][-1] == (ring * 3, 3 * 2 * 2 * 2, 2 + 3 * 2)  # broadcast recv only on rank 1
    else:  # Δ and φ to each of the 2 others, each one message carrying both dtype groups
        assert runs[1]["trace"][-1] == (3 * 2 * 2 * per_round, 3 * 2 * 2, 2)


def test_mixed_model_outer_step_equals_a_per_dtype_reference():
    """DiLoCo's outer Nesterov step on a mixed model equals torch SGD run on each dtype group alone."""
    def work(comm):
        model = _model(comm.rank, dtype_of_second=torch.bfloat16)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        algo = diloco.DiLoCo(opt, comm, sync_every=1000, broadcast_init=False)
        start = [p.detach().clone() for p in model.parameters()]
        with torch.no_grad():
            for i, p in enumerate(model.parameters()):
                p.add_(0.01 * (comm.rank + 1) * (i + 1))
        thetas = [p.detach().clone() for p in model.parameters()]
        algo.sync()
        return start, thetas, [p.detach().clone() for p in model.parameters()]

    got = run_local(3, work)
    for rank, (start, _, after) in enumerate(got):
        for i, (phi0, new) in enumerate(zip(start, after)):
            # reference in the parameter's own dtype: mean Δ by rank-order sum, then one SGD step
            deltas = [start_j[i] - thetas_j[i] for start_j, thetas_j, _ in got]
            mean = deltas[0].clone()
            for d in deltas[1:]:
                mean.add_(d)
            ref = torch.nn.Parameter(phi0.clone())
            ref.grad = mean.div_(3)
            torch.optim.SGD([ref], lr=0.7, momentum=0.9, nesterov=True).step()
            assert new.dtype == phi0.dtype
            assert torch.equal(new, ref.detach()), (rank, i)


# -- one shared-seed helper ----------------------------------------------------------------------------------

def test_noloco_pairing_seed_is_unchanged_by_the_shared_helper():
    from dtrain.seeding import stream_seed
    from dtrain.workloads.base import stream_seed as workloads_stream_seed

    def old(seed: int, round_: int) -> int:  # the derivation noloco.py had inline
        digest = hashlib.blake2b(repr(("noloco-groups", seed, round_)).encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") & ((1 << 63) - 1)

    for seed, round_ in [(0, 1), (3, 7), (12345, 999)]:
        assert stream_seed("noloco-groups", seed, round_) == old(seed, round_)
        perm = torch.randperm(6, generator=torch.Generator().manual_seed(old(seed, round_))).tolist()
        shuffled = [list(range(6))[i] for i in perm]
        expect = sorted(sorted(shuffled[i : i + 2]) for i in range(0, 6, 2))
        assert sorted(noloco.groups_for_round(range(6), round_, seed=seed, group_size=2)) == expect
    assert workloads_stream_seed is stream_seed  # the workloads' data streams use the same one


# -- the README's "Adding an algorithm" runs as written -------------------------------------------------------

def _readme_blocks() -> list[str]:
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("## Adding an algorithm\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.mark.timeout(120)
def test_the_readmes_adding_an_algorithm_example_works(tmp_path, monkeypatch, capsys):
    import sys

    module_code, usage = _readme_blocks()
    (tmp_path / "periodic_avg.py").write_text(module_code)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    try:
        exec(compile(usage, "README.md", "exec"), {})
        assert capsys.readouterr().out.split()[-2:] == ["periodic_avg", "2"]  # steps 5 and 10 averaged
        import periodic_avg

        with pytest.raises(ConfigError, match="algo.every"):
            config.load(None, ["algo.name=periodic_avg", "algo.every=0"])

        def work(comm):  # the library path: the weights really are averaged
            model = torch.nn.Linear(2, 1)
            with torch.no_grad():
                model.weight.fill_(float(comm.rank))
            opt = torch.optim.SGD(model.parameters(), lr=0.0)
            periodic_avg.PeriodicAverage(opt, comm, every=1)
            model(torch.ones(1, 2)).sum().backward()
            opt.step()
            return model.weight.detach().clone()

        assert all(torch.equal(w, torch.full((1, 2), 1.0)) for w in run_local(3, work))
    finally:
        config.ALGORITHMS.pop("periodic_avg", None)
        sys.modules.pop("periodic_avg", None)
