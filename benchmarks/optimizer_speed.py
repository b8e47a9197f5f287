"""Step time and state memory of the optimizers package against the published packages and AdamW.

    python benchmarks/optimizer_speed.py [--quick] [--out results.json]

For each optimizer three systems step the same model (a few hundred tensors,
~10M parameters, float32, CPU, one thread): ours, its reference package, and
torch.optim.AdamW(foreach=True). Their steps are interleaved round by round so
machine noise hits all three; the table reports median step times and the
median of the per-round ratios. State memory is the persistent optimizer state
(tensors in ``state`` and in param groups, parameters excluded) per parameter.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Callable, Optional

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import optimizers as ours  # noqa: E402

FOREACH = True  # --loop sets False: benchmark the per-tensor path instead

WD = 0.01


def make_shapes(quick: bool) -> list[tuple[int, ...]]:
    """A transformer-like stack: embedding, then blocks of qkv/out/mlp weights, biases and norms."""
    d, blocks, vocab = (64, 4, 1024) if quick else (192, 22, 8192)
    shapes: list[tuple[int, ...]] = [(vocab, d)]
    for _ in range(blocks):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,),
                   (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return shapes + [(d,), (d,)]


class Model:
    """Parameters with fixed gradients, split into a decayed and a non-decayed group."""

    def __init__(self, shapes: list[tuple[int, ...]], seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes]
        self.grads = [torch.randn(s, generator=gen) * 1e-3 for s in shapes]
        for p, g in zip(self.params, self.grads):
            p.grad = g.clone()

    def groups(self, wd_key: str = "weight_decay") -> list[dict[str, Any]]:
        decay = [p for p in self.params if p.dim() > 1]
        rest = [p for p in self.params if p.dim() <= 1]
        return [{"params": decay, wd_key: WD}, {"params": rest, wd_key: 0.0}]

    def reset_grads(self) -> None:
        # some references modify p.grad in place (Schedule-Free divides it): restore before each step
        torch._foreach_copy_([p.grad for p in self.params], self.grads)


def _ref(name: str) -> Optional[Callable[[Model], torch.optim.Optimizer]]:
    try:
        if name == "prodigy":
            from prodigyopt import Prodigy
            return lambda m: Prodigy(m.groups())
        if name == "dadapt_adam":
            from dadaptation import DAdaptAdam
            return lambda m: DAdaptAdam(m.groups(), decouple=True)
        if name == "dadapt_sgd":
            from dadaptation import DAdaptSGD
            return lambda m: DAdaptSGD(m.groups())
        if name in ("dog", "ldog"):
            import dog
            cls = dog.DoG if name == "dog" else dog.LDoG
            return lambda m: cls(m.groups())
        if name == "mechanic":
            from mechanic_pytorch import mechanize
            return lambda m: mechanize(torch.optim.AdamW)(m.groups(), lr=1e-3, foreach=True)
        if name == "schedulefree_adamw":
            from schedulefree import AdamWScheduleFree
            return lambda m: _train(AdamWScheduleFree(m.groups(), foreach=True))
        if name == "schedulefree_sgd":
            from schedulefree import SGDScheduleFree
            return lambda m: _train(SGDScheduleFree(m.groups(), foreach=True))
    except ImportError:
        return None
    return None  # nadamw: AlgoPerf ships no package; AdamW is its comparison


def _train(opt: Any) -> Any:
    opt.train()
    return opt


def _ours(name: str) -> Callable[[Model], torch.optim.Optimizer]:
    if name == "dadapt_adam":
        return lambda m: ours.create(name, m.groups(), decouple=True)
    if name == "mechanic":
        return lambda m: ours.create(name, m.groups(), base_kwargs=dict(lr=1e-3, foreach=True))
    return lambda m: ours.create(name, m.groups(), **({} if FOREACH else {"foreach": False}))


def state_bytes(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> int:
    """Bytes of distinct tensors the optimizer keeps between steps (parameters excluded)."""
    seen = {p.data_ptr() for p in params}
    total = 0

    def walk(x: Any) -> None:
        nonlocal total
        if isinstance(x, torch.Tensor):
            if x.numel() and x.data_ptr() not in seen:
                seen.add(x.data_ptr())
                total += x.numel() * x.element_size()
        elif isinstance(x, dict):
            for k, v in x.items():
                if k != "params":
                    walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        elif isinstance(x, torch.optim.Optimizer):
            walk(x.state)

    walk(opt.state)
    walk(opt.param_groups)
    if hasattr(opt, "base"):  # our Mechanic wraps a base optimizer with its own state
        walk(opt.base)
    return total


def bench_one(name: str, shapes: list[tuple[int, ...]], rounds: int, warmup: int) -> dict[str, Any]:
    systems: dict[str, Callable[[Model], torch.optim.Optimizer]] = {"ours": _ours(name)}
    ref = _ref(name)
    if ref is not None:
        systems["reference"] = ref
    systems["adamw"] = lambda m: torch.optim.AdamW(m.groups(), lr=1e-3, foreach=True)
    models = {k: Model(shapes) for k in systems}
    opts = {k: make(models[k]) for k, make in systems.items()}
    for _ in range(warmup):
        for k in systems:
            models[k].reset_grads()
            opts[k].step()
    cpu: dict[str, list[float]] = {k: [] for k in systems}
    wall: dict[str, list[float]] = {k: [] for k in systems}
    order = list(systems)
    for r in range(rounds):
        for k in order[r % len(order):] + order[:r % len(order)]:  # rotate who goes first
            models[k].reset_grads()
            w0, c0 = time.perf_counter(), time.thread_time()
            opts[k].step()
            cpu[k].append(time.thread_time() - c0)
            wall[k].append(time.perf_counter() - w0)
    n_params = sum(p.numel() for p in models["ours"].params)
    out: dict[str, Any] = {"optimizer": name, "n_params": n_params, "n_tensors": len(shapes)}
    for k in systems:
        out[f"{k}_cpu_ms"] = 1e3 * statistics.median(cpu[k])
        out[f"{k}_wall_ms"] = 1e3 * statistics.median(wall[k])
        out[f"{k}_state_bytes_per_param"] = state_bytes(opts[k], models[k].params) / n_params
    for kind, t in (("cpu", cpu), ("wall", wall)):
        if "reference" in systems:
            out[f"{kind}_ratio_vs_reference"] = statistics.median(a / b for a, b in zip(t["ours"], t["reference"]))
        out[f"{kind}_ratio_vs_adamw"] = statistics.median(a / b for a, b in zip(t["ours"], t["adamw"]))
    return out


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small model, few rounds (smoke run)")
    ap.add_argument("--out", default="", help="write results as JSON to this path")
    ap.add_argument("--rounds", type=int, default=0, help="timed rounds per optimizer (default 25, quick 3)")
    ap.add_argument("--only", default="", help="comma-separated optimizer names")
    ap.add_argument("--loop", action="store_true", help="time our per-tensor path (foreach=False)")
    args = ap.parse_args(argv)
    global FOREACH
    FOREACH = not args.loop
    torch.set_num_threads(1)  # shared machine; also makes the comparison per core
    torch.set_flush_denormal(True)  # decaying moments must not hit the slow denormal path in one system only
    shapes = make_shapes(args.quick)
    rounds = args.rounds or (3 if args.quick else 25)
    warmup = 1 if args.quick else 3
    names = [n for n in args.only.split(",") if n] or list(ours.OPTIMIZERS)
    results = []
    head = (f"{'optimizer':<20}{'ours ms':>9}{'ref ms':>9}{'adamw ms':>9}{'vs ref':>8}{'vs adamw':>9}"
            f"{'wall vs ref':>12}{'wall vs adamw':>14}{'B/param':>9}{'ref B/p':>9}")
    print(f"{sum(torch.Size(s).numel() for s in shapes) / 1e6:.1f}M parameters in {len(shapes)} tensors, "
          f"float32, CPU, 1 thread, {rounds} interleaved rounds; ms = median thread CPU time per step, "
          f"ratios = median of per-round ratios{' (ours: foreach=False)' if args.loop else ''}")
    print(head)
    print("-" * len(head))
    for name in names:
        r = bench_one(name, shapes, rounds, warmup)
        results.append(r)
        has_ref = "reference_cpu_ms" in r
        ref_ms = f"{r['reference_cpu_ms']:9.1f}" if has_ref else f"{'-':>9}"
        vs_ref = f"{r['cpu_ratio_vs_reference']:7.2f}x" if has_ref else f"{'-':>8}"
        wall_ref = f"{r['wall_ratio_vs_reference']:11.2f}x" if has_ref else f"{'-':>12}"
        ref_b = f"{r['reference_state_bytes_per_param']:9.1f}" if has_ref else f"{'-':>9}"
        print(f"{name:<20}{r['ours_cpu_ms']:9.1f}{ref_ms}{r['adamw_cpu_ms']:9.1f}{vs_ref}"
              f"{r['cpu_ratio_vs_adamw']:8.2f}x{wall_ref}{r['wall_ratio_vs_adamw']:13.2f}x"
              f"{r['ours_state_bytes_per_param']:9.1f}{ref_b}", flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"torch": torch.__version__, "threads": 1, "rounds": rounds, "quick": args.quick,
                   "ours_foreach": FOREACH, "results": results}, f, indent=2)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
