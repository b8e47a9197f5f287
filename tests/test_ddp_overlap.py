"""DDP's gradient buckets: reduced while backward runs, the mean in p.grad when backward returns, the
same numbers whatever the bucket size, and one worker's bad gradient or skipped backward skipped by all."""

from __future__ import annotations

import copy

import pytest
import torch

from dtrain.algorithms.ddp import DDP
from dtrain.comm.local import run_local

TINY_BUCKETS = 1e-4  # MiB: ~100 bytes, so the toy model below spans several buckets


def _model() -> torch.nn.Module:
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(),
                                torch.nn.Linear(16, 1))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def _batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(16, 8, generator=g)
    return x, x.sum(1, keepdim=True).sin()


def _loss(model: torch.nn.Module, step: int, rank: int) -> torch.Tensor:
    x, y = _batch(step, rank)
    return ((model(x) - y) ** 2).mean()


def _train(comm, *, steps: int = 5, bucket_mb: float = 25.0, skip: dict | None = None, poison: dict | None = None):
    """SGD through DDP; ``skip[rank]``: steps at which that worker runs no backward (a NaN loss);
    ``poison[rank]``: steps at which its first-layer gradient holds a NaN (finite loss)."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = {"step": 0}
    if comm.rank in (poison or {}):  # registered before DDP's hooks, so DDP sees the poisoned grad
        def poison_grad(p: torch.Tensor) -> None:
            if state["step"] in poison[comm.rank]:
                p.grad.view(-1)[0] = float("nan")

        model[0].weight.register_post_accumulate_grad_hook(poison_grad)
    algo = DDP(opt, comm, bucket_mb=bucket_mb)
    for step in range(steps):
        state["step"] = step
        if step not in (skip or {}).get(comm.rank, ()):
            _loss(model, step, comm.rank).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return [p.detach().clone() for p in model.parameters()], algo


def test_backward_returns_the_mean_gradient_after_buckets_reduced_during_it():
    def work(comm):
        model = _model()
        local = copy.deepcopy(model)
        _loss(local, 0, comm.rank).backward()  # this worker's own gradient, for the reference mean
        seen = {}
        # The first layer's weight is the last gradient backward produces: by then the buckets of the
        # later layers must already be on the wire.
        model[0].weight.register_post_accumulate_grad_hook(lambda p: seen.update(at_last=comm.stats.collectives))
        algo = DDP(torch.optim.SGD(model.parameters(), lr=0.1), comm, bucket_mb=TINY_BUCKETS)
        before = comm.stats.collectives
        _loss(model, 0, comm.rank).backward()
        return ([p.grad.clone() for p in model.parameters()], [p.grad.clone() for p in local.parameters()],
                seen["at_last"] - before, comm.stats.collectives - before, len(algo.buckets.buckets))

    out = run_local(2, work)
    for grads, _, at_last, total, n_buckets in out:
        assert n_buckets >= 3
        assert total == n_buckets  # one all-reduce per bucket, all done when backward returned
        assert 1 <= at_last < n_buckets  # started while backward was still running
        for g, g0, g1 in zip(grads, out[0][1], out[1][1]):
            torch.testing.assert_close(g, (g0 + g1) / 2, rtol=1e-6, atol=1e-7)


def test_bucket_size_changes_collectives_not_numbers():
    one = run_local(3, lambda c: _train(c, bucket_mb=25.0))
    many = run_local(3, lambda c: _train(c, bucket_mb=TINY_BUCKETS))
    for (p_one, _), (p_many, _) in zip(one, many):
        for a, b in zip(p_one, p_many):
            assert torch.equal(a, b)  # element-wise sums in rank order: bit-identical
    assert torch.equal(one[0][0][0], one[2][0][0])  # replicas identical
    assert not torch.equal(one[0][0][0], _model()[0].weight)  # training moved the weights


@pytest.mark.parametrize("fault", ["poison", "skip"])
def test_one_workers_bad_step_is_skipped_by_every_worker(fault):
    # rank 1 alone: a NaN gradient behind a finite loss (sent as zeros, flag raised) or no backward at
    # all (it sends its buckets from the step hook, flag raised, after the others sent theirs in backward)
    kwargs = {"poison": {1: (2,)}} if fault == "poison" else {"skip": {1: (2,)}}
    got = run_local(2, lambda c: _train(c, bucket_mb=TINY_BUCKETS, **kwargs))
    ref = run_local(2, lambda c: _train(c, bucket_mb=TINY_BUCKETS, skip={0: (2,), 1: (2,)}))
    for (params, algo), (ref_params, _) in zip(got, ref):
        assert algo.flagged_steps == 1 and algo.peer_nonfinite_steps == 0 and algo.skipped_steps == 1
        for p, r in zip(params, ref_params):
            assert torch.equal(p, r)


def test_no_sync_accumulates_locally_and_the_last_backward_reduces_the_sum():
    """Gradient accumulation: two half-batches (the first under no_sync) give the full batch's mean
    gradient on every worker, with the collectives of one step."""
    def work(comm):
        full, accum = _model(), _model()
        DDP(torch.optim.SGD(full.parameters(), lr=0.1), comm)
        algo = DDP(torch.optim.SGD(accum.parameters(), lr=0.1), comm)
        x, y = _batch(0, comm.rank)
        before = comm.stats.collectives
        ((full(x) - y) ** 2).mean().backward()
        one_step = comm.stats.collectives - before
        before = comm.stats.collectives
        with algo.no_sync():
            ((accum(x[:8]) - y[:8]) ** 2).mean().div(2).backward()
        assert comm.stats.collectives == before  # nothing sent for the first micro-batch
        ((accum(x[8:]) - y[8:]) ** 2).mean().div(2).backward()
        return [p.grad.clone() for p in full.parameters()], [p.grad.clone() for p in accum.parameters()], \
            one_step, comm.stats.collectives - before

    for full, accum, one_step, accum_step in run_local(2, work):
        assert accum_step == one_step >= 1
        for a, b in zip(full, accum):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
