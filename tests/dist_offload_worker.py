"""Worker for tests/test_distributed.py: every ZeRO stage, with and without offload_optimizer, against ZeRO-0.

    python tests/dist_offload_worker.py --out FILE                                 (one rank)
    deepspeed --num_gpus 2 --master_port P tests/dist_offload_worker.py --out FILE (two ranks)

PLD gates are forced (pld.sample_gates is replaced by a table indexed by the (step, micro-batch) that the
engine's gate generator was seeded with), so one run covers a layer dropped for a whole step, dropped
in the last micro-batch of a window only, and in the first only. The optimizer is plain SGD (no
momentum, no weight decay): a zero gradient leaves a dropped layer exactly where it was, and a stale
gradient moves it. Gradient clipping is on and active, so a wrong gradient norm changes every weight.
Each rank trains on its own synthetic data. Rank 0 writes, per (stage, offload, accumulation), the final
weights and the weights of each step (torch.save) to the folder of --out, and a JSON summary to --out.
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

from pld_helpers import load_ds_config, synthetic_batch, tiny_config  # noqa: E402

from pld_ds import pld  # noqa: E402
from pld_ds.engine import PLDEngine  # noqa: E402
from pld_ds.model import BertForPreTraining  # noqa: E402

SEED, STEPS, LR, CLIP = 7, 3, 0.5, 0.3
# Layers dropped (0-based) per (step, micro-batch); any pair not listed keeps every layer. With two
# micro-batches per step: layer 3 is dropped for the whole of steps 1 and 2; in step 1 layer 2 runs in
# the first micro-batch only and layer 1 in the last only; in step 2 the other way round.
DROPPED_GAS2 = {(1, 0): {1, 3}, (1, 1): {2, 3}, (2, 0): {2, 3}, (2, 1): {1, 3}}
# One micro-batch per step: layers 3 and 2 dropped in step 1, layers 3 and 1 in step 2.
DROPPED_GAS1 = {(1, 0): {2, 3}, (2, 0): {1, 3}}


def forced_gates(dropped: dict[tuple[int, int], set[int]], seed: int):
    """A stand-in for pld.sample_gates that keeps or drops by the table; probabilities as pld's own."""
    by_seed = {pld.gate_seed(seed, step, micro): (step, micro) for step in range(STEPS) for micro in range(2)}

    def sample(num_layers: int, theta_now: float, generator: torch.Generator | None = None):
        drop = dropped.get(by_seed[generator.initial_seed()], set())
        return [(i not in drop, p) for i, p in enumerate(pld.keep_probs(num_layers, theta_now))]

    return sample


def full_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter in full (ZeRO-3 keeps only a partition of each), as fp32 on the CPU."""
    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        return {name: p.detach().float().cpu().clone() for name, p in module.named_parameters()}


def run(stage: int, offload: str, gas: int, precision: str, zero_options: dict) -> dict:
    config = load_ds_config("tiny_cpu_pld.json")
    for key in ("scheduler", "optimizer", "tensorboard", "csv_monitor"):
        config.pop(key, None)
    zero: dict = {"stage": stage, **zero_options}
    if offload in ("opt", "opt+param"):
        zero["offload_optimizer"] = {"device": "cpu"}
    if offload == "opt+param":
        zero["offload_param"] = {"device": "cpu"}
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif precision == "autocast":
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    config.update(train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=gas, gradient_clipping=CLIP,
                  zero_optimization=zero, zero_force_ds_cpu_optimizer=False,
                  zero_allow_untested_optimizer=True)
    config["progressive_layer_drop"] = {"enabled": True, "theta": 0.5, "gamma": 0.5}
    pld.sample_gates = forced_gates(DROPPED_GAS2 if gas == 2 else DROPPED_GAS1, SEED)
    torch.manual_seed(0)
    model = BertForPreTraining(tiny_config())
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    engine = PLDEngine(model, config, seed=SEED, optimizer=optimizer)
    rank = dist.get_rank()
    weights, norms = [full_weights(engine.module)], []
    for step in range(STEPS):
        data = [synthetic_batch(batch=2, seq_len=16, seed=1000 * rank + 10 * step + micro) for micro in range(gas)]
        engine.train_batch(iter(data))
        weights.append(full_weights(engine.module))
        norms.append(engine.optimizer_scalars().get("train/grad_norm"))
    engine.engine.destroy()
    return {"weights": weights, "norms": norms}


def _value(text: str) -> bool | int:
    """OPTION=0|1 is a boolean switch; any other number an integer setting (a bucket size, a threshold)."""
    return text == "1" if text in ("0", "1") else int(text)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--cases", nargs="+", required=True,
                        help="STAGE:OFFLOAD:GAS:PRECISION[:OPTION=N ...], OFFLOAD none, opt or opt+param, "
                             "PRECISION fp32, bf16 or autocast, OPTION a zero_optimization key (0/1: a switch); "
                             "e.g. 3:opt:2:fp32 or 2:none:2:fp32:overlap_comm=1")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1)  # passed by the launcher
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    summary = []
    for case in args.cases:
        stage, offload, gas, precision, *options = case.split(":")
        result = run(int(stage), offload, int(gas), precision, {name: _value(value) for name, value in
                                                                 (option.split("=") for option in options)})
        if dist.get_rank() == 0:
            torch.save(result["weights"], out.parent / f"{case.replace(':', '_')}.pt")
        summary.append({"case": case, "norms": result["norms"], "world": dist.get_world_size()})
    if dist.get_rank() == 0:
        out.write_text(json.dumps(summary, indent=2))
    dist.barrier()


if __name__ == "__main__":
    main()
