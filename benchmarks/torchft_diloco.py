"""torchft's DiLoCo beside dtrain's, on the frontier workload (optional: pip install -e ".[compare]").

The driver starts torchft's lighthouse on loopback and N replica groups of one process each; every
replica builds the char_lm model of configs/frontier.yaml from the same seed, reads the same batches
dtrain's worker of that rank reads (`CharLM.train_batch(step, rank, N)`), and trains with the same
inner step (AdamW with dtrain's defaults, linear warm-up then cosine to min_lr_ratio, clip 1.0) under
``torchft.local_sgd.DiLoCo`` (outer SGD, Nesterov) with a torchft ``Manager`` over ``ProcessGroupGloo``.
torchft counts no bytes, so bytes per worker come from its schedule under dtrain's cost model: one
fp32 all-reduce of the model per outer step, 2(N-1)/N of it out of each worker (a ring).

    python benchmarks/torchft_diloco.py [--quick] [--workers 4] [--h 100] [--steps 1500] [--batch 16] [--out ...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from common import REPO, table, write_outputs

QUICK = {"n_layer": 1, "d_model": 32, "n_head": 2, "seq_len": 32, "eval_batches": 2, "eval_batch_size": 8}


def _workload(args: argparse.Namespace):
    from dtrain.config import load
    from dtrain.workloads import char_lm

    base = load(REPO / "configs/frontier.yaml")
    fields = {k: base.workload[k] for k in ("n_layer", "d_model", "n_head", "seq_len", "eval_batches", "eval_batch_size")}
    fields.update(QUICK if args.quick else {})
    cfg = char_lm.Config(**fields, batch_size=args.batch or base.workload.batch_size)
    return char_lm.CharLM(cfg, seed=args.seed), base.optim


def replica(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from torchft import Manager, ProcessGroupGloo
    from torchft.local_sgd import DiLoCo

    torch.set_num_threads(1)
    work, optim_cfg = _workload(args)
    model = work.build_model()
    from dtrain.optim import param_groups

    # dtrain's AdamW: betas (0.9, 0.95), no weight decay on biases and norms
    inner = torch.optim.AdamW(param_groups(model, optim_cfg.weight_decay), lr=args.lr, betas=(0.9, 0.95))
    warm, floor = optim_cfg.warmup_steps if not args.quick else 4, optim_cfg.min_lr_ratio

    def factor(step: int) -> float:  # dtrain's cosine schedule (dtrain.optim)
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, args.steps - warm)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    sched = torch.optim.lr_scheduler.LambdaLR(inner, factor)
    outer = torch.optim.SGD(model.parameters(), lr=args.outer_lr, momentum=args.outer_momentum, nesterov=True)
    store = dist.TCPStore(host_name="localhost", port=0, is_master=True, wait_for_workers=False)
    manager = Manager(pg=ProcessGroupGloo(timeout=timedelta(seconds=600)), min_replica_size=args.workers,
                      use_async_quorum=False, load_state_dict=lambda sd: model.load_state_dict(sd["model"]),
                      state_dict=lambda: {"model": model.state_dict()}, replica_id=str(args.rank), store_addr="localhost",
                      store_port=store.port, rank=0, world_size=1, lighthouse_addr=args.lighthouse,
                      timeout=timedelta(seconds=600), quorum_timeout=timedelta(seconds=600))
    times = []
    with DiLoCo(manager, [model], inner, outer, sync_every=args.h, backup_device=torch.device("cpu"), pin_memory=False):
        for step in range(args.steps):
            t0 = time.perf_counter()
            loss = work.loss(model, work.train_batch(step, args.rank, args.workers))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
            inner.step()
            sched.step()
            inner.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
    val = work.evaluate(model)["val_loss"]
    params = sum(p.numel() for p in model.parameters())
    outer_steps = manager.current_step()
    manager.shutdown(wait=False)
    Path(args.worker_out).write_text(json.dumps({"rank": args.rank, "val_loss": val, "outer_steps": outer_steps,
                                                 "params": params, "step_s": statistics.median(times),
                                                 "train_s": sum(times)}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 replicas, a 1x32 model, 20 steps, H=5")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--h", type=int, default=100)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=16, help="sequences per worker (default: the small regime's)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--outer-lr", type=float, default=0.7)
    p.add_argument("--outer-momentum", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nice", type=int, default=10)
    p.add_argument("--with-dtrain", action="store_true", help="also run dtrain's DiLoCo at the same point under torchrun")
    p.add_argument("--out", default=None)
    p.add_argument("--replica", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--lighthouse", default="", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.replica:
        replica(args)
        return 0
    try:
        from torchft._torchft import LighthouseServer
    except ImportError as e:
        raise SystemExit(f"torchft is not installed ({e}); pip install -e '.[compare]'") from None
    if args.quick:
        args.workers, args.steps, args.h, args.batch, args.nice = 2, 20, 5, 4, 0
    lighthouse = LighthouseServer(bind="[::]:0", min_replicas=args.workers)
    t0 = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    with tempfile.TemporaryDirectory(prefix="dtrain-torchft-") as tmp:
        procs = []
        for rank in range(args.workers):
            cmd = [*(["nice", "-n", str(args.nice)] if args.nice else []), sys.executable, str(Path(__file__).resolve()),
                   "--replica", "--rank", str(rank), "--lighthouse", lighthouse.address(), "--worker-out", f"{tmp}/{rank}.json",
                   *[a for a in sys.argv[1:] if a not in ("--replica", "--with-dtrain")]]
            if args.quick:
                cmd += ["--workers", "2", "--steps", "20", "--h", "5", "--batch", "4"]
            # a file, not a pipe: replicas log a lot, and a full pipe nobody reads yet blocks its writer
            with open(f"{tmp}/{rank}.log", "w") as log:
                procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True))
        while any(proc.poll() is None for proc in procs):  # one replica failing leaves the others waiting on it
            if any(proc.returncode for proc in procs):
                for proc in procs:
                    proc.kill()
            time.sleep(1)
        if any(proc.returncode for proc in procs):
            bad = next(i for i, proc in enumerate(procs) if proc.returncode)
            log = Path(f"{tmp}/{bad}.log").read_text()
            raise SystemExit(f"torchft replica {bad} failed ({procs[bad].returncode}):\n{log[-3000:]}")
        reps = [json.loads(Path(f"{tmp}/{r}.json").read_text()) for r in range(args.workers)]
    lighthouse.shutdown()
    params, outer_steps = reps[0]["params"], reps[0]["outer_steps"]
    sent = outer_steps * math.ceil(2 * (args.workers - 1) * params * 4 / args.workers)
    row = {"method": "torchft DiLoCo", "H": args.h, "workers": args.workers, "steps": args.steps, "batch": args.batch,
           "val_loss": statistics.mean(r["val_loss"] for r in reps), "outer_steps": outer_steps,
           "bytes_sent_per_worker": sent, "step_s": statistics.mean(r["train_s"] for r in reps) / args.steps,
           "wall_s": time.perf_counter() - t0}
    rows = [row]
    if args.with_dtrain:  # dtrain's DiLoCo at the same point, as processes under torchrun too
        from frontier_runs import Run, Runner

        extra = tuple(f"workload.{k}={v}" for k, v in QUICK.items()) + ("optim.warmup_steps=4",) if args.quick else ()
        hp = {"lr": args.lr, "outer_lr": args.outer_lr, "outer_momentum": args.outer_momentum}
        run = Run("diloco", args.h, tuple(sorted(hp.items())), workers=args.workers, seed=args.seed, steps=args.steps,
                  batch=args.batch, extra=extra, launcher="torchrun")
        t1 = time.perf_counter()
        res = Runner(cache=None, nice=args.nice).one(run)
        rows.append({"method": "dtrain DiLoCo", "H": args.h, "workers": args.workers, "steps": args.steps, "batch": args.batch,
                     "val_loss": res["val_loss"], "outer_steps": res["algorithm"].get("outer_syncs"),
                     "bytes_sent_per_worker": res["bytes_sent_per_worker"], "step_s": res["train_time_s"] / args.steps,
                     "wall_s": time.perf_counter() - t1})
    text = table(rows, [("method", "method"), ("H", "H"), ("workers", "N"), ("steps", "steps"), ("val_loss", "val loss"),
                         ("outer_steps", "outer steps"), ("bytes_sent_per_worker", "bytes/worker (schedule)"),
                         ("step_s", "train s/step"), ("wall_s", "wall s")])
    text += ("\n\ntorchft counts no bytes: its row is its schedule under dtrain's cost model (one fp32 ring all-reduce of "
             "the model per outer step); dtrain's row is its comm's counter. Same model, data, inner step, schedule and H.")
    write_outputs(args.out, {"quick": args.quick, "row": row, "rows": rows, "replicas": reps}, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
