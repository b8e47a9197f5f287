"""The memory part of benchmarks/streaming.py: the outer state (φ, momentum, residuals) each algorithm keeps
per worker, with ``outer_device=same`` and ``cpu``."""

from __future__ import annotations

from typing import Any

MEMORY_ALGOS = [("diloco", {}), ("streaming_diloco", {"fragments": 4, "overlap_steps": 0}),
                ("noloco", {}), ("streaming_noloco", {"fragments": 4, "overlap_steps": 0})]


def run_memory(model_keys: list[str], name: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Outer state per worker with outer_device=same and =cpu for the char_lm of ``model_keys`` (described by
    ``name``): its bytes, those on an accelerator and, where CUDA exists, the accelerator's peak allocation
    over two steps with one outer step."""
    import torch

    from dtrain.algorithms import diloco, noloco, streaming, streaming_noloco
    from dtrain.comm.local import LocalGroup
    from dtrain.config import load
    from dtrain.workloads import char_lm

    classes = {"diloco": diloco.DiLoCo, "streaming_diloco": streaming.StreamingDiLoCo, "noloco": noloco.NoLoCo,
               "streaming_noloco": streaming_noloco.StreamingNoLoCo}
    wl = char_lm.build(load(None, model_keys).workload, seed=0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = []
    for algo, kw in MEMORY_ALGOS:
        for where in ("same", "cpu"):
            model = wl.build_model().to(device)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            hook = classes[algo](opt, LocalGroup(1).comm(0), sync_every=4, outer_device=where, **kw)
            for step in range(4):
                batch = [t.to(device) for t in wl.train_batch(step, 0, 1)]
                wl.loss(model, batch).backward()
                opt.step()
                opt.zero_grad()
            rep = hook.report()
            peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
            out.append({"algo": algo, "outer_device": where, "outer_state_bytes": rep["outer_state_bytes"],
                        "outer_state_accelerator_bytes": rep["outer_state_accelerator_bytes"], "accelerator_peak_bytes": peak,
                        "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters())})
            hook.remove()
    return out, {"workload": name, "device": str(device)}


def memory_table(rows: list[dict[str, Any]], setup: dict[str, Any]) -> str:
    lines = [f"outer state per worker ({setup['workload']}; parameters on {setup['device']}"
             + ("" if setup["device"].startswith("cuda") else "; no accelerator here: the accelerator column is bookkeeping "
                "of where each tensor lives, the peak allocation is unmeasured") + ")",
             f"{'algorithm':<18} {'outer_device':>12} {'outer state KB':>14} {'on accelerator KB':>17} {'x params':>8} {'peak alloc MB':>13}"]
    for r in rows:
        peak = f"{r['accelerator_peak_bytes'] / 1e6:13.2f}" if r["accelerator_peak_bytes"] is not None else f"{'-':>13}"
        lines.append(f"{r['algo']:<18} {r['outer_device']:>12} {r['outer_state_bytes'] / 1e3:14.1f} "
                     f"{r['outer_state_accelerator_bytes'] / 1e3:17.1f} {r['outer_state_bytes'] / r['param_bytes']:8.2f} {peak}")
    return "\n".join(lines)
