"""The PLD gates actually drawn in training, counted per layer and logged against p_l (PLDEngine.pld_scalars)."""

from __future__ import annotations

import math

import pytest
from pld_helpers import load_ds_config, synthetic_batch, tiny_config, torch_threads

from pld_ds import pld
from pld_ds.engine import PLDEngine
from pld_ds.model import BertForPreTraining


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


def batches():
    while True:
        yield synthetic_batch(batch=2, seq_len=8)


def test_keep_rates_per_layer_follow_p_l(tmp_path):
    config = load_ds_config()
    config["progressive_layer_drop"] = {"enabled": True, "theta": 0.2, "gamma": 100.0}  # theta = 0.2 from step 1
    config["gradient_accumulation_steps"] = 4
    engine = PLDEngine(BertForPreTraining(tiny_config()), config, seed=3, output_dir=tmp_path / "run")
    data = batches()
    engine.train_batch(data)
    first = engine.pld_scalars()  # step 0: theta 1, every layer kept in all 4 micro-batches
    assert [first[f"train/keep_rate/layer_{k}"] for k in range(1, 5)] == [1.0] * 4
    assert [first[f"train/keep_prob/layer_{k}"] for k in range(1, 5)] == [1.0] * 4
    steps = 60
    for _ in range(steps):
        engine.train_batch(data)
    scalars = engine.pld_scalars()  # the window since the last call: 240 micro-batches at theta 0.2
    expected = pld.keep_probs(4, pld.theta(5, 0.2, 100.0))
    draws = steps * 4
    for k, p in enumerate(expected, start=1):
        assert scalars[f"train/keep_prob/layer_{k}"] == pytest.approx(p)
        # within 4 binomial standard deviations of p_l (deterministic: the gates come from seeded generators)
        assert abs(scalars[f"train/keep_rate/layer_{k}"] - p) < 4 * math.sqrt(p * (1 - p) / draws) + 1e-9, k
    rates = [scalars[f"train/keep_rate/layer_{k}"] for k in range(1, 5)]
    assert rates[0] > rates[-1]  # the deepest layer is dropped most often
    assert "train/keep_rate/layer_1" not in engine.pld_scalars()  # the window was emptied
    summary = engine.keep_summary()
    assert summary[0].startswith(f"PLD gates drawn over {draws + 4} micro-batches")
    assert summary[1].strip().startswith("1: ") and len(summary[1].split()) == 8


def test_no_keep_rates_without_pld(tmp_path):
    config = load_ds_config()
    config["progressive_layer_drop"] = {"enabled": False}
    engine = PLDEngine(BertForPreTraining(tiny_config()), config, seed=3, output_dir=tmp_path / "run")
    engine.train_batch(batches())
    assert not [k for k in engine.pld_scalars() if "keep" in k] and engine.keep_summary() == []
