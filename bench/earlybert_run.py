"""EarlyBERT on the CPU in one run: the search through the PLD engine, the ticket's emergence, the draw,
slim training, and the time per optimizer step of the slim model against the full one.

    pld-prep --input text/ --output shards/ --train-vocab 8000
    python bench/earlybert_run.py --data shards/ --model mini [--pld 0.5] [--json out.json]

--data is a pld-prep output folder; without it the batches are random tokens, which teach the
coefficients nothing (the ticket then seldom emerges). The timing at the end runs the full model
(no coefficients) and the slim one on the same batch, alternating, without PLD, so the ratio is the
ticket's own saving; the machine's load average is printed with it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from pld_ds import earlybert
from pld_ds.bench import synthetic_batch, time_steps
from pld_ds.config import model_config, padded_vocab_size
from pld_ds.earlybert import EarlyBertConfig, TicketSearch
from pld_ds.engine import PLDEngine
from pld_ds.model import BertForPreTraining


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", help="pld-prep output folder (default: random tokens)")
    p.add_argument("--model", default="mini")
    p.add_argument("--seq-len", type=int, default=128, help="for random tokens (shards bring their own)")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lambda-heads", type=float, default=1e-4)
    p.add_argument("--lambda-neurons", type=float, default=1e-4)
    p.add_argument("--head-prune-ratio", type=float, default=1 / 3)
    p.add_argument("--neuron-prune-ratio", type=float, default=0.4)
    p.add_argument("--check-interval", type=int, default=10)
    p.add_argument("--window", type=int, default=5)
    p.add_argument("--threshold", type=float, default=0.1)
    p.add_argument("--max-search-steps", type=int, default=200)
    p.add_argument("--weights", choices=earlybert.WEIGHTS, default="rewind")
    p.add_argument("--slim-steps", type=int, default=60, help="optimizer steps of the slim model after the draw")
    p.add_argument("--pld", type=float, metavar="THETA", help="PLD with this theta-bar (gamma 0.01) in both phases")
    p.add_argument("--penalty-layers", choices=earlybert.PENALTY_LAYERS, default="all",
                   help="under PLD, which layers the L1 term pulls on (see earlybert.penalty_weights)")
    p.add_argument("--timing-steps", type=int, default=5, help="timed steps per repeat (0: no timing)")
    p.add_argument("--timing-repeats", type=int, default=3)
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--json", metavar="FILE", help="also write the summary as JSON")
    return p.parse_args(argv)


def ds_config(args: argparse.Namespace, pld_theta: float | None) -> dict[str, Any]:
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": args.micro_batch,
        "gradient_accumulation_steps": 1,
        "steps_per_print": 10**9,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "Adam", "params": {"lr": args.lr, "betas": [0.9, 0.98], "eps": 1e-6,
                                                 "weight_decay": 0.01, "adam_w_mode": True, "torch_adam": True,
                                                 "foreach": True}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": args.lr,
                                                     "warmup_num_steps": 20, "warmup_type": "linear"}},
        "zero_optimization": {"stage": 0},
        "earlybert": {"enabled": True, "lambda_heads": args.lambda_heads, "lambda_neurons": args.lambda_neurons,
                      "head_prune_ratio": args.head_prune_ratio, "neuron_prune_ratio": args.neuron_prune_ratio,
                      "check_interval": args.check_interval, "window": args.window, "threshold": args.threshold,
                      "max_search_steps": args.max_search_steps, "weights": args.weights},
    }
    if pld_theta is not None:
        config["progressive_layer_drop"] = {"enabled": True, "theta": pld_theta, "gamma": 0.01}
    return config


def batches(args: argparse.Namespace) -> tuple[Iterator[dict[str, torch.Tensor]], int, int]:
    """(endless micro-batches, vocabulary size, sequence length)."""
    if args.data:
        from pld_ds.data.loader import ShardBatches
        from pld_ds.pretrain import data_folders, data_vocabulary

        train_paths, _ = data_folders(args.data, None)
        vocab_size, masking = data_vocabulary(args.data, None)
        train = ShardBatches(train_paths, args.micro_batch, vocab_size, seed=args.seed, masking=masking)
        return iter(train), padded_vocab_size(vocab_size), train.seq_len
    vocab_size = padded_vocab_size(8000)
    cfg = model_config(args.model, vocab_size=vocab_size)

    def synthetic() -> Iterator[dict[str, torch.Tensor]]:
        seed = 0
        while True:
            yield synthetic_batch(cfg, args.micro_batch, args.seq_len, torch.device("cpu"), seed=seed)
            seed += 1

    return synthetic(), vocab_size, args.seq_len


def train_phase(engine: PLDEngine, data: Iterator, steps: int | None, search: TicketSearch | None,
                log_interval: int) -> tuple[float, int]:
    """Train until the search is over (search given) or for `steps`; (seconds per step, steps)."""
    start, done = time.perf_counter(), 0
    while True:
        losses = engine.train_batch(data)
        done += 1
        step = engine.global_steps
        over = search.observe(step, engine.module) if search is not None else done >= steps
        check = search.check_at(step) if search is not None else None
        if check is not None or step % log_interval == 0 or over:
            loss_line = "  ".join(f"{k} {v.item():.3f}" for k, v in losses.items())
            print(f"  step {step:>4}  {loss_line}  theta {engine.get_pld_theta():.3f}", flush=True)
        if check is not None:
            print("  " + check.line(), flush=True)
        if over:
            return (time.perf_counter() - start) / done, done


def time_full_and_slim(args: argparse.Namespace, full_cfg: Any, slim: BertForPreTraining, batch: dict
                       ) -> tuple[float, float]:
    """Median seconds per optimizer step of the full and the slim model on one batch, no PLD, timed in
    alternation so both see the same load."""
    config = ds_config(args, None)
    torch.manual_seed(0)
    # a fresh copy of the slim model: the training engines' hooks stay on the one they trained
    fresh = BertForPreTraining(slim.config)
    fresh.load_state_dict(slim.state_dict())
    engines = {"full": PLDEngine(BertForPreTraining(full_cfg), config, seed=args.seed),
               "slim": PLDEngine(fresh, config, seed=args.seed)}

    def step_fn(engine: PLDEngine):
        def step() -> None:
            out = engine(**batch)
            engine.backward(out.loss)
            engine.step()
        return step

    times: dict[str, list[float]] = {"full": [], "slim": []}
    for _ in range(args.timing_repeats):
        for name, engine in engines.items():
            times[name].append(time_steps(step_fn(engine), 2, args.timing_steps, 1))
    for engine in engines.values():
        engine.engine.destroy()
    return statistics.median(times["full"]), statistics.median(times["slim"])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load_start = os.getloadavg()
    print(f"earlybert_run: load average at start {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}, "
          f"{torch.get_num_threads()} torch threads", flush=True)
    data, vocab_size, seq_len = batches(args)
    config = ds_config(args, args.pld)
    full_cfg = model_config(args.model, vocab_size=vocab_size)
    torch.manual_seed(args.seed)
    model = BertForPreTraining(dataclasses.replace(full_cfg, slimming=True))
    search = TicketSearch(model, EarlyBertConfig.from_ds_config(config), penalty_layers=args.penalty_layers)
    engine = PLDEngine(model, config, seed=args.seed)
    print(f"search: {args.model} ({earlybert.parameter_count(full_cfg) / 1e6:.2f}M params), seq {seq_len}, "
          f"micro-batch {args.micro_batch}, {engine.pld}, {search.cfg}", flush=True)
    search_seconds, search_steps = train_phase(engine, data, None, search, args.log_interval)
    slim = search.draw(engine.module, seq_len=seq_len)
    engine.engine.destroy()
    for line in search.report.lines():
        print(line, flush=True)

    summary: dict[str, Any] = {"model": args.model, "seq_len": seq_len, "micro_batch": args.micro_batch,
                               "search_steps": search_steps, "search_seconds_per_step": search_seconds,
                               "report": dataclasses.asdict(search.report),
                               "distances": [c.distance for c in search.checks]}
    if args.slim_steps:
        engine = PLDEngine(slim, config, seed=args.seed)
        print(f"slim training: {args.slim_steps} steps from the {args.weights} weights, no penalty", flush=True)
        seconds, _ = train_phase(engine, data, args.slim_steps, None, args.log_interval)
        summary["slim_seconds_per_step"] = seconds
        print(f"time per step in training (data loading included): search (full model + coefficients) "
              f"{search_seconds:.3f} s, slim {seconds:.3f} s, ratio {seconds / search_seconds:.3f}", flush=True)
        engine.engine.destroy()
    if args.timing_steps:
        full_s, slim_s = time_full_and_slim(args, full_cfg, slim, next(data))
        flop_ratio = search.report.flops_slim / search.report.flops_full
        summary.update(full_timed_seconds=full_s, slim_timed_seconds=slim_s, time_ratio=slim_s / full_s,
                       flop_ratio=flop_ratio)
        print(f"timed (same batch, no PLD, median of {args.timing_repeats} x {args.timing_steps} steps): "
              f"full {full_s:.3f} s/step, slim {slim_s:.3f} s/step, ratio slim/full {slim_s / full_s:.3f} "
              f"(FLOP ratio {flop_ratio:.3f})", flush=True)
    load_end = os.getloadavg()
    summary["load_average"] = {"start": load_start, "end": load_end}
    print(f"earlybert_run: load average at end {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
