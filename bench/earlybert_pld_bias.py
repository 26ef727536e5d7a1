"""Does PLD bias EarlyBERT's ticket? The search's coefficients per layer, with PLD off and on, for each way
of applying the L1 penalty to layers that PLD dropped (pld_ds.earlybert.penalty_weights).

    pld-prep --input text/ --output shards/ --train-vocab 8000
    python bench/earlybert_pld_bias.py --data shards/ --steps 300 --seeds 1 2 [--json out.json]

For every seed, the variants start from the same weights and read the same batches; the PLD variants
also draw the same gates at every step, so they differ only in the penalty:
  off           no PLD (the reference ranking)
  all           PLD, L1 on every layer, also on those that did not run (the default)
  ran_unscaled  PLD, L1 only on the layers that ran
  ran           PLD, L1 only on the layers that ran, times 1/p
A plain AdamW loop (zero gradients, not None, for layers that did not run, as DeepSpeed gives them) keeps
the measurement free of engine start-up. Printed per variant, averaged over seeds and per layer: the
fraction of the layer's neurons the global ranking prunes, the mean |c| of its neurons and of its heads,
and the agreement of the neuron and head masks with the PLD-off masks of the same seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from pld_ds import earlybert, pld
from pld_ds.config import model_config, padded_vocab_size
from pld_ds.data.loader import ShardBatches
from pld_ds.model import BertForPreTraining

VARIANTS = ("off", "all", "ran_unscaled", "ran")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="pld-prep output folder")
    p.add_argument("--model", default="",
                   help="preset or JSON (default: 8 layers, hidden 64, 4 heads, FFN 256: depth at little cost)")
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--lambda-heads", type=float, default=1e-4)
    p.add_argument("--lambda-neurons", type=float, default=1e-4)
    p.add_argument("--head-prune-ratio", type=float, default=1 / 3)
    p.add_argument("--neuron-prune-ratio", type=float, default=0.4)
    p.add_argument("--theta", type=float, default=0.5, help="PLD theta-bar")
    p.add_argument("--gamma", type=float, default=0.01, help="PLD gamma")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--json", metavar="FILE")
    return p.parse_args(argv)


def search(args: argparse.Namespace, variant: str, seed: int) -> dict[str, Any]:
    from pld_ds.pretrain import data_folders, data_vocabulary

    train_paths, _ = data_folders(args.data, None)
    vocab_size, masking = data_vocabulary(args.data, None)
    overrides = dict(vocab_size=padded_vocab_size(vocab_size), slimming=True)
    if args.model:
        cfg = model_config(args.model, **overrides)
    else:
        cfg = dataclasses.replace(model_config("tiny"), hidden_size=64, num_layers=8, num_heads=4,
                                  intermediate_size=256, **overrides)
    torch.manual_seed(seed)
    model = BertForPreTraining(cfg).train()
    layers = "all" if variant == "off" else variant
    handle = earlybert.add_penalty_to_loss(model, args.lambda_heads, args.lambda_neurons, layers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / args.warmup))
    batches = iter(ShardBatches(train_paths, args.micro_batch, vocab_size, seed=seed, masking=masking, prefetch=0))
    start, run_counts = time.perf_counter(), torch.zeros(cfg.num_layers)
    for step in range(args.steps):
        kwargs: dict[str, Any] = {}
        if variant != "off":
            kwargs = dict(progressive_layer_drop=True, pld_theta=pld.theta(step, args.theta, args.gamma),
                          pld_generator=pld.gate_generator(seed, step, 0))
        out = model(**next(batches), **kwargs)
        if out.gates is not None:
            run_counts += torch.tensor([float(kept) for kept, _ in out.gates])
        optimizer.zero_grad(set_to_none=False)
        out.loss.backward()
        optimizer.step()
        schedule.step()
    handle.remove()
    heads, neurons = earlybert.coefficients(model)
    masks = earlybert.masks_from_coefficients(heads, neurons, args.head_prune_ratio, args.neuron_prune_ratio)
    return {
        "variant": variant, "seed": seed, "seconds": time.perf_counter() - start,
        "pruned_neuron_fraction": [1 - float(m.float().mean()) for m in masks.neurons],
        "mean_abs_neuron_coef": [float(c.detach().abs().mean()) for c in neurons],
        "mean_abs_head_coef": [float(c.detach().abs().mean()) for c in heads],
        "ran_fraction": (run_counts / args.steps).tolist() if variant != "off" else [1.0] * cfg.num_layers,
        "last_mlm_loss": out.mlm_loss.item(), "masks": masks,
    }


def summarise(runs: list[dict[str, Any]], variants: list[str]) -> dict[str, Any]:
    reference = {r["seed"]: r["masks"] for r in runs if r["variant"] == "off"}
    summary: dict[str, Any] = {}
    for variant in variants:
        mine = [r for r in runs if r["variant"] == variant]
        row = {key: [statistics.mean(vals) for vals in zip(*(r[key] for r in mine), strict=True)]
               for key in ("pruned_neuron_fraction", "mean_abs_neuron_coef", "mean_abs_head_coef", "ran_fraction")}
        if reference:
            distances = [r["masks"].distances(reference[r["seed"]]) for r in mine if r["seed"] in reference]
            row["head_mask_agreement_with_off"] = statistics.mean(1 - h for h, _ in distances)
            row["neuron_mask_agreement_with_off"] = statistics.mean(1 - n for _, n in distances)
        row["last_mlm_loss"] = statistics.mean(r["last_mlm_loss"] for r in mine)
        summary[variant] = row
    return summary


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    load = os.getloadavg()
    print(f"earlybert_pld_bias: {args.steps} steps, seeds {args.seeds}, theta-bar {args.theta} gamma {args.gamma}, "
          f"lambda {args.lambda_heads}/{args.lambda_neurons}; load average {load[0]:.2f}", flush=True)
    runs = []
    for seed in args.seeds:
        for variant in args.variants:
            runs.append(search(args, variant, seed))
            print(f"  seed {seed} {variant:<13} {runs[-1]['seconds']:.0f} s  pruned neuron fraction per layer "
                  + " ".join(f"{f:.2f}" for f in runs[-1]["pruned_neuron_fraction"]), flush=True)
    summary = summarise(runs, args.variants)
    print("\nmean over seeds, per layer (first to last):")
    for variant, row in summary.items():
        print(f"{variant:<13} pruned neurons  " + " ".join(f"{v:.3f}" for v in row["pruned_neuron_fraction"]))
        print(f"{'':<13} mean |c| neuron " + " ".join(f"{v:.3f}" for v in row["mean_abs_neuron_coef"]))
        print(f"{'':<13} mean |c| head   " + " ".join(f"{v:.3f}" for v in row["mean_abs_head_coef"]))
        print(f"{'':<13} ran fraction    " + " ".join(f"{v:.2f}" for v in row["ran_fraction"]))
        if "neuron_mask_agreement_with_off" in row:
            print(f"{'':<13} agreement with off: neurons {row['neuron_mask_agreement_with_off']:.3f}, "
                  f"heads {row['head_mask_agreement_with_off']:.3f}; last MLM loss {row['last_mlm_loss']:.3f}")
    if args.json:
        plain = [{k: v for k, v in r.items() if k != "masks"} for r in runs]
        Path(args.json).write_text(json.dumps({"args": vars(args), "summary": summary, "runs": plain}, indent=2))


if __name__ == "__main__":
    main()
