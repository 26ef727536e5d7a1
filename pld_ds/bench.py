"""pld-bench: training throughput of PreLN BERT through the PLD engine, against the physical limit
and against Hugging Face's BertForPreTraining on the same batch.

Each row times optimizer steps (forward, backward, step) on one synthetic batch kept on the device,
after warm-up steps, synchronising the device around each timed window; the figure is the median
over repeats. PLD rows run at a fixed theta (the schedule's limit, reached after the first step).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from pld_ds import metrics, pld
from pld_ds.config import compile_backend, model_config
from pld_ds.data.schema import IGNORE_INDEX
from pld_ds.errors import ArgumentParser, UserError, one_line_errors
from pld_ds.model import BertConfig, BertForPreTraining

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "amp-bf16": torch.bfloat16}


@dataclass
class Row:
    device: str
    preset: str
    seq_len: int
    micro_batch: int
    precision: str
    pld_theta: float | None
    zero_stage: int
    samples_per_sec: float
    tokens_per_sec: float
    tflops: float
    mfu: float | None
    peak_mem_gb: float | None
    time_vs_theta1: float | None = None
    hf_samples_per_sec: float | None = None
    speedup_vs_hf: float | None = None


device_name, peak_tflops = metrics.device_name, metrics.peak_tflops


def synthetic_batch(cfg: BertConfig, batch: int, seq_len: int, device: torch.device, seed: int = 0) -> dict:
    """Full-length sequences with 15% of positions labelled (as the MLM head sees in pretraining)."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, cfg.vocab_size, (batch, seq_len), generator=g)
    num_masked = max(1, round(0.15 * seq_len))
    positions = torch.rand(batch, seq_len - 1, generator=g).argsort(dim=1)[:, :num_masked] + 1
    labels = torch.full_like(input_ids, IGNORE_INDEX).scatter(1, positions, input_ids.gather(1, positions))
    out = {"input_ids": input_ids, "token_type_ids": (torch.arange(seq_len) >= seq_len // 2).long().expand(batch, -1),
           "attention_mask": torch.ones_like(input_ids), "masked_lm_labels": labels,
           "next_sentence_labels": torch.randint(0, 2, (batch,), generator=g)}
    return {k: v.contiguous().to(device) for k, v in out.items()}


def ds_config(
    micro_batch: int, precision: str, zero_stage: int, theta: float | None, optimizer: str = "torch"
) -> dict[str, Any]:
    """bf16/fp16: DeepSpeed's low-precision weights and optimizer wrappers; amp-bf16: fp32 weights
    under torch.autocast (DeepSpeed's torch_autocast block)."""
    fused = torch.cuda.is_available()
    if optimizer == "torch":
        # torch's AdamW (fused on CUDA, foreach elsewhere): no JIT build of DeepSpeed's ops.
        opt = {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01, "torch_adam": True,
                                           **({"fused": True} if fused else {"foreach": True})}}
    else:
        opt = {"type": "Adam", "params": {"lr": 1e-4, "weight_decay": 0.01, "adam_w_mode": True}}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "steps_per_print": 10**9,
        "gradient_clipping": 1.0,
        "optimizer": opt,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 12},
        "torch_autocast": {"enabled": precision == "amp-bf16", "dtype": "bfloat16"},
    }
    if theta is not None:
        config["progressive_layer_drop"] = {"enabled": True, "theta": theta, "gamma": 1e6}
    return config


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_steps(step_fn, warmup: int, steps: int, repeats: int) -> float:
    """Median seconds per step."""
    for _ in range(warmup):
        step_fn()
    times = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        for _ in range(steps):
            step_fn()
        _sync()
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times)


def bench_pld_ds(
    cfg: BertConfig, args: argparse.Namespace, theta: float | None, zero_stage: int
) -> tuple[float, float | None]:
    from pld_ds import startup

    startup.quiet_deepspeed()  # before deepspeed is imported: its accelerator line on every run
    from pld_ds.engine import PLDEngine

    torch.manual_seed(0)
    model = BertForPreTraining(cfg)
    if args.compile:
        model.compile_layers(backend=args.compile)
    with startup.without_noise():
        engine = PLDEngine(model, ds_config(args.micro_batch, args.precision, zero_stage, theta, args.optimizer))
    batch = synthetic_batch(cfg, args.micro_batch, args.seq_len, engine.device)

    def step() -> None:
        out = engine(**batch)
        engine.backward(out.loss)
        engine.step()

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    seconds = time_steps(step, args.warmup, args.steps, args.repeats)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    engine.engine.destroy()
    return seconds, peak


def bench_hf(cfg: BertConfig, args: argparse.Namespace) -> float | None:
    try:
        import transformers
    except ImportError:
        return None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    hf_cfg = transformers.BertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings, attn_implementation="sdpa")
    model = transformers.BertForPreTraining(hf_cfg).to(device=device, dtype=PRECISIONS[args.precision]).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    batch = synthetic_batch(cfg, args.micro_batch, args.seq_len, device)
    inputs = {"input_ids": batch["input_ids"], "token_type_ids": batch["token_type_ids"],
              "attention_mask": batch["attention_mask"], "labels": batch["masked_lm_labels"],
              "next_sentence_label": batch["next_sentence_labels"]}

    def step() -> None:
        model(**inputs).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds = time_steps(step, args.warmup, args.steps, args.repeats)
    return args.micro_batch / seconds


def run(args: argparse.Namespace) -> list[Row]:
    if args.precision in ("fp16",) and not torch.cuda.is_available():
        raise UserError("--precision fp16: needs a CUDA device (use bf16 or fp32 on CPU)")
    cfg = model_config(args.model, hidden_dropout=args.dropout, attention_dropout=args.dropout)
    if args.seq_len > cfg.max_position_embeddings:
        raise UserError(f"--seq-len {args.seq_len}: the {args.model} model has {cfg.max_position_embeddings} positions")
    name, peak = device_name(), peak_tflops(device_name())
    masked = max(1, round(0.15 * args.seq_len))
    hf = bench_hf(cfg, args) if args.hf else None
    rows: list[Row] = []
    for zero_stage in args.zero:
        base_seconds = None
        for theta in args.theta:
            theta_arg = None if theta >= 1.0 else theta
            seconds, mem = bench_pld_ds(cfg, args, theta_arg, zero_stage)
            depth = pld.keep_probs(cfg.num_layers, theta)
            # Achieved FLOPs count the layers actually expected to run, so PLD rows are not inflated.
            flops = metrics.training_flops_per_sequence(cfg, args.seq_len, masked, depth) * args.micro_batch / seconds
            base_seconds = seconds if theta >= 1.0 else base_seconds
            samples = args.micro_batch / seconds
            rows.append(Row(
                device=name, preset=args.model, seq_len=args.seq_len, micro_batch=args.micro_batch,
                precision=args.precision, pld_theta=theta_arg, zero_stage=zero_stage,
                samples_per_sec=samples, tokens_per_sec=samples * args.seq_len, tflops=flops / 1e12,
                mfu=flops / 1e12 / peak if peak else None, peak_mem_gb=mem,
                time_vs_theta1=seconds / base_seconds if base_seconds else None,
                hf_samples_per_sec=hf, speedup_vs_hf=samples / hf if hf else None))
    return rows


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def table(rows: list[Row]) -> str:
    cols = ["device", "preset", "seq_len", "micro_batch", "precision", "pld_theta", "zero_stage", "samples_per_sec",
            "tokens_per_sec", "tflops", "mfu", "peak_mem_gb", "time_vs_theta1", "hf_samples_per_sec", "speedup_vs_hf"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(getattr(r, c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="pld-bench", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", help="preset or model JSON")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--precision", choices=sorted(PRECISIONS), default="bf16" if torch.cuda.is_available() else "fp32")
    p.add_argument("--theta", type=float, nargs="+", default=[1.0, 0.5], help="1.0 = PLD off; others: fixed theta")
    p.add_argument("--zero", type=int, nargs="+", default=[0], choices=[0, 1, 2, 3], help="ZeRO stages")
    p.add_argument("--optimizer", choices=["torch", "deepspeed"], default="torch",
                   help="torch: torch AdamW (fused on CUDA); deepspeed: DeepSpeed's FusedAdam (JIT-built)")
    p.add_argument("--compile", nargs="?", const="inductor", type=compile_backend, metavar="BACKEND",
                   help="torch.compile each encoder layer with BACKEND (default inductor)")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hf", action="store_true", help="also time transformers.BertForPreTraining (sdpa)")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = p.parse_args(argv)
    for name in ("seq_len", "micro_batch", "steps", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if not 0.0 <= args.dropout < 1.0:
        p.error(f"--dropout must be in [0, 1), got {args.dropout}")
    bad = [t for t in args.theta if not 0.0 < t <= 1.0]  # also NaN
    if bad:
        p.error(f"--theta {bad[0]}: expected values in (0, 1] (1.0: PLD off)")
    return args


def check_json_path(path: Path) -> None:
    """The rows are written after minutes of timing: a --json that cannot take them must fail first."""
    folder = path.parent
    if path.is_dir() or not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        what = "is a folder" if path.is_dir() else f"no writable folder {folder}"
        raise UserError(f"--json {path}: {what} (expected a file name in a writable folder)")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with one_line_errors("pld-bench"):
        if args.json:
            check_json_path(Path(args.json))
        rows = run(args)
        print(table(rows), flush=True)
        if args.json:
            from pld_ds.checkpoint import write_text_atomic

            write_text_atomic(Path(args.json), json.dumps([asdict(r) for r in rows], indent=2))


if __name__ == "__main__":
    main()
