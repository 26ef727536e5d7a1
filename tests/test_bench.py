"""pld-bench on CPU, and the FLOP counts behind its TFLOP/s and MFU columns."""

from __future__ import annotations

import json
import math
import subprocess

import pytest
from pld_helpers import REPO, child_env, console_script

from pld_ds import bench, metrics, pld
from pld_ds.config import MODEL_PRESETS, model_config
from pld_ds.model import BertConfig, BertForPreTraining

# Training FLOPs of one sequence of the tiny preset (h 64, I 128, 4 layers, 2 heads, vocab 30528) at
# sequence length 32 with round(0.15 x 32) = 5 masked positions, counted by hand (x3: forward + backward):
#   one layer: 3 x (QKV and output 8*32*64*64 + feed-forward 4*32*64*128 + scores and context 4*32*32*64)
#            = 3 x (1,048,576 + 1,048,576 + 262,144) = 7,077,888
#   MLM head at the masked positions: 3 x 2 x 5 x (64*64 + 64*30528) = 58,736,640
TINY_LAYER_FLOPS = 7_077_888
TINY_HEAD_FLOPS = 58_736_640
# At theta 0.5 the layers are kept with p = 1 - (l/4)(1 - 0.5): 0.875, 0.75, 0.625, 0.5, 2.75 layers expected.
TINY_ROW_FLOPS = {None: 4 * TINY_LAYER_FLOPS + TINY_HEAD_FLOPS, 0.5: 2.75 * TINY_LAYER_FLOPS + TINY_HEAD_FLOPS}
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
    for noise in ("Setting accelerator to CPU", "built successfully"):  # DeepSpeed's every-run lines
        assert noise not in proc.stdout + proc.stderr, noise
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
    assert TINY_ROW_FLOPS[None] == 87_048_192 and TINY_ROW_FLOPS[0.5] == 78_200_832
    for row in rows:
        assert row["tflops"] == pytest.approx(row["samples_per_sec"] * TINY_ROW_FLOPS[row["pld_theta"]] / 1e12)


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


def test_flops_formula_against_a_hand_count():
    cfg = model_config("tiny")
    assert metrics.layer_flops_per_sequence(cfg, 32, 0) == TINY_LAYER_FLOPS
    assert metrics.head_flops_per_sequence(cfg, 5) == TINY_HEAD_FLOPS
    assert metrics.training_flops_per_sequence(cfg, 32, 5) == TINY_ROW_FLOPS[None]
    assert metrics.training_flops_per_sequence(cfg, 32, 5, pld.keep_probs(4, 0.5)) == TINY_ROW_FLOPS[0.5]


@pytest.mark.parametrize("preset, seq_len", [("tiny", 32), ("micro", 16)])
def test_flops_formula_against_torch_flop_counter(preset, seq_len):
    """torch counts the FLOPs of every matmul of a real forward and backward (attention through SDPA's math
    path, which it can see into). The formula leaves out only the pooler and NSP layer on [CLS]:
    3 x 2 x (h*h + 2*h) per sequence."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    cfg = model_config(preset, vocab_size=512, hidden_dropout=0.0, attention_dropout=0.0)
    batch = bench.synthetic_batch(cfg, 3, seq_len, device="cpu")
    model = BertForPreTraining(cfg)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(**batch).loss.backward()
    masked = max(1, round(0.15 * seq_len))
    h = cfg.hidden_size
    assert counter.get_total_flops() == 3 * (metrics.training_flops_per_sequence(cfg, seq_len, masked)
                                             + 3 * 2 * (h * h + 2 * h))


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


# -- bad flags fail at once, not after the timing ---------------------------------------------------


@pytest.mark.parametrize("flags, fragment", [
    (["--theta", "1.5"], "--theta 1.5: expected values in (0, 1]"),  # was taken for PLD off without a word
    (["--theta", "1.0", "0"], "--theta 0.0"),
    (["--theta", "nan"], "--theta nan"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--micro-batch", "0"], "--micro-batch must be >= 1"),
    (["--warmup", "-1"], "--warmup must be >= 0"),
    (["--dropout", "1"], "--dropout must be in [0, 1)"),
])
def test_bad_flags_are_one_line_errors(flags, fragment, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(flags)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and err.startswith("pld-bench: error: ")
    assert fragment in err, err


def test_unusable_json_path_and_too_long_sequences_fail_before_any_timing(tmp_path, capsys, monkeypatch):
    def no_timing(*args, **kwargs):
        raise AssertionError("timed a step")

    monkeypatch.setattr(bench, "time_steps", no_timing)
    for flags, fragment in ((["--json", str(tmp_path / "missing" / "rows.json")], "no writable folder"),
                            (["--json", str(tmp_path)], "is a folder"),
                            (["--model", "tiny", "--seq-len", "129"], "--seq-len 129: the tiny model has 128")):
        with pytest.raises(SystemExit) as exit_info:
            bench.main(flags)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1 and fragment in err, err
