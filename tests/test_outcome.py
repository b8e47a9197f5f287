"""What a finished run tells its user: the done lines (target distance, bytes against DDP, a sample),
the same facts in summary.json, and loss.png's panels."""

import json

import pytest
import torch
from torch import nn

from dtrain import config
from dtrain.cli import main
from dtrain.outcome import ddp_equivalent, done_lines, end_facts
from dtrain.report import si_bytes
from dtrain.plots import draw_loss
from dtrain.workloads.char_lm import CharLM, Config, generate

TEXT = "\n\n".join(f"Return the value of item {i} from the table, or None when it is missing." for i in range(400))


@pytest.fixture
def lm(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return CharLM(Config(data_path=str(path), seq_len=16, n_layer=1, n_head=2, d_model=16, val_fraction=0.2), seed=3)


def test_sample_is_deterministic_for_a_seed_and_has_the_requested_length(lm):
    model = lm.build_model().train()
    a, b = lm.sample(model, length=40, seed=7), lm.sample(model, length=40, seed=7)
    assert a == b and a.length == 40 and a.seed == 7
    assert model.training  # the caller's mode is given back
    assert a.prompt and a.prompt.encode() in bytes(lm.val_data.tolist())  # from the validation text
    assert lm.sample(model, length=40, seed=8) != a
    # 40 bytes past a 16-byte context: the window slides, every byte is generated
    out = generate(model, torch.tensor(list(b"Return ")), length=40, context=16, gen=torch.Generator(), temperature=0.0)
    assert out.shape == (40,)
    assert torch.equal(out, generate(model, torch.tensor(list(b"Return ")), length=40, context=16,
                                     gen=torch.Generator().manual_seed(99), temperature=0.0))  # greedy ignores the seed


def test_ddp_equivalent_is_the_ring_all_reduce_formula():
    model = nn.Sequential(nn.Linear(10, 5), nn.Linear(5, 2).half())  # 55 fp32 + 12 fp16 parameters
    got = ddp_equivalent(model, workers=4, steps=300)
    assert got["bytes_per_worker"] == round((55 * 4 + 12 * 2) * 2 * 3 / 4 * 300) == 109_800
    assert got["params"] == 67
    assert ddp_equivalent(model, workers=1, steps=300)["bytes_per_worker"] == 0


def _summary(*, value, reached=False, world=4, sent=12_300_000, higher=False, metric="val_loss", target=2.0):
    return {"algorithms": ["noloco"], "workload": "char_lm", "world_size": world, "steps": 300, "wall_s": 90.0,
            "eval": {"metric": metric, "value": value, "target": target, "higher_is_better": higher},
            "reached_target": reached, "time_to_target_s": 80.5 if reached else None,
            "comm": {"max": {"bytes_sent": sent}}, "ddp_equivalent_bytes": 1_040_000_000,
            "ddp_equivalent_basis": {"params": 866_667, "bytes_per_param": 4.0, "steps": 300},
            "sample": None}


def test_done_lines_say_how_far_from_the_target_and_what_ddp_would_have_sent():
    lines = done_lines(_summary(value=2.41), out_dir="runs/x", plot=True)
    assert "val loss 2.410, target 2.0 not reached (+0.410)" in lines[0]
    assert "reached=" not in "\n".join(lines)
    assert lines[1].startswith("comm: sent 12.3 MB per worker; DDP would have sent ~1.04 GB for these 300 steps (85x more;")
    assert "estimate from the model size" in lines[1]
    assert lines[-1] == "summary: runs/x/summary.json; plot: runs/x/loss.png"
    assert "target 2.0 reached after 80.5s" in done_lines(_summary(value=1.9, reached=True), out_dir="r", plot=False)[0]
    acc = done_lines(_summary(value=0.91, higher=True, metric="val_accuracy", target=0.95), out_dir="r", plot=False)
    assert "val accuracy 0.910, target 0.95 not reached (-0.040)" in acc[0]
    assert "one worker" in done_lines(_summary(value=2.5, world=1, sent=0), out_dir="r", plot=False)[1]
    s = _summary(value=2.41) | {"sample": {"prompt": "Return the ", "continuation": "value\n\x1b", "seed": 0, "temperature": 0.8}}
    assert done_lines(s, out_dir="r", plot=False)[2] == 'sample (seed 0, temperature 0.8): "Return the " -> "value\\n\\x1b"'


def test_end_facts_sample_only_where_the_workload_generates(lm, monkeypatch):
    import toy_workload

    from dtrain import outcome

    class Modal:  # an optimizer with train()/eval() modes (Schedule-Free): sampled at its eval point
        calls = []

        def eval(self):
            self.calls.append("eval")

        def train(self):
            self.calls.append("train")

    monkeypatch.setattr(outcome, "SAMPLE_BYTES", 20)  # the run's 120 bytes cost seconds on a busy CI core
    model = lm.build_model()
    facts = end_facts(lm, model, Modal(), workers=2, steps=10, seed=0, can_sample=True)
    assert facts["sample"]["length"] == 20 and facts["sample"]["temperature"] == outcome.SAMPLE_TEMPERATURE
    assert facts["ddp_equivalent_bytes"] == ddp_equivalent(model, workers=2, steps=10)["bytes_per_worker"]
    assert Modal.calls == ["eval", "train"]
    assert end_facts(lm, model, None, workers=2, steps=10, seed=0, can_sample=False)["sample"] is None  # sharded worker
    toy = toy_workload.Toy(toy_workload.Config(), seed=0)
    assert end_facts(toy, nn.Linear(6, 1), None, workers=2, steps=1, seed=0, can_sample=True)["sample"] is None


def test_a_run_prints_and_stores_the_same_facts(tmp_path, capsys):
    config.register_workload("toy", "toy_workload")
    code = main(["train", "workload.name=toy", "comm.name=local", "comm.workers=2", f"out_dir={tmp_path}", "progress=false",
                 "plot=false", "optim.name=sgd", "optim.lr=0.05", "optim.weight_decay=0", "optim.warmup_steps=0",
                 "algo.name=diloco", "algo.sync_every=10", "steps=20", "eval_every=10", "ckpt_every=0"])
    assert code == 0
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ddp_equivalent_bytes"] == 7 * 4 * 1 * 20  # nn.Linear(6, 1): 7 fp32 parameters, 2 workers, 20 steps
    assert summary["sample"] is None and not any(ln.startswith("sample") for ln in out)  # the toy model does not generate
    assert out[0].startswith("done: diloco on toy, 2 workers, 20 steps") and "target 0.05" in out[0]
    assert out[1].startswith(f"comm: sent {si_bytes(summary['comm']['max']['bytes_sent'])} per worker; DDP would have sent ~560 B")


def _rows(*, sent_per_step):
    rows = [{"step": 0, "wall_s": 0.0, "eval": 5.5, "metric": "val_loss", "bytes_sent": 0}]
    for step in range(10, 101, 10):
        row = {"step": step, "wall_s": step * 0.3, "loss": 5 - step / 40, "bytes_sent": step * sent_per_step}
        rows.append(row)
        if step % 50 == 0:
            rows.append(row | {"eval": row["loss"] + 0.1, "metric": "val_loss"} | {"loss": None})
    return rows


def test_loss_plot_panels_for_a_multi_worker_and_a_one_worker_run(tmp_path):
    fig = draw_loss(_rows(sent_per_step=3_000_000), tmp_path / "loss.png", algorithm="noloco", workload="char_lm", workers=4)
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert fig.get_suptitle() == "NoLoCo on char_lm, 4 workers"
    axes = {ax.get_title(): ax for ax in fig.axes}
    assert list(axes) == ["loss vs step", "loss vs wall time", "loss vs bytes sent"]
    by_bytes = axes["loss vs bytes sent"]
    assert by_bytes.get_xscale() == "log" and "MB" in by_bytes.get_xlabel()
    assert by_bytes.xaxis.get_major_formatter()(1e8, 0) == "100"  # ticks in the label's unit
    train, val = axes["loss vs step"].get_lines()
    assert list(train.get_xdata()) == list(range(10, 101, 10)) and list(val.get_xdata()) == [0, 50, 100]
    assert val.get_marker() == "o" and val.get_linestyle() == "None"  # validation as markers
    assert list(by_bytes.get_lines()[1].get_xdata()) == [150_000_000, 300_000_000]  # zero bytes cannot sit on a log axis

    solo = draw_loss(_rows(sent_per_step=0), None, algorithm="diloco", workload="char_lm", workers=1)
    assert solo.get_suptitle() == "DiLoCo on char_lm, 1 worker"
    assert [ax.get_title() for ax in solo.axes] == ["loss vs step", "loss vs wall time"]  # no empty bytes panel

    # a metric that is not a loss (accuracy, error) gets its own y axis, named for it
    acc = [r | {"metric": "val_accuracy"} if "eval" in r else r for r in _rows(sent_per_step=1000)]
    fig = draw_loss(acc, None, algorithm="ddp", workload="seq_rnn", workers=2)
    assert {ax.get_ylabel() for ax in fig.axes} == {"loss", "val accuracy"}
