"""Profile one PLD-engine training step and the same model in plain PyTorch (where the time goes).

    python bench/profile_step.py --model base --seq-len 128 --micro-batch 64 [--theta 0.5]
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from pld_ds.bench import PRECISIONS, ds_config, synthetic_batch, time_steps
from pld_ds.config import model_config
from pld_ds.engine import PLDEngine
from pld_ds.model import BertForPreTraining


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="base")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=64)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--theta", type=float, default=None)
    p.add_argument("--rows", type=int, default=25)
    args = p.parse_args()
    cfg = model_config(args.model)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")

    model = BertForPreTraining(cfg).to(device=device, dtype=PRECISIONS[args.precision]).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    batch = synthetic_batch(cfg, args.micro_batch, args.seq_len, device)

    def plain_step() -> None:
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds = time_steps(plain_step, 5, 10, 3)
    print(f"plain torch ({args.precision} weights, fused AdamW): {args.micro_batch / seconds:.0f} samples/s")

    engine = PLDEngine(BertForPreTraining(cfg), ds_config(args.micro_batch, args.precision, 0, args.theta))
    inner = getattr(engine.optimizer, "optimizer", None)
    print("optimizer:", type(engine.optimizer).__name__, "inner:", type(inner).__name__)

    def engine_step() -> None:
        out = engine(**batch)
        engine.backward(out.loss)
        engine.step()

    seconds = time_steps(engine_step, 5, 10, 3)
    print(f"PLD engine: {args.micro_batch / seconds:.0f} samples/s")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            engine_step()
        if cuda:
            torch.cuda.synchronize()
    sort = "cuda_time_total" if cuda else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=args.rows))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
