"""The AlgoPerf-style workloads digits_cnn, ctr and seq_rnn: determinism, init, metric, learning."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from dtrain.config import ConfigError, load

# Small variants so each test takes well under a second or two.
SMALL = {
    "digits_cnn": {"batch_size": 32, "channels": 8, "hidden": 32},
    "ctr": {"vocab_sizes": [50, 20, 10], "val_size": 2000, "batch_size": 128},
    "seq_rnn": {"val_sequences": 200, "hidden": 32, "seq_len": 16},
}
NAMES = list(SMALL)


def make(name: str, seed: int = 0, **over):
    mod = importlib.import_module(f"dtrain.workloads.{name}")
    return mod.build(mod.Config(name=name, **{**SMALL[name], **over}), seed=seed)


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("name", NAMES)
def test_batches_deterministic_in_seed_step_rank(name: str) -> None:
    a, b = make(name, seed=3), make(name, seed=3)
    for step, rank in [(0, 0), (7, 1), (500, 3)]:
        assert same(a.train_batch(step, rank, 4), b.train_batch(step, rank, 4))
    # out-of-order access gives the same batch (no hidden iterator state)
    later = a.train_batch(900, 0, 4)
    a.train_batch(1, 0, 4)
    assert same(a.train_batch(900, 0, 4), later)
    ref = a.train_batch(5, 0, 2)
    assert not same(ref, a.train_batch(6, 0, 2))
    assert not same(ref, a.train_batch(5, 1, 2))
    assert not same(ref, make(name, seed=4).train_batch(5, 0, 2))


@pytest.mark.parametrize("name", NAMES)
def test_model_init_depends_on_seed_only(name: str) -> None:
    torch.manual_seed(123)  # the global RNG must not matter
    m1 = make(name, seed=1).build_model()
    torch.manual_seed(456)
    m2 = make(name, seed=1).build_model()
    m3 = make(name, seed=2).build_model()
    s1, s2, s3 = m1.state_dict(), m2.state_dict(), m3.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert any(not torch.equal(s1[k], s3[k]) for k in s1)


@pytest.mark.parametrize("name", NAMES)
def test_metric_target_and_budget(name: str) -> None:
    w = make(name)
    model = w.build_model()
    model.train()
    result = w.evaluate(model)
    assert model.training  # evaluate restores the mode
    assert w.metric in result and math.isfinite(result[w.metric])
    assert "val_loss" in result
    mod = importlib.import_module(f"dtrain.workloads.{name}")
    full = mod.build(mod.Config(name=name), seed=0)
    assert math.isfinite(full.target) and 0 < full.time_budget_s <= 120
    assert full.reached(full.target)
    worse = full.target - 0.01 if full.higher_is_better else full.target + 0.01
    assert not full.reached(worse)


@pytest.mark.parametrize("name", NAMES)
def test_short_training_reduces_loss(name: str) -> None:
    w = make(name)
    model = w.build_model()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    before = w.evaluate(model)["val_loss"]
    for step in range(60):
        loss = w.loss(model, w.train_batch(step, 0, 1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = w.evaluate(model)["val_loss"]
    assert after < before - 0.05, (before, after)


def test_digits_split_is_fixed_and_disjoint() -> None:
    from dtrain.workloads.digits_cnn import load_split

    xt, yt, xv, yv = load_split()
    assert len(yt) + len(yv) == 1797 and len(yv) == 360
    assert xt.shape[1:] == (1, 8, 8) and 0 <= float(xt.min()) and float(xt.max()) <= 1
    train_rows = {tuple(r) for r in xt.flatten(1).tolist()}
    # a few digits are pixel-identical duplicates in the data set; almost all val images are new
    assert sum(tuple(r) in train_rows for r in xv.flatten(1).tolist()) < 10
    a, b = make("digits_cnn", seed=0), make("digits_cnn", seed=9)
    assert torch.equal(a.x_val, b.x_val)


def test_digits_epoch_covers_every_training_image_once() -> None:
    w = make("digits_cnn", augment=False, batch_size=100)
    per_epoch = len(w.y_train) // 100
    world = 2
    seen = torch.cat([w.train_batch(s, r, world)[1] for s in range(per_epoch // world) for r in range(world)])
    assert len(seen) == per_epoch // world * world * 100
    assert torch.equal(torch.bincount(seen, minlength=10) <= torch.bincount(w.y_train, minlength=10), torch.ones(10, dtype=torch.bool))


def test_ctr_bayes_loss_is_the_floor() -> None:
    from dtrain.workloads.ctr import expected_logloss

    w = make("ctr")
    logit = w.truth.logit(w.val_ids, w.val_dense)
    assert expected_logloss(logit, w.val_p).item() == pytest.approx(w.bayes_loss, rel=1e-6)
    assert w.bayes_loss < w.constant_loss
    for shift in (-0.3, 0.3):  # any other prediction does worse
        assert expected_logloss(logit + shift, w.val_p).item() > w.bayes_loss
    result = w.evaluate(w.build_model())
    assert result["excess_loss"] > 0 and result["bayes_loss"] == pytest.approx(w.bayes_loss)
    # labels really are drawn from the known model: the click rate matches the mean probability
    clicks = torch.cat([w.train_batch(s, 0, 1)[2] for s in range(40)])
    assert float(clicks.mean()) == pytest.approx(float(w.val_p.mean()), abs=0.03)


def test_seq_rnn_filter_beats_single_symbol_guess() -> None:
    w = make("seq_rnn")
    post = w.hmm.filter(w.val_symbols)
    assert torch.allclose(post.sum(-1), torch.ones_like(post[..., 0]))
    single = w.hmm.emit[:, w.val_symbols].permute(1, 2, 0).argmax(-1)  # best guess from one symbol
    assert w.bayes_accuracy > float((single == w.val_states).float().mean()) + 0.1
    symbols, states = w.train_batch(0, 0, 1)
    assert symbols.shape == states.shape == (w.cfg.batch_size, w.cfg.seq_len)
    assert int(symbols.max()) < w.cfg.n_symbols and int(states.max()) < w.cfg.n_states


@pytest.mark.parametrize(("name", "key", "value"), [
    ("digits_cnn", "batch_size", 0), ("ctr", "embed_dim", 0), ("ctr", "vocab_sizes", "[5]"), ("seq_rnn", "stay", 1.5),
])
def test_config_validation_names_the_key(name: str, key: str, value) -> None:
    with pytest.raises(ConfigError, match=f"workload.{key}"):
        load(None, [f"workload.name={name}", f"workload.{key}={value}"])


@pytest.mark.parametrize("name", NAMES)
def test_registered_and_loadable(name: str) -> None:
    cfg = load(None, [f"workload.name={name}"])
    assert cfg.workload.name == name and cfg.workload.time_budget_s > 0
