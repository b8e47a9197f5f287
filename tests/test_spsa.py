"""Shared-seed SPSA: one byte per worker per step, bit-identical replicas, MeZO's update, joins."""

from __future__ import annotations

import math

import pytest
import torch
from dist_utils import REPO, train
from torch import nn

from dtrain.algorithms import spsa_noise as noise
from dtrain.algorithms import spsa_quant as quant
from dtrain.algorithms.spsa import DIGEST_BYTES, SPSA
from dtrain.comm.local import run_local
from dtrain.config import ConfigError, load

TINY_LM = ["workload.n_layer=1", "workload.d_model=32", "workload.n_head=2", "workload.seq_len=32",
           "workload.batch_size=4", "workload.eval_batches=1", "workload.eval_batch_size=4"]


def tiny_model(seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.LayerNorm(5), nn.Linear(5, 1))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


def tiny_batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(16, 6, generator=gen)
    return x, x.sum(dim=1, keepdim=True).sin()


def mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def train_tiny(comm, *, steps: int, model: nn.Module | None = None, **kwargs) -> tuple[nn.Module, SPSA]:
    model = model or tiny_model()
    opt = SPSA(model.parameters(), comm, **{"lr": 1e-2, "eps": 1e-3, "check_every": 0, **kwargs})
    for step in range(steps):
        batch = tiny_batch(opt.steps_done, comm.rank)
        opt.step(lambda b=batch: mse(model, b))
    return model, opt


# -- the quantizer ---------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [8.0, 16.0])
def test_quantizer_roundtrip_within_half_a_log_step_and_keeps_sign(scale: float) -> None:
    limit = (quant.MAX_POWER - 0.5) / scale
    gen = torch.Generator().manual_seed(0)
    logs = (torch.rand(2000, generator=gen, dtype=torch.float64) * 2 - 1) * limit
    for i, lg in enumerate(logs.tolist()):
        g = math.exp(lg) * (1 if i % 2 else -1)
        code = quant.quantize(g, scale=scale)
        assert -127 <= code <= 127 and code != 0
        back = quant.dequantize(code, scale=scale)
        assert math.copysign(1, back) == math.copysign(1, g)
        assert abs(math.log(abs(back)) - math.log(abs(g))) <= 0.5 / scale + 1e-12
    # Out of range clamps to the extreme level (sign kept); 0 and non-finite have their own codes.
    assert quant.dequantize(quant.quantize(1e9, scale=scale), scale=scale) == pytest.approx(math.exp(63 / scale))
    assert quant.dequantize(quant.quantize(-1e-12, scale=scale), scale=scale) == pytest.approx(-math.exp(-63 / scale))
    assert quant.quantize(0.0) == 0 and quant.dequantize(0) == 0.0
    assert quant.quantize(float("nan")) == -128 and quant.dequantize(-128) is None
    assert quant.encode([1.0, -2.0, 0.0]) == bytes([64, (-(64 + round(8 * math.log(2)))) & 0xFF, 0])
    assert quant.decode(quant.encode([3.0, float("inf")]), 2)[1] is None
    with pytest.raises(ValueError, match="expected 1"):
        quant.decode(b"\x01\x02", 1)


# -- bytes on the wire -------------------------------------------------------------------------
@pytest.mark.parametrize("perturbations", [1, 3])
def test_each_worker_sends_exactly_perturbations_bytes_per_step(perturbations: int) -> None:
    def work(comm):
        sent: list[bytes] = []
        inner = comm._all_gather_bytes
        comm._all_gather_bytes = lambda payload: (sent.append(payload), inner(payload))[1]
        model = tiny_model()
        opt = SPSA(model.parameters(), comm, lr=1e-2, perturbations=perturbations, check_every=0, broadcast_init=False)
        deltas = []
        for step in range(6):
            before = comm.stats.payload_bytes
            batch = tiny_batch(step, comm.rank)
            opt.step(lambda b=batch: mse(model, b))
            deltas.append(comm.stats.payload_bytes - before)
        return deltas, [len(m) for m in sent], comm.stats.bytes_sent, opt.report()["payload_bytes_per_step"]

    for deltas, lengths, bytes_sent, per_step in run_local(3, work):
        assert deltas == [perturbations] * 6  # the backend's own counter
        assert lengths == [perturbations] * 6  # the message itself
        assert bytes_sent == 6 * perturbations * 2  # to each of the 2 others
        assert per_step == perturbations


# -- MeZO by hand --------------------------------------------------------------------------------
@pytest.mark.parametrize("exact", [False, True])
def test_one_worker_unquantized_step_is_the_mezo_update(exact: bool) -> None:
    lr, eps, wd = 0.05, 1e-3, 0.1

    def work(comm):
        model = tiny_model()
        before = [p.detach().clone() for p in model.parameters()]
        opt = SPSA(model.parameters(), comm, lr=lr, eps=eps, weight_decay=wd, quantize=False,
                   exact_restore=exact, seed=7, check_every=0)
        batch = tiny_batch(0, 0)
        loss = opt.step(lambda: mse(model, batch))
        return model, before, opt, loss

    model, before, opt, loss = run_local(1, work)[0]
    zs = [noise.full_direction(p, noise.direction_seed(7, 0, 0, 0, i)) for i, p in enumerate(before)]
    batch = tiny_batch(0, 0)
    ref = tiny_model()
    with torch.no_grad():
        losses = []
        for sign in (1.0, -1.0):
            for r, b, z in zip(ref.parameters(), before, zs, strict=True):
                r.copy_(b + sign * eps * z)
            losses.append(float(mse(ref, batch)))
    g = (losses[0] - losses[1]) / (2 * eps)
    assert opt.last_grads[0] == pytest.approx(g, rel=2e-3, abs=1e-3)
    assert loss == pytest.approx(sum(losses) / 2, rel=1e-5)
    g_used = opt.last_grads[0]
    for p, b, z in zip(model.parameters(), before, zs, strict=True):
        decay = wd if p.dim() >= 2 else 0.0  # MeZO: no decay on biases and norms
        expected = b - lr * (g_used * z + decay * b)
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=2e-6)
        assert not torch.equal(p.detach(), b)


def test_no_grad_is_ever_allocated_and_forwards_run_without_autograd() -> None:
    seen: list[bool] = []

    def work(comm):
        model = tiny_model()
        opt = SPSA(model.parameters(), comm, lr=1e-2, check_every=0)
        for step in range(3):
            batch = tiny_batch(step, comm.rank)

            def closure(b=batch):
                seen.append(torch.is_grad_enabled())
                return mse(model, b)

            opt.step(closure)
        return [p.grad for p in model.parameters()], [p.requires_grad for p in model.parameters()]

    for grads, requires in run_local(2, work):
        assert all(g is None for g in grads) and all(requires)
    assert seen and not any(seen)


def test_only_parameters_with_requires_grad_move() -> None:
    def work(comm):
        model = tiny_model()
        frozen = model[0].weight
        frozen.requires_grad_(False)
        start = [p.detach().clone() for p in model.parameters()]
        train_tiny(comm, steps=3, model=model)
        return [torch.equal(p.detach(), s) for p, s in zip(model.parameters(), start, strict=True)]

    unchanged = run_local(1, work)[0]
    assert unchanged == [True, False, False, False, False, False]


def test_torch_lr_scheduler_drives_param_groups_lr() -> None:
    def work(comm):
        model = tiny_model()
        opt = SPSA(model.parameters(), comm, lr=1e-2, check_every=0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 if s == 0 else 0.0)
        opt.step(lambda: mse(model, tiny_batch(0, 0)))
        sched.step()
        frozen = [p.detach().clone() for p in model.parameters()]
        opt.step(lambda: mse(model, tiny_batch(1, 0)))
        return opt.param_groups[0]["lr"], all(torch.equal(p, f) for p, f in zip(model.parameters(), frozen, strict=True))

    lr, unchanged = run_local(1, work)[0]
    assert lr == 0.0 and unchanged


# -- replica agreement ---------------------------------------------------------------------
def test_float_dance_drifts_and_the_hash_check_resyncs_it() -> None:
    def work(comm, exact):
        model, opt = train_tiny(comm, steps=4, exact_restore=exact, check_every=4)
        return opt.resyncs, opt.last_mismatched, opt.params_digest()

    drifting = run_local(3, lambda c: work(c, False))
    assert all(r == 1 and m for r, m, _ in drifting)  # plain float +ε/−2ε/+ε diverged; check repaired
    assert len({d for _, _, d in drifting}) == 1
    exact = run_local(3, lambda c: work(c, True))
    assert all(r == 0 for r, _, _ in exact) and len({d for _, _, d in exact}) == 1


@pytest.mark.timeout(180)
def test_four_torchrun_workers_stay_bit_identical(tmp_path) -> None:
    steps, check = 40, 20
    summary = train(4, "configs/spsa.yaml", tmp_path / "run", f"steps={steps}", f"algo.check_every={check}",
                    "eval_every=40", "ckpt_every=0", "threads=1", *TINY_LM, timeout=170)
    workers = summary["workers"]
    assert len(workers) == 4
    digests = {w["algorithm"]["param_digest"] for w in workers}
    assert len(digests) == 1  # real hash of every weight byte, after 40 steps
    assert {w["eval"]["val_loss"] for w in workers} == {summary["eval"]["value"]}
    assert summary["eval"]["value"] < summary["eval"]["initial"]
    for w in workers:
        assert w["algorithm"]["resyncs"] == 0 and w["algorithm"]["hash_checks"] == 2
        # one byte per step, plus two 9-byte hash checks; nothing else during training
        assert w["comm"]["payload_bytes"] == steps * 1 + 2 * (DIGEST_BYTES + 1)
        assert w["comm"]["bytes_sent"] == 3 * w["comm"]["payload_bytes"]


# -- membership ------------------------------------------------------------------------------
def test_late_worker_from_state_dict_matches_after_its_first_step() -> None:
    def phase1(comm):
        model, opt = train_tiny(comm, steps=5)
        return {"model": model.state_dict(), "optimizer": opt.state_dict()}  # what the comm's join path hands over

    states = run_local(3, phase1)

    def phase2(comm):
        model = tiny_model(seed=99 if comm.rank == 3 else 0)  # the newcomer starts elsewhere
        opt = SPSA(model.parameters(), comm, lr=1e-2, eps=1e-3, check_every=0, broadcast_init=False)
        saved = states[comm.rank] if comm.rank < 3 else states[0]
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        batch = tiny_batch(opt.steps_done, comm.rank)
        opt.step(lambda: mse(model, batch))
        return opt.steps_done, opt.params_digest()

    out = run_local(4, phase2)
    assert {s for s, _ in out} == {6}
    assert len({d for _, d in out}) == 1


def test_join_collective_fetches_weights_and_step_from_the_majority() -> None:
    def phase1(comm):
        model, opt = train_tiny(comm, steps=4)
        return {"model": model.state_dict(), "optimizer": opt.state_dict()}

    states = run_local(2, phase1)

    def phase2(comm):
        if comm.rank == 2:
            model = tiny_model(seed=5)
            opt = SPSA.join(model.parameters(), comm, lr=1e-2, eps=1e-3, check_every=0)
        else:
            model = tiny_model()
            opt = SPSA(model.parameters(), comm, lr=1e-2, eps=1e-3, check_every=0, broadcast_init=False)
            model.load_state_dict(states[comm.rank]["model"])
            opt.load_state_dict(states[comm.rank]["optimizer"])
            opt.check_replicas()  # what an elastic backend triggers when peers() changes
        for _ in range(2):
            batch = tiny_batch(opt.steps_done, comm.rank)
            opt.step(lambda b=batch: mse(model, b))
        return opt.steps_done, opt.params_digest(), opt.resyncs

    out = run_local(3, phase2)
    assert {s for s, _, _ in out} == {6}
    assert len({d for _, d, _ in out}) == 1
    assert all(r == 1 for _, _, r in out)


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match="algo.eps must be > 0"):
        load(REPO / "configs/spsa.yaml", ["algo.eps=0"])
    with pytest.raises(ConfigError, match="algo.perturbations must be >= 1"):
        load(REPO / "configs/spsa.yaml", ["algo.perturbations=0"])


def test_checkpoint_resume_continues_bit_identically(tmp_path) -> None:
    from dtrain.train import run

    common = ["comm.name=local", "comm.workers=2", "threads=1", "progress=false", "plot=false", "eval_every=100",
              "optim.schedule=constant", "optim.warmup_steps=0", "algo.check_every=0", *TINY_LM]
    straight = run(load(REPO / "configs/spsa.yaml", [*common, "steps=8", "ckpt_every=0", f"out_dir={tmp_path / 'a'}"]))
    run(load(REPO / "configs/spsa.yaml", [*common, "steps=4", "ckpt_every=4", f"out_dir={tmp_path / 'b'}"]))
    resumed = run(load(REPO / "configs/spsa.yaml", [*common, "steps=8", "ckpt_every=4", "resume=true", f"out_dir={tmp_path / 'b'}"]))
    digests = {w["algorithm"]["param_digest"] for w in straight["workers"] + resumed["workers"]}
    assert len(digests) == 1 and resumed["workers"][0]["algorithm"]["steps"] == 8
