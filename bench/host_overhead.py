"""Host time per optimizer step: the PLD engine against a plain PyTorch loop, on a model too small to
keep any device busy, so what is timed is Python, kernel launches and DeepSpeed's bookkeeping.

    python bench/host_overhead.py [--layers 12] [--precision fp32 amp-bf16] [--theta 1 0.5]

The model has BERT-base's parameter structure (12 layers of 12 tensors, 160 in all) at width 32;
--layers 24 gives BERT-large's (304 tensors), the count the engine's per-tensor host work scales with. On a
GPU a step whose host time exceeds its kernel time is host-bound, and then no kernel fusion and no
dropped layer makes it faster: this is the part of the engine's step that a GPU cannot hide. Rows: milliseconds per
step, median of repeats, and the ratio to the plain loop of the same precision.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from pld_ds.bench import ds_config, synthetic_batch
from pld_ds.engine import PLDEngine
from pld_ds.model import BertConfig, BertForPreTraining

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed(step, warmup: int, steps: int, repeats: int, clock=time.perf_counter) -> float:
    """Median milliseconds per step."""
    cuda = torch.cuda.is_available()
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = clock()
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
        times.append((clock() - start) / steps * 1e3)
    return statistics.median(times)


def plain(cfg: BertConfig, precision: str, device: torch.device, args: argparse.Namespace) -> float:
    torch.manual_seed(0)
    model = BertForPreTraining(cfg).to(device).train()
    cuda = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, **({"fused": True} if cuda else
                                                                              {"foreach": True}))
    batch = synthetic_batch(cfg, args.micro_batch, args.seq_len, device)
    params = list(model.parameters())

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "amp-bf16"):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed(step, args.warmup, args.steps, args.repeats, CLOCKS[args.clock])


def engine(cfg: BertConfig, precision: str, theta: float, args: argparse.Namespace) -> float:
    torch.manual_seed(0)
    eng = PLDEngine(BertForPreTraining(cfg), ds_config(args.micro_batch, precision, 0, None if theta >= 1 else theta))
    batch = synthetic_batch(cfg, args.micro_batch, args.seq_len, eng.device)

    def step() -> None:
        out = eng(**batch)
        eng.backward(out.loss)
        eng.step()

    ms = timed(step, args.warmup, args.steps, args.repeats, CLOCKS[args.clock])
    eng.engine.destroy()
    return ms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--precision", nargs="+", default=["fp32", "amp-bf16"], choices=["fp32", "amp-bf16"])
    p.add_argument("--theta", type=float, nargs="+", default=[1.0, 0.5])
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=8)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="cpu: this process's CPU time (all its threads), steadier than wall time on a shared CPU")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = BertConfig(vocab_size=128, hidden_size=32, num_layers=args.layers, num_heads=2, intermediate_size=64,
                     max_position_embeddings=max(16, args.seq_len))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tensors = sum(1 for _ in BertForPreTraining(cfg).parameters())
    print(f"device {device}, {args.layers} layers ({tensors} parameter tensors), width 32, micro-batch "
          f"{args.micro_batch}, seq {args.seq_len}, {args.clock} clock, load average {os.getloadavg()[0]:.1f}")
    print("| precision | loop | theta | ms/step | vs plain |\n|---|---|---|---|---|")
    for precision in args.precision:
        base = plain(cfg, precision, device, args)
        print(f"| {precision} | plain PyTorch | 1 | {base:.2f} | 1 |", flush=True)
        for theta in args.theta:
            ms = engine(cfg, precision, theta, args)
            print(f"| {precision} | PLDEngine | {theta:g} | {ms:.2f} | {ms / base:.2f} |", flush=True)


if __name__ == "__main__":
    main()
