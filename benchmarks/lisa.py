"""LISA vs full AdamW fine-tuning vs LoRA (peft, r=8 and r=64) on a pretrained char_lm.

A char_lm GPT is first pretrained on the stdlib docstring corpus, then fine-tuned on held-out
text of another domain: stdlib *code* with docstrings and comments removed (``ast.unparse`` of
each top-level statement, one paragraph each), written to a temp file and hashed. Every
system fine-tunes the same checkpoint for the same steps in its own fresh process (so that
peak RSS is its own) and reports exact bytes of parameters, gradients and optimizer state
(the largest seen at any step), peak process memory, median step time, and final validation
loss.

Run:  .venv/bin/python benchmarks/lisa.py --out benchmarks/results/lisa.json | tee benchmarks/results/lisa.txt
      .venv/bin/python benchmarks/lisa.py --quick        (a smaller model, for a smoke check)
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import multiprocessing as mp
import resource
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

SYSTEMS = ("full", "lisa", "lora8", "lora64")
CODE_FILES = ("argparse.py", "ast.py", "calendar.py", "configparser.py", "csv.py", "dataclasses.py", "difflib.py",
              "enum.py", "fractions.py", "functools.py", "gettext.py", "heapq.py", "inspect.py", "ipaddress.py",
              "locale.py", "logging/__init__.py", "optparse.py", "pprint.py", "shutil.py", "statistics.py",
              "string.py", "subprocess.py", "tarfile.py", "textwrap.py", "threading.py", "typing.py", "zipfile/__init__.py")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def _strip_docstrings(tree: ast.AST) -> None:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]


def finetune_text(path: Path, *, max_bytes: int) -> str:
    """Stdlib code without docstrings or comments (read as files, never imported); its sha256."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts: list[str] = []
    for name in CODE_FILES:
        f = root / name
        if not f.is_file():
            continue
        tree = ast.parse(f.read_text(encoding="utf-8", errors="replace"))
        _strip_docstrings(tree)
        parts.extend(ast.unparse(node) for node in tree.body)
    text = "\n\n".join(parts).encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
    path.write_text(text, encoding="utf-8")
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _workload(args: argparse.Namespace, data_path: str):
    from dtrain.workloads import char_lm

    cfg = char_lm.Config(data_path=data_path, seq_len=args.seq_len, batch_size=args.batch_size, n_layer=args.n_layer,
                         n_head=args.n_head, d_model=args.d_model, eval_batches=args.eval_batches, eval_batch_size=32)
    return char_lm.build(cfg, seed=args.seed)


def _schedule(opt, *, steps: int, warmup: int):
    import torch

    from dtrain.optim import lr_lambda

    cfg = argparse.Namespace(warmup_steps=warmup, schedule="cosine", min_lr_ratio=0.1)
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, steps))


def pretrain(args: argparse.Namespace, ckpt: Path) -> dict[str, Any]:
    import torch

    from dtrain.optim import param_groups

    torch.set_num_threads(args.threads)
    wl = _workload(args, "")  # the stdlib docstring corpus
    model = wl.build_model()
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=3e-3, betas=(0.9, 0.95), foreach=True)
    sched = _schedule(opt, steps=args.pretrain_steps, warmup=20)
    t0 = time.perf_counter()
    for step in range(args.pretrain_steps):
        wl.loss(model, wl.train_batch(step, 0, 1)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
    torch.save(model.state_dict(), ckpt)
    return {"steps": args.pretrain_steps, "val_loss_docstrings": wl.evaluate(model)["val_loss"], "seconds": time.perf_counter() - t0}


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def finetune(system: str, args: argparse.Namespace, ckpt: str, data_path: str) -> dict[str, Any]:
    import torch

    from dtrain.algorithms.lisa import LISA
    from dtrain.optim import param_groups

    torch.set_num_threads(args.threads)
    wl = _workload(args, data_path)
    model = wl.build_model()
    model.load_state_dict(torch.load(ckpt, weights_only=True))
    initial = wl.evaluate(model)["val_loss"]
    lr = args.lr
    if system.startswith("lora"):
        from peft import LoraConfig, get_peft_model

        rank = int(system[4:])
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                 target_modules=["qkv", "proj", "mlp.0", "mlp.2"]))
        lr = args.lora_lr
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=lr,
                            betas=(0.9, 0.95), foreach=True)
    lisa = LISA(opt, None, model=model, blocks="blocks", gamma=args.gamma, interval=args.interval, seed=args.seed) if system == "lisa" else None
    sched = _schedule(opt, steps=args.steps, warmup=10)
    params = list(model.parameters())
    peak_grad = peak_state = peak_trainable = 0
    rss_start = _rss_bytes()
    times = []
    for step in range(args.steps):
        t0 = time.perf_counter()
        wl.loss(model, wl.train_batch(step, 0, 1)).backward()
        grads = [p.grad for p in params if p.grad is not None]
        torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], 1.0)
        opt.step()
        times.append(time.perf_counter() - t0)
        peak_grad = max(peak_grad, _tensor_bytes(grads))
        peak_state = max(peak_state, _tensor_bytes(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)))
        peak_trainable = max(peak_trainable, sum(p.numel() for p in params if p.requires_grad))
        opt.zero_grad(set_to_none=True)
        sched.step()
    final = wl.evaluate(model)["val_loss"]
    return {
        "system": system, "lr": lr, "initial_val_loss": initial, "final_val_loss": final,
        "param_bytes": _tensor_bytes(params), "grad_bytes": peak_grad, "optimizer_state_bytes": peak_state,
        "trainable_params_peak": peak_trainable, "peak_rss_bytes": _peak_rss_bytes(),
        "rss_growth_bytes": _peak_rss_bytes() - rss_start, "step_time_s": statistics.median(times[5:] or times),
        "lisa_switches": len(lisa.history) if lisa else None,
    }


def _child(system: str, args: argparse.Namespace, ckpt: str, data_path: str, queue) -> None:
    queue.put(finetune(system, args, ckpt, data_path))


def _in_fresh_process(fn, *fargs) -> Any:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=fn, args=(*fargs, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def _pretrain_child(args: argparse.Namespace, ckpt: Path, queue) -> None:
    queue.put(pretrain(args, ckpt))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small model and few steps (smoke check)")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--n-layer", type=int, default=12)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--steps", type=int, default=200, help="fine-tuning steps, the same for every system")
    ap.add_argument("--lr", type=float, default=1e-3, help="full and LISA fine-tuning peak lr")
    ap.add_argument("--lora-lr", type=float, default=3e-3, help="LoRA peak lr (low-rank adapters take a larger one)")
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--gamma", type=int, default=2)
    ap.add_argument("--interval", type=int, default=20)
    ap.add_argument("--eval-batches", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    args = ap.parse_args()
    if args.quick:
        args.n_layer, args.d_model, args.pretrain_steps, args.steps, args.eval_batches = 8, 64, 60, 40, 4
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "finetune.txt"
        sha = finetune_text(data, max_bytes=1_500_000)
        ckpt = Path(tmp) / "pretrained.pt"
        pre = _in_fresh_process(_pretrain_child, args, ckpt)
        rows = [_in_fresh_process(_child, s, args, str(ckpt), str(data)) for s in args.systems.split(",")]
    table(rows, args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                                        "finetune_text_sha256": sha, "pretrain": pre, "results": rows,
                                        "checks": checks(rows, args)}, indent=2))


def checks(rows: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    by = {r["system"]: r for r in rows}
    if "full" not in by or "lisa" not in by:
        return {}
    from dtrain.workloads.char_lm import GPT

    model = GPT(vocab=256, seq_len=args.seq_len, n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model)
    inside = {id(p) for p in model.blocks.parameters()}
    outside = sum(p.numel() for p in model.parameters() if id(p) not in inside)
    full, lisa = by["full"], by["lisa"]
    gs = lambda r: r["grad_bytes"] + r["optimizer_state_bytes"]  # noqa: E731
    outside_share = 3 * 4 * outside  # fp32 grad + AdamW exp_avg + exp_avg_sq
    bound = (args.gamma + 2) / args.n_layer * gs(full) + outside_share
    return {
        "lisa_grad_state_bytes": gs(lisa), "full_grad_state_bytes": gs(full), "bound_bytes": bound,
        "memory_goal_met": gs(lisa) <= bound, "loss_ratio_lisa_vs_full": lisa["final_val_loss"] / full["final_val_loss"],
        "loss_goal_met": lisa["final_val_loss"] <= 1.05 * full["final_val_loss"],
    }


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    full = next((r for r in rows if r["system"] == "full"), rows[0])
    mb = 1 / 2**20
    print(f"char_lm fine-tuning: n_layer={args.n_layer} d_model={args.d_model} seq_len={args.seq_len} batch={args.batch_size} "
          f"steps={args.steps} (pretrained {args.pretrain_steps}) LISA gamma={args.gamma} K={args.interval}")
    head = f"{'system':8} {'params MB':>9} {'grads MB':>8} {'optim MB':>8} {'g+o vs full':>11} {'trainable':>10} " \
           f"{'peak RSS MB':>11} {'step ms':>8} {'step vs full':>12} {'val loss':>8} {'loss vs full':>12}"
    print(head)
    print("-" * len(head))
    for r in rows:
        gs = r["grad_bytes"] + r["optimizer_state_bytes"]
        gs_full = full["grad_bytes"] + full["optimizer_state_bytes"]
        print(f"{r['system']:8} {r['param_bytes'] * mb:9.2f} {r['grad_bytes'] * mb:8.2f} {r['optimizer_state_bytes'] * mb:8.2f} "
              f"{gs / gs_full:11.3f} {r['trainable_params_peak']:10,d} {r['peak_rss_bytes'] * mb:11.1f} "
              f"{r['step_time_s'] * 1e3:8.1f} {r['step_time_s'] / full['step_time_s']:12.2f} {r['final_val_loss']:8.4f} "
              f"{r['final_val_loss'] / full['final_val_loss']:12.3f}")
    c = checks(rows, args)
    if c:
        print(f"initial val loss (pretrained, before fine-tuning): {full['initial_val_loss']:.4f}")
        print(f"goal: LISA grad+optim <= (gamma+2)/L * full + embedding/head share = {c['bound_bytes'] * mb:.2f} MB: "
              f"{c['lisa_grad_state_bytes'] * mb:.2f} MB -> {'met' if c['memory_goal_met'] else 'NOT met'}")
        print(f"goal: LISA final val loss within 5% of full: ratio {c['loss_ratio_lisa_vs_full']:.3f} -> "
              f"{'met' if c['loss_goal_met'] else 'NOT met'}")


if __name__ == "__main__":
    main()
