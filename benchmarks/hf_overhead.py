"""`dtrain train` on a Hugging Face GPT-2 against a plain hand-written loop: dtrain's per-step overhead.

Both sides run 2 gloo workers under torchrun (loopback, one torch thread each) on the same model
(the hf_causal_lm workload's random-init GPT-2 from seed 0), the same batches (its
``train_batch(step, rank, world)``), AdamW with the same hyperparameters (decay on matrices only),
clipping at 1.0 and a constant learning rate. dtrain's side is ``dtrain train`` with ``algo=[ddp]``
(its own gradient all-reduce hook, logging, NaN guards, scheduler); the plain side is a textbook
loop around ``torch.nn.parallel.DistributedDataParallel``. The two alternate as whole jobs, ``--repeats``
times each, the order flipped every repeat, so drift on a shared machine hits both alike. A job's
step time is rank 0's wall time per step from step ``--warmup`` to the last step, batch making
included, evaluation and start-up excluded (dtrain: from the wall clock of its metrics.jsonl rows).
The ratio is the median over repeat pairs of dtrain's step time over the plain loop's.

    python benchmarks/hf_overhead.py [--quick] [--repeats 4] [--out benchmarks/results/hf_overhead.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import REPO, free_port, table, torchrun_train, write_outputs

LR = 3e-3
WEIGHT_DECAY = 0.1


def _workload_keys(args: argparse.Namespace) -> dict[str, Any]:
    return {"model_type": "gpt2", "n_layer": args.n_layer, "n_head": args.n_head, "hidden_size": args.hidden,
            "seq_len": args.seq_len, "batch_size": args.batch, "cache_dir": args.cache, "data_path": args.data}


def _plain_worker(args: argparse.Namespace) -> None:
    """The hand-written loop (one process of the torchrun job): what a user writes without dtrain."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from dtrain.workloads import hf_causal_lm

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    work = hf_causal_lm.HFCausalLM(hf_causal_lm.Config(**_workload_keys(args)), seed=0)
    model = work.build_model()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": rest, "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, 0.95), eps=1e-8, foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    t_warm = 0.0
    loss = torch.zeros(())
    for step in range(args.steps):
        if step == args.warmup:
            t_warm = time.perf_counter()
        x, y = work.train_batch(step, rank, world)
        logits = ddp(input_ids=x, use_cache=False).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    step_s = (time.perf_counter() - t_warm) / (args.steps - args.warmup)
    if rank == 0:
        Path(args.worker_out).write_text(json.dumps({"step_s": step_s, "final_loss": loss.item()}))
    # Tear down together (as dtrain's torch comm does): a rank destroying gloo while its peer still
    # finishes DDP's last reduction can abort at exit ("terminate called without an active exception").
    del ddp
    dist.barrier()
    dist.destroy_process_group()


def _plain(args: argparse.Namespace, tmp: Path, i: int) -> dict[str, Any]:
    out = tmp / f"plain{i}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.workers), "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), str(Path(__file__).resolve()), "--worker", "--worker-out", str(out),
           *_passthrough(args)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"hf_overhead plain loop failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def _dtrain(args: argparse.Namespace, tmp: Path, i: int) -> dict[str, Any]:
    out = tmp / f"dtrain{i}"
    keys = [f"workload.{k}={v}" for k, v in _workload_keys(args).items() if v != ""]  # `key=` would read as null
    summary = torchrun_train(args.workers, "configs/hf_causal_lm.yaml", out, [
        *keys, "algo=[ddp]", f"steps={args.steps}", f"eval_every={args.steps}", f"log_every={args.log_every}",
        "workload.eval_batches=1", "ckpt_every=0", "threads=1", "seed=0", f"optim.lr={LR}", f"optim.weight_decay={WEIGHT_DECAY}",
        "optim.schedule=constant", "optim.warmup_steps=0", "optim.grad_clip=1.0"])
    rows = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r}
    step_s = (rows[args.steps]["wall_s"] - rows[args.warmup]["wall_s"]) / (args.steps - args.warmup)
    return {"step_s": step_s, "final_loss": summary["final_loss"]}


def _passthrough(args: argparse.Namespace) -> list[str]:
    return ["--n-layer", str(args.n_layer), "--n-head", str(args.n_head), "--hidden", str(args.hidden), "--seq-len",
            str(args.seq_len), "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--cache", args.cache, "--data", args.data]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a 1x32 model, 12 steps, one repeat (a smoke run)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8, help="sequences per worker per step")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--warmup", type=int, default=20, help="steps before timing starts (a multiple of --log-every)")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=4, help="jobs per side, alternating")
    parser.add_argument("--cache", default="", help="token cache folder (default: a temporary one)")
    parser.add_argument("--data", default="", help="workload.data_path (default: the embedded corpus; --quick: a slice of it)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _plain_worker(args)
        return 0
    if args.quick:
        args.n_layer, args.n_head, args.hidden, args.seq_len, args.batch = 1, 2, 32, 32, 4
        args.steps, args.warmup, args.log_every, args.repeats = 12, 4, 4, 1
    if args.warmup % args.log_every or args.steps % args.log_every or args.warmup >= args.steps:
        parser.error("--warmup and --steps must be multiples of --log-every, and --warmup < --steps")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dtrain-hf-overhead-") as tmp_name:
        tmp = Path(tmp_name)
        args.cache = args.cache or str(tmp / "cache")
        if args.quick and not args.data:  # a small file: tokenizing the whole corpus would dominate a smoke run
            from dtrain.workloads.corpus import default_corpus

            args.data = str(tmp / "corpus.txt")
            Path(args.data).write_text(default_corpus()[:100_000], encoding="utf-8")
        runs: dict[str, list[dict[str, Any]]] = {"dtrain": [], "plain": []}
        for i in range(args.repeats):
            for side in (("dtrain", "plain") if i % 2 == 0 else ("plain", "dtrain")):
                runs[side].append((_dtrain if side == "dtrain" else _plain)(args, tmp, i))
    tokens = args.workers * args.batch * args.seq_len  # per step, all workers
    ratios = [d["step_s"] / p["step_s"] for d, p in zip(runs["dtrain"], runs["plain"])]
    rows = []
    for side in ("plain", "dtrain"):
        step_s = statistics.median(r["step_s"] for r in runs[side])
        rows.append({"side": side, "step_s": step_s, "tokens_per_s": tokens / step_s,
                     "step_s_min": min(r["step_s"] for r in runs[side]), "step_s_max": max(r["step_s"] for r in runs[side]),
                     "final_loss": runs[side][0]["final_loss"]})
    ratio = statistics.median(ratios)
    text = table(rows, [("side", "loop"), ("step_s", "s/step (median)"), ("step_s_min", "min"), ("step_s_max", "max"),
                        ("tokens_per_s", "tokens/s"), ("final_loss", "final loss (rank 0)")])
    text += (f"\n\ndtrain/plain step time: {ratio:.3f} (median of {len(ratios)} repeat pairs; min {min(ratios):.3f}, "
             f"max {max(ratios):.3f}; goal <= 1.05)\n{args.workers} gloo workers, GPT-2 {args.n_layer}x{args.hidden} "
             f"({args.n_head} heads), byte tokenizer, {args.batch}x{args.seq_len} tokens per worker per step, AdamW, clip 1.0, "
             f"constant lr; steps {args.warmup}..{args.steps} timed. Wall {time.perf_counter() - t0:.0f}s.")
    write_outputs(args.out, {"workers": args.workers, "n_layer": args.n_layer, "hidden": args.hidden, "seq_len": args.seq_len,
                             "batch": args.batch, "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
                             "quick": args.quick, "ratio": ratio, "ratios": ratios, "rows": rows, "runs": runs}, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
