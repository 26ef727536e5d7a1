"""pld-bench on CPU, and the FLOP counts behind its TFLOP/s and MFU columns."""

from __future__ import annotations

import json
import math
import subprocess

import pytest
from pld_helpers import REPO, child_env, console_script

from pld_ds import bench, metrics, pld
from pld_ds.config import MODEL_PRESETS, model_config
from pld_ds.model import BertConfig

ROW_KEYS = {"device", "preset", "seq_len", "micro_batch", "precision", "pld_theta", "zero_stage", "samples_per_sec",
            "tflops", "mfu", "peak_mem_gb", "hf_samples_per_sec", "time_vs_theta1"}


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "rows.json"
    args = ["--model", "tiny", "--seq-len", "32", "--micro-batch", "4", "--steps", "2", "--warmup", "1",
            "--repeats", "1", "--json", str(out)]
    proc = subprocess.run([console_script("pld-bench"), *args], cwd=REPO, env=child_env(), capture_output=True,
                          text=True, timeout=300)
    return proc, out


def test_bench_exits_cleanly_and_prints_a_table(bench_run):
    proc, _ = bench_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    assert len(table) == 4  # header, separator, theta 1 and theta 0.5
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert {"device", "pld_theta", "samples_per_sec", "tflops", "mfu", "time_vs_theta1"} <= set(header)
    assert set(table[1].replace("|", "").replace("-", "")) == set()
    assert all(len(line.strip("|").split("|")) == len(header) for line in table)


def test_bench_json_rows(bench_run):
    proc, out = bench_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert len(rows) == 2
    for row in rows:
        assert ROW_KEYS <= set(row)
        assert row["device"] == "cpu" and row["preset"] == "tiny" and row["precision"] == "fp32"
        assert (row["seq_len"], row["micro_batch"], row["zero_stage"]) == (32, 4, 0)
        assert row["samples_per_sec"] > 0 and math.isfinite(row["samples_per_sec"])
        assert row["tflops"] > 0
        assert row["mfu"] is None and row["peak_mem_gb"] is None  # no known peak, no CUDA memory on CPU
        assert row["hf_samples_per_sec"] is None  # --hf not given
        assert row["tokens_per_sec"] == pytest.approx(row["samples_per_sec"] * 32)
    full, dropped = rows
    assert full["pld_theta"] is None and full["time_vs_theta1"] == 1.0
    assert dropped["pld_theta"] == 0.5
    assert dropped["time_vs_theta1"] == pytest.approx(full["samples_per_sec"] / dropped["samples_per_sec"])
    # achieved FLOP/s count the expected depth of the PLD row, not the full depth
    cfg = model_config("tiny")
    for row, depth in ((full, 4), (dropped, pld.expected_depth(4, 0.5))):
        flops = metrics.training_flops_per_sequence(cfg, 32, max(1, round(0.15 * 32)), depth)
        assert row["tflops"] == pytest.approx(row["samples_per_sec"] * flops / 1e12)


# -- FLOP counts ----------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", sorted(MODEL_PRESETS))
@pytest.mark.parametrize("seq_len", [32, 128, 512])
def test_encoder_flops_formula(preset, seq_len):
    cfg = model_config(preset)
    h, s, layers = cfg.hidden_size, seq_len, cfg.num_layers
    expected = 3 * layers * (8 * s * h * h + 4 * s * h * cfg.intermediate_size + 4 * s * s * h)
    assert metrics.encoder_flops_per_sequence(cfg, seq_len) == expected
    if cfg.intermediate_size == 4 * h:
        assert metrics.encoder_flops_per_sequence(cfg, seq_len) == 3 * layers * (24 * s * h * h + 4 * s * s * h)


def test_bert_base_flops_value():
    # 3 * 12 * (24 * 512 * 768^2 + 4 * 512^2 * 768) = 2.8991e11 FLOPs per 512-token sequence
    cfg = BertConfig()
    assert metrics.encoder_flops_per_sequence(cfg, 512) == 3 * 12 * (24 * 512 * 768**2 + 4 * 512**2 * 768)
    assert metrics.encoder_flops_per_sequence(cfg, 512) == pytest.approx(2.8991e11, rel=1e-4)


def test_fractional_depth_scales_linearly():
    cfg = model_config("base")
    full = metrics.encoder_flops_per_sequence(cfg, 128)
    assert metrics.encoder_flops_per_sequence(cfg, 128, layers=8.75) == pytest.approx(full * 8.75 / 12)


def test_head_flops_and_total():
    cfg = model_config("base")
    h, v = cfg.hidden_size, cfg.vocab_size
    assert metrics.head_flops_per_sequence(cfg, 20) == 3 * 2 * 20 * (h * h + h * v)
    assert metrics.training_flops_per_sequence(cfg, 128, 20, 6) == (
        metrics.encoder_flops_per_sequence(cfg, 128, 6) + metrics.head_flops_per_sequence(cfg, 20))


def test_peak_tflops_lookup():
    assert bench.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert bench.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert bench.peak_tflops("cpu") is None


def test_synthetic_batch_labels_fifteen_percent():
    cfg = model_config("tiny", vocab_size=100)
    batch = bench.synthetic_batch(cfg, 3, 40, device="cpu")
    labelled = (batch["masked_lm_labels"] != -100).sum(dim=1)
    assert labelled.tolist() == [6, 6, 6]
    assert (batch["masked_lm_labels"][:, 0] == -100).all()
    kept = batch["masked_lm_labels"] != -100
    assert (batch["masked_lm_labels"][kept] == batch["input_ids"][kept]).all()
