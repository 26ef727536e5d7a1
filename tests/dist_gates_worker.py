"""Worker for tests/test_distributed.py, launched on two CPU ranks:

    deepspeed --num_gpus 2 --master_port P tests/dist_gates_worker.py --out FILE --zero S [S ...]

For each ZeRO stage: a tiny BertForPreTraining in a PLDEngine, a few optimizer steps on different
synthetic data per rank, recording which encoder layers ran and the loss at every step, and after
every step the loss of this rank's own eval forward on one probe batch that every rank shares; then a
checksum of the parameters (gathered under ZeRO-3; under ZeRO-0 each rank's own copy, which its own
optimizer stepped). Rank 0 writes every rank's records
(all_gather_object) as JSON, and the final weights of each stage beside it (final_zeroS.pt).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pld_helpers import checksum_of, load_ds_config, synthetic_batch, tiny_config  # noqa: E402

from pld_ds import pld  # noqa: E402
from pld_ds.engine import PLDEngine  # noqa: E402
from pld_ds.model import BertForPreTraining  # noqa: E402

THETA_BAR, GAMMA, SEED = 0.3, 0.5, 123


def full_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter in full on every rank (ZeRO-3 keeps only a partition of each)."""
    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        return {name: p.detach().float().clone() for name, p in module.named_parameters()}


def run(stage: int, steps: int, bf16: bool, out_dir: Path) -> dict:
    config = load_ds_config("tiny_cpu_pld.json")
    config.update(train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=1,
                  zero_optimization={"stage": stage}, bf16={"enabled": bf16})
    config["progressive_layer_drop"] = {"enabled": True, "theta": THETA_BAR, "gamma": GAMMA}
    for monitor in ("tensorboard", "csv_monitor"):
        config.pop(monitor, None)
    torch.manual_seed(0)
    engine = PLDEngine(BertForPreTraining(tiny_config(dropout=0.1)), config, seed=SEED)
    rank = dist.get_rank()
    ran: list[int] = []
    for index, layer in enumerate(engine.module.encoder.layers):
        layer.register_forward_hook(lambda module, args, output, index=index: ran.append(index))
    initial = checksum_of(full_weights(engine.module))
    records = []
    probe = synthetic_batch(batch=4, seq_len=16, seed=999)  # the same on every rank
    for step in range(steps):
        ran.clear()
        theta_now = engine.get_pld_theta()
        batch = synthetic_batch(batch=4, seq_len=16, seed=1000 * (rank + 1) + step)  # different data per rank
        losses = engine.train_batch(iter([batch]))
        expected = [i for i, (kept, _) in enumerate(pld.sample_gates(4, theta_now, pld.gate_generator(SEED, step, 0)))
                    if kept]
        layers = list(ran)  # before the probe, which runs every layer
        engine.eval()
        with torch.no_grad():
            probe_loss = engine(**{k: v.to(engine.device) for k, v in probe.items()}).loss.item()
        engine.train()
        records.append({"step": step, "global_steps": engine.global_steps, "theta": theta_now, "layers": layers,
                        "expected_layers": expected, "loss": losses["loss"].item(), "probe_loss": probe_loss})
    final = full_weights(engine.module)
    if rank == 0:
        torch.save(final, out_dir / f"final_zero{stage}.pt")
    mine = {"rank": rank, "world": dist.get_world_size(), "records": records, "initial": initial,
            "final": checksum_of(final), "dtype": str(next(engine.module.parameters()).dtype)}
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    engine.engine.destroy()
    return {"stage": stage, "ranks": gathered}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--zero", type=int, nargs="+", required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1)  # passed by the launcher
    args = parser.parse_args()
    results = [run(stage, args.steps, args.bf16, Path(args.out).parent) for stage in args.zero]
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(results, indent=2))
    dist.barrier()


if __name__ == "__main__":
    main()
