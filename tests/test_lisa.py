"""LISA: what trains, what is frozen, that frozen blocks hold no grad/state, and that replicas agree."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from dist_utils import train

from dtrain import checkpoint, config
from dtrain.algorithms.base import AttachContext
from dtrain.algorithms.lisa import LISA, sample_blocks
from dtrain.optim import param_groups
from dtrain.train import run
from dtrain.workloads.char_lm import GPT

REPO = Path(__file__).resolve().parents[1]
TINY = ["workload.d_model=16", "workload.n_head=2", "workload.seq_len=16", "workload.batch_size=4",
        "workload.eval_batches=1", "workload.eval_batch_size=4", "progress=false", "plot=false", "threads=1"]


def tiny_gpt(n_layer: int = 6, seed: int = 0) -> GPT:
    torch.manual_seed(seed)  # test-only: library code never touches the global RNG
    return GPT(vocab=32, seq_len=8, n_layer=n_layer, n_head=2, d_model=16)


def adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2, foreach=True)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randint(0, 32, (4, 9), generator=g)
    return x[:, :-1], x[:, 1:]


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    x, y = batch(step)
    F.cross_entropy(model(x).reshape(-1, 32), y.reshape(-1)).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def outside_params(model: GPT) -> list[torch.Tensor]:
    inside = {id(p) for p in model.blocks.parameters()}
    return [p for p in model.parameters() if id(p) not in inside]


def test_gamma_blocks_train_frozen_blocks_hold_no_grad_or_state() -> None:
    model = tiny_gpt()
    opt = adamw(model)
    lisa = LISA(opt, None, model=model, blocks="blocks", gamma=2, interval=3, seed=7)
    before = {id(p): p.detach().clone() for p in model.parameters()}
    for step in range(12):
        x, y = batch(step)
        F.cross_entropy(model(x).reshape(-1, 32), y.reshape(-1)).backward()
        active = [i for i, b in enumerate(model.blocks) if any(p.requires_grad for p in b.parameters())]
        assert active == lisa.active and len(active) == 2
        for i, block in enumerate(model.blocks):
            for p in block.parameters():
                assert p.requires_grad == (i in active) and (p.grad is not None) == (i in active)
        assert all(p.requires_grad and p.grad is not None for p in outside_params(model))
        opt.step()
        for i, block in enumerate(model.blocks):
            for p in block.parameters():
                moved = not torch.equal(p.detach(), before[id(p)])
                if i not in active:
                    assert not moved and p not in opt.state
                    assert p.grad is None
        assert all(not torch.equal(p.detach(), before[id(p)]) for p in outside_params(model))
        before = {id(p): p.detach().clone() for p in model.parameters()}
        opt.zero_grad(set_to_none=True)
        if (step + 1) % 3 != 0:
            assert lisa.active == active  # no switch inside a window
    # Exactly the state of the outside params and of the current blocks that already stepped.
    assert [s for s, _ in lisa.history] == [0, 3, 6, 9, 12]
    assert lisa.history[-1][1] == sample_blocks(6, 2, seed=7, switch=4)
    assert len({tuple(b) for _, b in lisa.history}) > 1  # blocks really change
    frozen_ids = {id(p) for p in lisa.frozen_params()}
    assert all(id(p) not in frozen_ids for p in opt.state)


def test_optimizer_state_bytes_fall_to_gamma_blocks() -> None:
    model, full = tiny_gpt(n_layer=8), tiny_gpt(n_layer=8)
    opt, opt_full = adamw(model), adamw(full)
    LISA(opt, None, model=model, blocks="blocks", gamma=2, interval=100, seed=0)
    for step in range(2):
        train_step(model, opt, step)
        train_step(full, opt_full, step)

    def state_numel(o: torch.optim.Optimizer) -> int:
        return sum(v.numel() for s in o.state.values() for k, v in s.items() if k != "step")

    per_block = sum(p.numel() for p in model.blocks[0].parameters())
    outside = sum(p.numel() for p in outside_params(model))
    assert state_numel(opt_full) == 2 * (outside + 8 * per_block)
    assert state_numel(opt) == 2 * (outside + 2 * per_block)  # exp_avg + exp_avg_sq, no frozen block


def test_state_dropped_on_freeze_or_offloaded_and_restored() -> None:
    for offload in (False, True):
        model = tiny_gpt(n_layer=4)
        opt = adamw(model)
        lisa = LISA(opt, None, model=model, blocks="blocks", gamma=1, interval=2, seed=3, offload_state=offload)
        seen: dict[int, torch.Tensor] = {}  # block -> exp_avg of its qkv weight when last frozen
        restored = fresh = 0
        for step in range(40):
            prev = list(lisa.active)
            train_step(model, opt, step)
            for b in prev:
                if b not in lisa.active:
                    kept = lisa.state_dict()["offloaded"].get(lisa._index[id(model.blocks[b].qkv.weight)], {}).get("exp_avg")
                    seen[b] = None if kept is None else kept.clone()
                    assert model.blocks[b].qkv.weight not in opt.state
            for b in lisa.active:
                if b not in prev and b in seen:
                    w = model.blocks[b].qkv.weight
                    if offload:
                        assert torch.equal(opt.state[w]["exp_avg"], seen[b])
                        restored += 1
                    else:
                        assert w not in opt.state and seen[b] is None  # re-initialised on its next step
                        fresh += 1
        assert (restored if offload else fresh) > 0


def test_resume_continues_the_sampling_sequence_and_weights() -> None:
    def make() -> tuple[GPT, torch.optim.Optimizer, LISA]:
        model = tiny_gpt(n_layer=5)
        opt = adamw(model)
        return model, opt, LISA(opt, None, model=model, blocks="blocks", gamma=2, interval=4, seed=11, offload_state=True)

    ref_model, ref_opt, ref = make()
    for step in range(22):
        train_step(ref_model, ref_opt, step)
    model, opt, lisa = make()
    for step in range(10):
        train_step(model, opt, step)
    saved = {"model": model.state_dict(), "opt": opt.state_dict(), "lisa": lisa.state_dict()}
    model, opt, lisa = make()  # fresh objects, as after a restart
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    lisa.load_state_dict(saved["lisa"])
    for step in range(10, 22):
        train_step(model, opt, step)
    assert lisa.history == ref.history and lisa.step == ref.step == 22
    for a, b in zip(model.parameters(), ref_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_sampling_uses_its_own_generator_and_probabilities() -> None:
    rng = torch.get_rng_state()
    draws = [sample_blocks(10, 3, seed=5, switch=k) for k in range(20)]
    assert torch.equal(rng, torch.get_rng_state())
    assert draws == [sample_blocks(10, 3, seed=5, switch=k) for k in range(20)]
    assert draws != [sample_blocks(10, 3, seed=6, switch=k) for k in range(20)]
    assert all(len(set(d)) == 3 for d in draws)
    probs = [0.0, 0.0, 0.7, 0.3]
    assert all(sample_blocks(4, 2, seed=0, switch=k, probabilities=probs) == [2, 3] for k in range(10))
    counts = torch.zeros(4)
    for k in range(400):
        counts[sample_blocks(4, 1, seed=0, switch=k, probabilities=[0.1, 0.2, 0.3, 0.4])] += 1
    assert torch.allclose(counts / 400, torch.tensor([0.1, 0.2, 0.3, 0.4]), atol=0.07)


@pytest.mark.parametrize("override, key", [
    ({"blocks": "transformer.h"}, "lisa.blocks"), ({"blocks": "head"}, "lisa.blocks"),
    ({"gamma": 7}, "lisa.gamma"), ({"probabilities": [0.5, 0.5]}, "lisa.probabilities"),
    ({"probabilities": [0.2] * 6}, "lisa.probabilities"), ({"probabilities": [0.5, 0.5, 0, 0, 0, 0], "gamma": 3}, "lisa.probabilities"),
])
def test_bad_settings_name_the_key(override: dict, key: str) -> None:
    model = tiny_gpt()
    ctx = AttachContext(model=model, optimizer=adamw(model), comm=None, seed=0, total_steps=10, lr=1e-3)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")) as e:
        LISA.attach(dict(override), ctx)  # what dtrain train calls, with the lisa section
    assert "\n" not in str(e.value)


def test_block_missing_from_optimizer_is_refused() -> None:
    model = tiny_gpt()
    model.blocks[3].requires_grad_(False)  # frozen before the optimizer is built: the LMFlow/axolotl pitfall
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model.blocks[3].requires_grad_(True)
    with pytest.raises(ValueError, match=r"blocks \[3\] are not in the optimizer"):
        LISA(opt, None, model=model, blocks="blocks")


def test_explicit_step_without_hook_and_remove() -> None:
    model = tiny_gpt(n_layer=4)
    opt = adamw(model)
    lisa = LISA(opt, None, model=model, gamma=1, interval=2, hook_optimizer=False)
    train_step(model, opt, 0)
    assert lisa.step == 0  # not hooked
    lisa.step_done()
    lisa.step_done()
    assert lisa.step == 2 and len(lisa.history) == 2
    lisa.remove()
    assert all(p.requires_grad for p in model.parameters())


def _ckpt(out: Path, rank: int, step: int) -> dict:
    return checkpoint.load(out, rank, step)


@pytest.mark.timeout(180)
def test_torchrun_ddp_replicas_draw_the_same_blocks(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    summary = train(2, "configs/lisa.yaml", out, "algo.name=ddp", "workload.n_layer=6", "lisa.interval=5", "lisa.gamma=2",
                    "steps=30", "ckpt_every=30", "eval_every=30", *TINY, timeout=150)
    # DDP reduces only requires_grad params: the wire carries outside params + 2 blocks (+ its flag).
    ref = GPT(vocab=256, seq_len=16, n_layer=6, n_head=2, d_model=16)
    trained = sum(p.numel() for p in outside_params(ref)) + 2 * sum(p.numel() for p in ref.blocks[0].parameters())
    assert summary["comm"]["max"]["payload_bytes"] == 30 * 4 * (trained + 1)
    saved = [_ckpt(out, r, 30) for r in (0, 1)]
    hist = [s["lisa"]["history"] for s in saved]
    assert hist[0] == hist[1] and [s for s, _ in hist[0]] == list(range(0, 31, 5))
    assert hist[0] == [[5 * k, sample_blocks(6, 2, seed=0, switch=k)] for k in range(7)]
    for a, b in zip(saved[0]["model"].values(), saved[1]["model"].values(), strict=True):
        assert torch.equal(a, b)  # DDP averaged exactly the active blocks' grads on both ranks
    n_state = len(saved[0]["optimizer"]["state"])
    assert n_state <= 5 + 2 * 12  # outside params + at most gamma blocks (12 tensors each)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("outer", ["diloco", "noloco"])
def test_local_diloco_resume_matches_uninterrupted(tmp_path: Path, outer: str) -> None:
    common = [f"algo.name={outer}", "algo.sync_every=5", "comm.name=local", "comm.workers=2", "workload.n_layer=5",
              "lisa.interval=4", "lisa.offload_state=true", "optim.schedule=constant", "optim.warmup_steps=0",
              "eval_every=100", "ckpt_every=10", *TINY]
    whole = tmp_path / "whole"
    run(config.load(REPO / "configs/lisa.yaml", [*common, "steps=20", f"out_dir={whole}"]))
    part = tmp_path / "part"
    run(config.load(REPO / "configs/lisa.yaml", [*common, "steps=10", f"out_dir={part}"]))
    run(config.load(REPO / "configs/lisa.yaml", [*common, "steps=20", f"out_dir={part}", "resume=true"]))
    for rank in (0, 1):
        a, b = _ckpt(whole, rank, 20), _ckpt(part, rank, 20)
        assert a["lisa"]["history"] == b["lisa"]["history"] and len(a["lisa"]["history"]) == 6
        for x, y in zip(a["model"].values(), b["model"].values(), strict=True):
            assert torch.equal(x, y)


def test_hugging_face_gpt2_and_llama_blocks() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=4, n_embd=32, n_head=2, vocab_size=64, n_positions=16))
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=4, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=64, max_position_embeddings=16))
    for model, path, always in ((gpt2, "transformer.h", ("transformer.wte", "transformer.ln_f")),
                                (llama, "model.layers", ("model.embed_tokens", "model.norm", "lm_head"))):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        lisa = LISA(opt, None, model=model, blocks=path, gamma=2, interval=2, seed=1)
        layers = lisa.block_list
        for step in range(5):
            ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(step))
            model(input_ids=ids, labels=ids).loss.backward()
            names = {n for n, p in model.named_parameters() if p.grad is not None}
            assert all(any(n.startswith(a) for n in names) for a in always)
            assert [i for i, blk in enumerate(layers) if any(p.grad is not None for p in blk.parameters())] == lisa.active
            opt.step()
            opt.zero_grad(set_to_none=True)
            assert not any(p in opt.state for p in lisa.frozen_params())
        assert len(lisa.history) == 3


def test_optimizers_package_composes() -> None:
    optimizers = pytest.importorskip("optimizers")
    names = list(getattr(optimizers, "OPTIMIZERS", ()))
    if not names:
        pytest.skip("optimizers package has no OPTIMIZERS registry yet")
    for name in names:
        model = tiny_gpt(n_layer=4)
        opt = optimizers.create(name, param_groups(model, 0.0))  # each optimizer's own defaults
        if hasattr(opt, "train"):
            opt.train()  # schedule-free optimizers
        lisa = LISA(opt, None, model=model, gamma=1, interval=2, seed=0)
        for step in range(5):
            train_step(model, opt, step)
            assert not any(p in opt.state and opt.state[p] for p in lisa.frozen_params()), name
        assert all(torch.isfinite(p).all() for p in model.parameters()), name


def test_the_documented_manual_stepping_and_step_count() -> None:
    model = tiny_gpt(n_layer=4)
    opt = adamw(model)
    lisa = LISA(opt, None, model=model, gamma=1, interval=2, hook_optimizer=False)
    from dtrain.algorithms import lisa as lisa_module

    assert "lisa.step()" not in lisa_module.__doc__ and "lisa.step_done()" in lisa_module.__doc__
    for step in range(4):
        train_step(model, opt, step)
        lisa.step_done()  # what the module docstring tells a user without the hook to call
    assert isinstance(lisa.step, int) and lisa.step == 4 and [s for s, _ in lisa.history] == [0, 2, 4]


def test_lisa_with_spsa_perturbs_only_the_active_blocks() -> None:
    from dtrain.algorithms.spsa import SPSA
    from dtrain.comm.local import run_local

    def work(comm):
        model = tiny_gpt(n_layer=4)
        opt = SPSA(model.parameters(), comm, lr=1e-3, check_every=0)
        lisa = LISA(opt, comm, model=model, gamma=1, interval=2, seed=5)  # hooks SPSA's own step
        moved_frozen = False
        for step in range(6):
            frozen = {id(p): p.detach().clone() for p in lisa.frozen_params()}
            x, y = batch(step + comm.rank)
            opt.step(lambda: F.cross_entropy(model(x).reshape(-1, 32), y.reshape(-1)))
            moved_frozen |= any(not torch.equal(p, frozen[id(p)]) for p in model.parameters() if id(p) in frozen)
        return moved_frozen, lisa.history, opt.params_digest()

    out = run_local(2, work)
    assert not any(m for m, _, _ in out) and out[0][1] == out[1][1] and len(out[0][1]) == 4
    assert out[0][2] == out[1][2]  # replicas identical
