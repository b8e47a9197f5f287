"""Shared-seed SPSA: memory against inference and AdamW, bytes against DDP, loss against workers.

1. Memory. One char_lm GPT (~57M parameters at the full size, so weights dominate) and one
   batch; each of {inference forward, SPSA step, backprop + AdamW step} runs in its own fresh
   process. After the model is built, the process's peak-RSS mark is reset (``echo 5 >
   /proc/self/clear_refs`` resets VmHWM on Linux), the operation runs three times, and we
   report VmHWM minus the RSS before the model was built: weights plus everything the step
   needs. glibc's mmap threshold is pinned (MALLOC_MMAP_THRESHOLD_) so freed buffers go back
   to the OS and RSS tracks live memory. AdamW runs with foreach=False (its leanest form).
2. Bytes per worker per step, from the backend's own counters (`comm.stats`), for SPSA and for
   DDP (gradient all-reduce) on the same model, N workers as threads (`run_local`).
3. Validation loss after a fixed number of SPSA steps with 1, 2 and 4 workers (one
   perturbation each; plus one worker with 4 perturbations: the same forwards on one machine),
   on a small char_lm model, first pretrained briefly with AdamW (SPSA is a fine-tuner).

Run:  .venv/bin/python benchmarks/spsa.py --out benchmarks/results/spsa.json | tee benchmarks/results/spsa.txt
      .venv/bin/python benchmarks/spsa.py --quick
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
FULL = {"d_model": 768, "n_layer": 8, "n_head": 12, "seq_len": 128, "batch": 4, "loss_steps": 300, "pretrain": 200}
QUICK = {"d_model": 256, "n_layer": 4, "n_head": 4, "seq_len": 64, "batch": 4, "loss_steps": 40, "pretrain": 40}
LOSS_MODEL = {"n_layer": 2, "n_head": 2, "d_model": 64}  # small char_lm: the loss study is about workers, not size
LOSS_LR = 5e-4
MODES = ("inference", "spsa", "adamw")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def _model(size: dict[str, int], seed: int = 0) -> torch.nn.Module:
    from dtrain.workloads.base import generator
    from dtrain.workloads.char_lm import GPT, init_weights

    model = GPT(vocab=256, seq_len=size["seq_len"], n_layer=size["n_layer"], n_head=size["n_head"], d_model=size["d_model"])
    init_weights(model, generator(seed, "init"))
    return model


def _batch(size: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (size["batch"], size["seq_len"] + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def _loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))


def _operation(mode: str, model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> Any:
    from dtrain.algorithms.spsa import SPSA
    from dtrain.comm.local import LocalGroup

    if mode == "inference":
        def op() -> None:
            with torch.no_grad():
                _loss(model, batch)
    elif mode == "spsa":
        opt = SPSA(model.parameters(), LocalGroup(1).comm(0), lr=1e-5, check_every=0)

        def op() -> None:
            opt.step(lambda: _loss(model, batch))
    else:
        adamw = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)

        def op() -> None:
            _loss(model, batch).backward()
            adamw.step()
            adamw.zero_grad(set_to_none=True)
    return op


def child(mode: str, size: dict[str, int]) -> dict[str, Any]:
    """One memory measurement in this (fresh) process."""
    torch.set_num_threads(1)
    # Warm up on a tiny model first: lazy imports, kernels and thread pools are not the step's memory.
    tiny = {**size, "d_model": 32, "n_layer": 1, "n_head": 2}
    _operation(mode, _model(tiny), _batch(tiny))()
    batch = _batch(size)
    gc.collect()
    base = _rss()
    model = _model(size)
    params = sum(p.numel() for p in model.parameters())
    weights = _rss() - base
    op = _operation(mode, model, batch)
    op()  # the first step allocates optimizer state (AdamW) like every later step would hold
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM: the peak below is this operation's, not model building's
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        op()
        times.append(time.perf_counter() - t0)
    return {"mode": mode, "params": params, "weights_bytes": weights, "peak_bytes": _hwm() - base,
            "step_s": min(times), "grads_allocated": any(p.grad is not None for p in model.parameters())}


def measure_memory(size: dict[str, int]) -> list[dict[str, Any]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = []
    for mode in MODES:
        proc = subprocess.run([sys.executable, __file__, "--child", mode, "--size", json.dumps(size)],
                              capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"{mode} child failed:\n{proc.stderr[-3000:]}")
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


def measure_bytes(size: dict[str, int], workers: int) -> dict[str, Any]:
    """Training-step bytes per worker from comm.stats (setup broadcasts excluded)."""
    from dtrain.algorithms.ddp import DDP
    from dtrain.algorithms.spsa import SPSA
    from dtrain.comm.local import run_local

    small = {**size, "batch": 1, "seq_len": 16}  # compute does not change bytes

    def spsa(comm) -> dict[str, float]:
        model = _model(small)
        opt = SPSA(model.parameters(), comm, lr=1e-5, check_every=0)
        before = comm.stats.copy()
        opt.step(lambda: _loss(model, _batch(small)))
        return (comm.stats - before).as_dict()

    def ddp(comm) -> dict[str, float]:
        model = _model(small)
        sgd = torch.optim.SGD(model.parameters(), lr=1e-5)  # bytes do not depend on the inner optimizer
        DDP(sgd, comm)
        before = comm.stats.copy()
        _loss(model, _batch(small)).backward()
        sgd.step()
        return (comm.stats - before).as_dict()

    spsa_stats = run_local(workers, spsa)[0]
    gc.collect()
    ddp_stats = run_local(workers, ddp)[0]
    return {"workers": workers, "spsa": spsa_stats, "ddp": ddp_stats}


def measure_loss(steps: int, pretrain: int) -> list[dict[str, Any]]:
    from dtrain.algorithms.spsa import SPSA
    from dtrain.comm.local import run_local
    from dtrain.workloads.char_lm import Config, build

    torch.set_num_threads(1)
    workload = build(Config(**LOSS_MODEL), seed=0)
    base = workload.build_model()
    adamw = torch.optim.AdamW(base.parameters(), lr=3e-3)
    for step in range(pretrain):
        workload.loss(base, workload.train_batch(10_000 + step, 0, 1)).backward()
        adamw.step()
        adamw.zero_grad(set_to_none=True)
    start_state = {k: v.clone() for k, v in base.state_dict().items()}
    start_eval = workload.evaluate(base)["val_loss"]
    rows = []
    for workers, k in ((1, 1), (2, 1), (4, 1), (1, 4)):
        def work(comm, k=k):
            model = workload.build_model()
            model.load_state_dict(start_state)
            opt = SPSA(model.parameters(), comm, lr=LOSS_LR, eps=1e-3, perturbations=k, check_every=50)
            stats = comm.stats.copy()  # training bytes only (the init broadcast excluded)
            t0 = time.perf_counter()
            for step in range(steps):
                batch = workload.train_batch(step, comm.rank, comm.world_size)
                opt.step(lambda b=batch: workload.loss(model, b))
            return {"val_loss": workload.evaluate(model)["val_loss"], "wall_s": time.perf_counter() - t0,
                    "digest": opt.params_digest().hex(), "resyncs": opt.resyncs,
                    "payload_bytes": (comm.stats - stats).payload_bytes}

        out = run_local(workers, work)
        rows.append({"workers": workers, "perturbations": k, "steps": steps, "start_val_loss": start_eval,
                     "val_loss": out[0]["val_loss"], "wall_s": out[0]["wall_s"],
                     "replicas_identical": len({o["digest"] for o in out}) == 1,
                     "resyncs": max(o["resyncs"] for o in out), "payload_bytes_per_worker": out[0]["payload_bytes"]})
    return rows


def _mb(n: float) -> str:
    return f"{n / 2**20:8.1f}"


def table(result: dict[str, Any]) -> str:
    lines = []
    mem = {r["mode"]: r for r in result["memory"]}
    inf = mem["inference"]
    lines.append(f"Memory: char_lm GPT, {inf['params'] / 1e6:.1f}M params, batch {result['size']['batch']}x"
                 f"{result['size']['seq_len']}; peak RSS above the pre-model baseline, fresh process each, 1 thread")
    lines.append(f"{'mode':<10} {'weights MB':>10} {'peak MB':>8} {'vs inference':>12} {'step s':>7} {'.grad':>6}")
    for mode in MODES:
        r = mem[mode]
        lines.append(f"{mode:<10} {_mb(r['weights_bytes']):>10} {_mb(r['peak_bytes']):>8} "
                     f"{r['peak_bytes'] / inf['peak_bytes']:>11.2f}x {r['step_s']:>7.2f} {str(r['grads_allocated']):>6}")
    b = result["bytes"]
    lines.append("")
    lines.append(f"Bytes per worker per training step, {b['workers']} workers, same model (backend counters)")
    lines.append(f"{'system':<8} {'payload':>12} {'sent':>12} {'recv':>12} {'sent vs SPSA':>13}")
    for name in ("spsa", "ddp"):
        s = b[name]
        lines.append(f"{name:<8} {int(s['payload_bytes']):>12} {int(s['bytes_sent']):>12} {int(s['bytes_recv']):>12} "
                     f"{s['bytes_sent'] / max(b['spsa']['bytes_sent'], 1):>12.0f}x")
    lines.append("")
    first = result["loss"][0]
    lines.append(f"SPSA validation loss after {first['steps']} steps (char_lm {LOSS_MODEL}, from an AdamW-pretrained "
                 f"start at {first['start_val_loss']:.4f}; lr {LOSS_LR:g}, eps 1e-3; hash check every 50 steps)")
    lines.append(f"{'workers':>7} {'K':>3} {'val_loss':>9} {'drop':>8} {'bytes/worker':>12} {'identical':>9} {'resyncs':>7} {'wall s':>7}")
    for r in result["loss"]:
        lines.append(f"{r['workers']:>7} {r['perturbations']:>3} {r['val_loss']:>9.4f} {r['start_val_loss'] - r['val_loss']:>8.4f} "
                     f"{r['payload_bytes_per_worker']:>12} {str(r['replicas_identical']):>9} {r['resyncs']:>7} {r['wall_s']:>7.1f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller model and fewer steps (smoke check)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--workers", type=int, default=4, help="workers for the bytes comparison")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, json.loads(args.size))))
        return
    size = QUICK if args.quick else FULL
    result = {"size": size, "memory": measure_memory(size)}
    result["bytes"] = measure_bytes(size, args.workers)
    result["loss"] = measure_loss(size["loss_steps"], size["pretrain"])
    text = table(result)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
