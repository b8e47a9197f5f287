"""hf_causal_lm (issue 17): HF GPT-2/Llama from a config or a local folder, tokenizers, data formats,
every algorithm under real torchrun, exact resume, bf16, grad_accum, activation checkpointing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from dist_utils import train  # noqa: E402
from dtrain import checkpoint  # noqa: E402
from dtrain.algorithms.lisa import find_blocks, resolve_blocks  # noqa: E402
from dtrain.config import ConfigError, load  # noqa: E402
from dtrain.train import run  # noqa: E402
from dtrain.workloads import hf_causal_lm, hf_data  # noqa: E402
from dtrain.workloads.corpus import default_corpus  # noqa: E402

TINY = ["workload.name=hf_causal_lm", "workload.n_layer=2", "workload.hidden_size=32", "workload.n_head=2",
        "workload.seq_len=32", "workload.batch_size=8", "workload.eval_batches=2", "workload.eval_batch_size=8"]
LOCAL = ["comm.name=local", "ckpt_every=0", "progress=false", "plot=false", "threads=1", "optim.warmup_steps=0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    """A small text file (a slice of the embedded corpus) and a shared cache folder for its token shards."""
    root = tmp_path_factory.mktemp("hf_data")
    text = root / "corpus.txt"
    text.write_text(default_corpus()[:150_000], encoding="utf-8")
    return {"path": str(text), "cache": str(root / "cache")}


def keys(data: dict[str, str], *extra: str) -> list[str]:
    return [*TINY, f"workload.data_path={data['path']}", f"workload.cache_dir={data['cache']}", *extra]


def workload(data: dict[str, str], *extra: str) -> hf_causal_lm.HFCausalLM:
    cfg = load(None, keys(data, *extra))
    return hf_causal_lm.build(cfg.workload, seed=cfg.seed)


# -- under torchrun: every algorithm -----------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("algo", [
    ["algo=[ddp]"],
    ["algo=[diloco]", "algo.sync_every=3"],
    ["algo=[noloco]", "algo.sync_every=3"],
    ["algo=[lisa,ddp]", "workload.model_type=llama", "workload.n_layer=3", "lisa.gamma=1", "lisa.interval=3"],
], ids=["ddp", "diloco", "noloco", "lisa-llama"])
def test_torchrun_two_workers_train(tmp_path: Path, data: dict[str, str], algo: list[str]) -> None:
    summary = train(2, "configs/hf_causal_lm.yaml", tmp_path / "run", *keys(data, *algo), "steps=8", "eval_every=8",
                    "ckpt_every=0", "optim.warmup_steps=0", "optim.lr=0.01", timeout=380)
    assert summary["workload"] == "hf_causal_lm" and summary["world_size"] == 2 and summary["steps"] == 8
    assert summary["eval"]["value"] < summary["eval"]["initial"] - 0.3  # it learns
    assert summary["comm"]["max"]["bytes_sent"] > 0
    if "algo=[lisa,ddp]" in algo:  # LISA found model.layers of the Llama by itself and switched blocks
        assert summary["algorithms"] == ["lisa", "ddp"]
        lisa = [w["lisa"] for w in summary["workers"]]
        assert lisa[0]["switches"] == 3 and len(lisa[0]["active_blocks"]) == 1  # draws at steps 0, 3, 6
        assert lisa[0]["history"] == lisa[1]["history"]  # both replicas drew the same blocks
        assert lisa[0]["trainable_params"] < lisa[0]["total_params"]


@pytest.mark.timeout(200)
def test_spsa_one_worker_runs(tmp_path: Path, data: dict[str, str]) -> None:
    summary = run(load(None, keys(data, "algo.name=spsa", "comm.workers=1", "steps=6", "eval_every=6",
                                  f"out_dir={tmp_path}", *LOCAL)))
    assert summary["algorithm"] == "spsa" and summary["steps"] == 6
    assert torch.isfinite(torch.tensor(summary["final_loss"]))


# -- resume --------------------------------------------------------------------------------------

@pytest.mark.timeout(300)
def test_resume_is_bit_identical(tmp_path: Path, data: dict[str, str]) -> None:
    common = keys(data, "algo.name=diloco", "algo.sync_every=3", "comm.workers=2", "optim.schedule=constant",
                  "eval_every=100", *LOCAL, "ckpt_every=4")
    whole, part = tmp_path / "whole", tmp_path / "part"
    run(load(None, [*common, "steps=8", f"out_dir={whole}"]))
    run(load(None, [*common, "steps=4", f"out_dir={part}"]))
    summary = run(load(None, [*common, "steps=8", f"out_dir={part}", "resume=true"]))
    assert summary["resumed_from"] == 4
    for rank in (0, 1):
        a, b = checkpoint.load(whole, rank, 8), checkpoint.load(part, rank, 8)
        for name, x in a["model"].items():
            assert torch.equal(x, b["model"][name]), f"rank {rank} {name} differs after resume"
    assert json.loads((whole / "summary.json").read_text())["eval"]["value"] == summary["eval"]["value"]


def test_batches_are_a_pure_function_of_seed_step_rank(data: dict[str, str]) -> None:
    a, b = workload(data), workload(data)
    for step, rank in ((0, 0), (5, 1), (5, 0)):
        assert all(torch.equal(x, y) for x, y in zip(a.train_batch(step, rank, 2), b.train_batch(step, rank, 2)))
    assert not torch.equal(a.train_batch(5, 0, 2)[0], a.train_batch(5, 1, 2)[0])
    assert isinstance(a.train_data, np.memmap) and a.train_data.dtype == np.uint16  # on disk, not in memory
    x, y = a.train_batch(3, 0, 2)
    assert x.shape == (8, 32) and torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one


def test_init_comes_from_the_run_seed_only(data: dict[str, str]) -> None:
    w = workload(data, "workload.model_type=llama")
    torch.manual_seed(1)
    m1 = w.build_model()
    after = torch.rand(1)
    torch.manual_seed(2)
    m2 = w.build_model()
    torch.manual_seed(1)
    assert torch.equal(torch.rand(1), after)  # the caller's global RNG is left as it was
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))
    other = hf_causal_lm.build(w.cfg, seed=1).build_model()
    assert not torch.equal(next(m1.parameters()), next(other.parameters()))


# -- tokenizers and data formats -----------------------------------------------------------------

def test_bpe_is_trained_once_and_reused_from_its_cache(data: dict[str, str], tmp_path: Path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    calls = []
    real = hf_data.train_bpe
    monkeypatch.setattr(hf_data, "train_bpe", lambda docs, size: calls.append(size) or real(docs, size))
    extra = ["workload.tokenizer=bpe", "workload.bpe_vocab_size=400", f"workload.cache_dir={cache}"]
    first = workload(data, *extra)
    (file,) = cache.glob("bpe-*-v400-*.json")
    mtime = file.stat().st_mtime_ns
    second = workload(data, *extra)
    assert calls == [400] and file.stat().st_mtime_ns == mtime  # trained once, then read from the cache
    assert first.tokenizer.vocab_size == second.tokenizer.vocab_size == 400
    assert len(first.train_data) < 0.8 * len(workload(data).train_data)  # merges make fewer tokens than bytes
    text = "Return the number of items."
    assert first.tokenizer.decode(first.tokenizer.encode(text)) == text
    assert second.sample(second.build_model(), length=5).prompt  # decodes a prompt


def test_a_local_tokenizer_folder(data: dict[str, str], tmp_path: Path) -> None:
    bpe = workload(data, "workload.tokenizer=bpe", "workload.bpe_vocab_size=400")
    folder = tmp_path / "tok"
    transformers.PreTrainedTokenizerFast(tokenizer_object=bpe.tokenizer.tok, eos_token=hf_data.EOS_TOKEN).save_pretrained(folder)
    local = workload(data, f"workload.tokenizer={folder}")
    assert local.tokenizer.vocab_size == 400 and local.tokenizer.eos_id == bpe.tokenizer.eos_id
    assert (local.train_data == bpe.train_data).all()  # the same tokens as the BPE it was saved from
    assert local.sample(local.build_model(), length=4).continuation is not None


def test_jsonl_and_save_to_disk_give_the_same_tokens(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    docs = [p for p in default_corpus()[:60_000].split("\n\n") if p]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"body": docs}).save_to_disk(str(saved))
    common = [*TINY, "workload.text_field=body", f"workload.cache_dir={tmp_path / 'cache'}"]
    built = []
    for path in (jsonl, saved):
        cfg = load(None, [*common, f"workload.data_path={path}"])
        built.append(hf_causal_lm.build(cfg.workload, seed=0))
    a, b = built
    assert len(a.train_data) + len(a.val_data) == sum(len(d.encode()) + 1 for d in docs)  # bytes + one end-of-document each
    assert (a.train_data == b.train_data).all() and (a.val_data == b.val_data).all()
    with pytest.raises(ValueError, match="workload.text_field=.text. is missing"):
        hf_causal_lm.build(load(None, [*TINY, f"workload.data_path={jsonl}", f"workload.cache_dir={tmp_path / 'c2'}"]).workload, seed=0)


def test_folder_and_glob_of_text_files(tmp_path: Path) -> None:
    text = default_corpus()[:40_000]
    (tmp_path / "d").mkdir()
    for i, part in enumerate((text[:20_000], text[20_000:])):
        (tmp_path / "d" / f"{i}.txt").write_text(part)
    folder = workload({"path": str(tmp_path / "d"), "cache": str(tmp_path / "c")})
    globbed = workload({"path": str(tmp_path / "d" / "*.txt"), "cache": str(tmp_path / "c")})
    assert (folder.train_data == globbed.train_data).all() and len(folder.train_data) > 30_000


def test_model_path_reads_a_local_save_pretrained_folder(tmp_path: Path, data: dict[str, str]) -> None:
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=300, n_positions=64)
    torch.manual_seed(0)
    saved = transformers.GPT2LMHeadModel(config)
    saved.save_pretrained(tmp_path / "ckpt")
    w = workload(data, f"workload.model_path={tmp_path / 'ckpt'}")
    model = w.build_model()
    assert all(torch.equal(p, q) for p, q in zip(saved.state_dict().values(), model.state_dict().values()))
    assert model.config.resid_pdrop == 0.0  # dropout off: resume stays exact
    summary = run(load(None, keys(data, f"workload.model_path={tmp_path / 'ckpt'}", "algo.name=none", "comm.workers=1",
                                  "steps=4", "eval_every=4", f"out_dir={tmp_path / 'run'}", *LOCAL)))
    assert summary["eval"]["value"] < summary["eval"]["initial"]


@pytest.mark.parametrize("path", ["gpt2", "openai-community/gpt2", "meta-llama/Llama-3.2-1B"])
def test_a_hub_name_is_refused_in_one_line(path: str) -> None:
    with pytest.raises(ConfigError) as e:
        load(None, ["workload.name=hf_causal_lm", f"workload.model_path={path}"])
    msg = str(e.value)
    assert msg.startswith(f"workload.model_path={path} is not a local folder and dtrain does not download")
    assert "--local-dir" in msg and "\n" not in msg
    with pytest.raises(ValueError, match="dtrain does not download"):  # a library user building without dtrain.config
        hf_causal_lm.HFCausalLM(hf_causal_lm.Config(model_path=path), seed=0)


@pytest.mark.parametrize("override, message", [
    ("workload.hidden_size=30", "workload.hidden_size (30) must be divisible by workload.n_head (4)"),
    ("workload.data_path=/no/such/file.txt", "workload.data_path=/no/such/file.txt does not exist"),
    ("workload.model_type=bert_like", "workload.model_type='bert_like' has no size keys"),
    ("workload.d_model=64", "unknown key workload.d_model"),
    ("workload.val_fraction=1.5", "workload.val_fraction must be in (0, 1)"),
    ("workload.tokenizer=gpt2", "workload.tokenizer=gpt2 is not a local folder and dtrain does not download"),
])
def test_bad_keys_are_one_line(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load(None, ["workload.name=hf_causal_lm", override])
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


# -- step options ------------------------------------------------------------------------------

@pytest.mark.timeout(200)
def test_bf16_and_grad_accum_run(tmp_path: Path, data: dict[str, str]) -> None:
    common = keys(data, "algo.name=none", "comm.workers=1", "steps=4", "eval_every=4", *LOCAL)
    fp32 = run(load(None, [*common, f"out_dir={tmp_path / 'fp32'}"]))
    bf16 = run(load(None, [*common, "precision=bf16", f"out_dir={tmp_path / 'bf16'}"]))
    accum = run(load(None, [*common, "grad_accum=2", f"out_dir={tmp_path / 'accum'}"]))
    assert bf16["final_loss"] != fp32["final_loss"] and abs(bf16["final_loss"] - fp32["final_loss"]) < 0.05 * fp32["final_loss"]
    assert abs(accum["final_loss"] - fp32["final_loss"]) < 1e-4 * fp32["final_loss"]  # same trajectory, smaller forwards
    ckpt = run(load(None, [*common, "workload.gradient_checkpointing=true", f"out_dir={tmp_path / 'ckpt'}"]))
    assert abs(ckpt["final_loss"] - fp32["final_loss"]) < 1e-5 * fp32["final_loss"]  # recomputed, not changed


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_gradient_checkpointing_gives_the_same_loss_and_grads(data: dict[str, str], model_type: str) -> None:
    grads = []
    for on in ("false", "true"):
        w = workload(data, f"workload.model_type={model_type}", f"workload.gradient_checkpointing={on}")
        model = w.build_model()
        calls = []
        mlp = resolve_blocks(model, find_blocks(model))[0].mlp
        forward = mlp.forward
        mlp.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)  # module hooks stay silent in a recompute
        loss = w.loss(model, w.train_batch(0, 0, 1))
        loss.backward()
        assert len(calls) == (2 if on == "true" else 1)  # checkpointed: the block's forward runs again in backward
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (l0, g0), (l1, g1) = grads
    assert torch.allclose(l0, l1, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-5) for a, b in zip(g0, g1))


def test_model_config_passes_other_attributes(data: dict[str, str]) -> None:
    model = workload(data, "workload.model_config.layer_norm_epsilon=0.001").build_model()
    assert model.config.layer_norm_epsilon == 0.001 and model.config.n_embd == 32 and model.config.vocab_size == 257


def test_lisa_finds_hf_blocks(data: dict[str, str]) -> None:
    assert find_blocks(workload(data).build_model()) == "transformer.h"
    assert find_blocks(workload(data, "workload.model_type=llama").build_model()) == "model.layers"


def test_evaluate_reports_perplexity_and_sample_decodes(data: dict[str, str]) -> None:
    w = workload(data)
    model = w.build_model()
    result = w.evaluate(model)
    assert result["perplexity"] == pytest.approx(float(torch.tensor(result["val_loss"]).exp()), rel=1e-6)
    assert result["val_loss"] == pytest.approx(torch.log(torch.tensor(257.0)).item(), rel=0.1)  # an untrained model guesses
    s = w.sample(model, length=10, seed=3)
    assert s.length == 10 and s == w.sample(model, length=10, seed=3)  # deterministic in the seed


def test_the_readme_section_names_real_keys_and_its_command_loads(data: dict[str, str]) -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("### Hugging Face causal LMs"):]
    section = section[:section.index("\n### ")]
    fields = set(hf_causal_lm.Config.__dataclass_fields__)
    table_keys = {k for row in section.splitlines() if row.startswith("| `") for k in re.findall(r"`(\w+)`", row.split("|")[1])}
    assert table_keys and table_keys <= fields
    command = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1).replace("\\\n", " ").split()
    config, overrides = command[command.index("train") + 1], command[command.index("train") + 2:]
    overrides = [f"workload.data_path={data['path']}" if o.startswith("workload.data_path=") else o for o in overrides]
    cfg = load(Path(__file__).resolve().parents[1] / config, overrides)
    assert cfg.workload.model_type == "llama" and cfg.lisa is not None and cfg.algo.name == "diloco"
