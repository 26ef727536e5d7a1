"""Throughput and FLOPs as logged (pld_ds/metrics.py and the log rows of pld_ds/pretrain.py), against hand counts.

The end-to-end runs use a fake clock (one second per reading of metrics' clock) and one epoch of shards whose
every sample has the same length, so samples/s, TFLOP/s and the step time of a log row are known exactly.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from pld_helpers import load_ds_config, read_csv_scalar, torch_threads, write_json
from shard_fixtures import VOCAB_SIZE, make_samples, write_shard

from pld_ds import metrics, pld, pretrain
from pld_ds.data import schema
from pld_ds.data.schema import IGNORE_INDEX

SEQ_LEN, REAL_LEN, SAMPLES, MICRO, GAS = 32, 24, 32, 4, 2
H, FFN, V = 64, 128, 128  # the tiny preset: hidden 64 (2 heads of 32), feed-forward 128; vocabulary 100 padded to 128


def layer_flops(s: int) -> int:
    """One tiny layer, one sequence of length s, training (x3): QKV+output 8shh, feed-forward 4shF, attention 4ssh."""
    return 3 * (8 * s * H * H + 4 * s * H * FFN + 4 * s * s * H)


def head_flops(masked: int) -> int:
    return 3 * 2 * masked * (H * H + H * V)


def one_length_shards(root: Path) -> int:
    """SAMPLES samples, every one REAL_LEN tokens long, padded to SEQ_LEN; returns how many positions are labelled."""
    arrays = make_samples(SAMPLES, REAL_LEN, 5, np.random.default_rng(0))
    filler = arrays["input_mask"] == 0
    arrays["input_ids"][filler] = 7  # make every row REAL_LEN long: its padding becomes words
    arrays["input_mask"][:] = 1
    pad = SEQ_LEN - REAL_LEN
    for key in ("input_ids", "input_mask", "segment_ids"):
        arrays[key] = np.pad(arrays[key], ((0, 0), (0, pad)))
    (root / "train").mkdir(parents=True)
    write_shard(root / "train" / "train_00000.hdf5", arrays)
    (root / schema.MANIFEST_NAME).write_text(f'{{"vocab": {{"size": {VOCAB_SIZE}}}}}')
    return int((arrays["masked_lm_positions"] != 0).sum())


@pytest.fixture
def fake_clock(monkeypatch):
    clock = itertools.count()
    monkeypatch.setattr(metrics, "time", SimpleNamespace(perf_counter=lambda: float(next(clock))))


def run_one_epoch(tmp_path: Path, pld_on: bool, *extra: str) -> tuple[dict, Path]:
    config = load_ds_config("tiny_cpu_pld.json")
    config.update(train_micro_batch_size_per_gpu=MICRO, gradient_accumulation_steps=GAS)
    config["progressive_layer_drop"] = {"enabled": pld_on, "theta": 0.5, "gamma": 0.3}
    path = write_json(tmp_path / "config.json", config)
    steps = SAMPLES // (MICRO * GAS)
    args = pretrain.parse_args(["--deepspeed_config", str(path), "--data", str(tmp_path / "data"), "--output",
                                str(tmp_path / "out"), "--model", "tiny", "--max-steps", str(steps),
                                "--log-interval", str(steps), *extra])
    with torch_threads(1):
        scalars = pretrain.run(args)
    return scalars, tmp_path / "out" / "csv" / "run"


@pytest.mark.parametrize("bin_by_length", [False, True], ids=["full-length", "bin-by-length"])
def test_logged_throughput_counts_every_micro_batch_at_its_computed_length(tmp_path, fake_clock, capsys,
                                                                          bin_by_length):
    """4 steps of 2 micro-batches of 4 samples in one (fake) second: 32 samples/s, not 16 (the accumulation
    factor); FLOPs at the shard's 32 columns, or at the 24 that --bin-by-length cut the batches to."""
    masked = one_length_shards(tmp_path / "data")
    scalars, _ = run_one_epoch(tmp_path, False, *(["--bin-by-length"] if bin_by_length else []))
    assert scalars["train/samples_per_sec"] == SAMPLES
    computed = REAL_LEN if bin_by_length else SEQ_LEN
    expected = SAMPLES * 4 * layer_flops(computed) + head_flops(masked)
    assert scalars["train/tflops"] == pytest.approx(expected / 1e12, rel=1e-12)
    # one definition on the line: samples/s, TFLOP/s, s/step and the ETA are all over the last interval
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("step "))
    assert "samples_per_sec 32 " in line and "0.25 s/step  eta 0:00:00  (rates over the last 4 steps)" in line


def test_logged_theta_depth_and_flops_are_those_the_steps_ran_with(tmp_path, fake_clock):
    """The row of step 4 holds theta(3), what step 4's forwards used, and the FLOPs of steps 1-4 at theta(0..3)."""
    masked = one_length_shards(tmp_path / "data")
    scalars, csv_dir = run_one_epoch(tmp_path, True)
    used = pld.theta(3, 0.5, 0.3)
    assert read_csv_scalar(csv_dir / "train_pld_theta.csv") == [(4, used)]
    assert scalars["train/expected_depth"] == pytest.approx(4 - (1 - used) * 5 / 2)
    # layer l of 4 is kept with 1 - (l / 4)(1 - theta): 4 - 2.5 (1 - theta) layers expected per sample
    layers = sum(4 - 2.5 * (1 - pld.theta(step, 0.5, 0.3)) for step in range(4))
    expected = MICRO * GAS * layers * layer_flops(SEQ_LEN) + head_flops(masked)
    assert scalars["train/tflops"] == pytest.approx(expected / 1e12, rel=1e-12)


def test_meter_rates_are_over_the_interval_since_the_last_report(fake_clock):
    meter = metrics.Meter(step=10)  # a resumed run (or EarlyBERT's slim phase) starts at its own step
    rates = meter.report(12)
    assert (rates.steps, rates.seconds, rates.samples) == (2, 1.0, 0.0)
    batch = {"input_ids": torch.zeros(3, 16, dtype=torch.long),
             "masked_lm_labels": torch.full((3, 16), IGNORE_INDEX).index_fill_(1, torch.tensor([1, 2]), 5)}
    tiny = pretrain.model_config("tiny", vocab_size=V)
    meter.count(tiny, [batch, batch], [1.0, 0.5, 1.0, 1.0])
    rates = meter.report(13, all_ranks=lambda values: [2 * v for v in values])  # two ranks that saw the same
    assert rates.steps == 1 and rates.samples == 2 * 6
    per_batch = 3 * 3.5 * layer_flops(16) + head_flops(6)
    assert rates.flops == pytest.approx(2 * 2 * per_batch, rel=1e-12)
    assert rates.samples_per_sec == 12 and rates.sec_per_step == 1.0
    assert meter.report(14).samples == 0  # each report starts a new interval


def test_counted_batches_pass_batches_through_and_drain():
    batches = [{"input_ids": torch.ones(2, 8), "masked_lm_labels": torch.zeros(2, 8), "other": torch.ones(1)}
               for _ in range(3)]
    counted = metrics.CountedBatches(iter(batches))
    assert next(counted) is batches[0] and next(counted) is batches[1]
    seen = counted.drain()
    assert len(seen) == 2 and set(seen[0]) == {"input_ids", "masked_lm_labels"} and counted.drain() == []

