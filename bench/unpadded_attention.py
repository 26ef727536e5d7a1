"""The padded and the unpadded encoder (BertConfig.unpadded) on batches with real padding: first that they
agree, then the time per sample of each.

    python bench/unpadded_attention.py [--data PREP_OUTPUT [--buckets 64,96,128]] [--model base]
        [--seq-len 128] [--micro-batch 64] [--fill 0.7] [--precision amp-bf16] [--compile [BACKEND]]
        [--compile-mode reduce-overhead] [--theta 1 0.5]

Batches come from --data (the first --batches of an epoch; --buckets bins them by length and cuts each
to its bucket, as pld-pretrain --length-buckets does) or are synthetic: lengths uniform between
(2 fill - 1) x seq-len and seq-len, so on average `fill` of the positions are real. Both models hold
the same weights. The check: loss and MLM logits of the first batch in evaluation mode, padded against
unpadded. The timing: forward, backward and an SGD step per batch (bf16 autocast with amp-bf16), the
two paths alternated `repeats` times so drifts in load hit both; for each theta (1: no PLD), median
milliseconds per sample and the ratio unpadded / padded. A path that fails to compile is reported with
its error and timed eager. On a CPU it runs too (small models only): the GPU is where it matters.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import statistics
import time
from typing import Any

import torch

from pld_ds import pld
from pld_ds.config import compile_backend, model_config, padded_vocab_size
from pld_ds.model import BertForPreTraining


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", help="pld-prep output folder (default: synthetic batches)")
    p.add_argument("--buckets", help="with --data: length buckets, e.g. 64,96,128 (default: no binning)")
    p.add_argument("--model", default="mini")
    p.add_argument("--seq-len", type=int, default=128, help="synthetic batches only")
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--fill", type=float, default=0.7, help="synthetic batches: mean fraction of real positions")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--precision", choices=["fp32", "amp-bf16"], default="amp-bf16" if torch.cuda.is_available()
                   else "fp32")
    p.add_argument("--compile", nargs="?", const="inductor", type=compile_backend, metavar="BACKEND")
    p.add_argument("--compile-mode", help="torch.compile mode, e.g. reduce-overhead (per-layer CUDA graphs)")
    p.add_argument("--theta", type=float, nargs="+", default=[1.0])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    return p.parse_args(argv)


def synthetic(cfg: Any, args: argparse.Namespace) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    low = max(2, round((2 * args.fill - 1) * args.seq_len))
    out = []
    for _ in range(args.batches):
        b, s = args.micro_batch, args.seq_len
        lengths = torch.randint(low, s + 1, (b,), generator=g)
        mask = (torch.arange(s)[None, :] < lengths[:, None]).long()
        ids = torch.randint(5, cfg.vocab_size, (b, s), generator=g) * mask
        labels = torch.where((torch.rand(b, s, generator=g) < 0.15) & mask.bool() & (torch.arange(s) > 0), ids,
                             torch.full_like(ids, -100))
        out.append({"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "attention_mask": mask,
                    "masked_lm_labels": labels, "next_sentence_labels": torch.randint(0, 2, (b,), generator=g)})
    return out


def from_shards(args: argparse.Namespace) -> tuple[list[dict[str, torch.Tensor]], int]:
    from pld_ds.data.loader import ShardBatches
    from pld_ds.pretrain import data_folders, data_vocabulary

    train_paths, _ = data_folders(args.data, None)
    vocab_size, masking = data_vocabulary(args.data, None)
    buckets = [int(x) for x in args.buckets.split(",")] if args.buckets else None
    loader = ShardBatches(train_paths, args.micro_batch, vocab_size, masking=masking, seed=1,
                          bin_by_length=buckets is not None, length_buckets=buckets)
    return list(itertools.islice(iter(loader), args.batches)), vocab_size


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.data:
        batches, vocab = from_shards(args)
        cfg = model_config(args.model, vocab_size=padded_vocab_size(vocab))
    else:
        cfg = model_config(args.model)
        batches = synthetic(cfg, args)
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    computed = sum(b["attention_mask"].numel() for b in batches)
    shapes = sorted({tuple(b["input_ids"].shape) for b in batches})
    torch.manual_seed(0)
    models = {"padded": BertForPreTraining(cfg).to(device)}
    models["unpadded"] = BertForPreTraining(dataclasses.replace(cfg, unpadded=True)).to(device)
    models["unpadded"].load_state_dict(models["padded"].state_dict())
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=args.precision == "amp-bf16")

    with torch.no_grad(), torch.autocast(**autocast):  # the check, before any compile
        outs = {name: model.eval()(**batches[0]) for name, model in models.items()}
    loss_diff = abs(outs["padded"].loss.float().item() - outs["unpadded"].loss.float().item())
    logit_diff = (outs["padded"].mlm_logits.float() - outs["unpadded"].mlm_logits.float()).abs().max().item()
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"{args.model}, {where}, {args.precision}, micro-batch {args.micro_batch}, {len(batches)} batches of "
          f"shapes {shapes}: {real / computed:.3f} of the padded positions are real")
    print(f"check (eval, first batch): |loss padded - unpadded| {loss_diff:.2e}, max |MLM logit diff| {logit_diff:.2e}")

    if args.compile:
        kwargs = {"backend": args.compile, **({"mode": args.compile_mode} if args.compile_mode else {})}
        for name, model in models.items():
            try:
                model.compile_layers(**kwargs)
                with torch.autocast(**autocast):
                    model.train()(**batches[0]).loss.backward()
            except Exception as err:  # noqa: BLE001 - report and time the eager path instead
                print(f"{name}: compile {kwargs} failed ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                      "timed eager", flush=True)
                for layer in model.encoder.layers:
                    layer._compiled_call_impl = None
                model.encoder.compiled = False
        from torch._dynamo.utils import counters

        print(f"dynamo: {counters['stats']['unique_graphs']} graphs, graph breaks {dict(counters['graph_break'])}, "
              f"recompiles {sum(counters['recompiles'].values())}", flush=True)

    optimizers = {name: torch.optim.SGD(model.parameters(), lr=1e-5) for name, model in models.items()}

    def run(name: str, theta: float, step0: int) -> None:
        model, opt = models[name].train(), optimizers[name]
        for i, batch in enumerate(batches):
            kwargs = {} if theta >= 1 else dict(progressive_layer_drop=True, pld_theta=theta,
                                                pld_generator=pld.gate_generator(0, step0 + i, 0))
            with torch.autocast(**autocast):
                loss = model(**batch, **kwargs).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    print("| theta | padded ms/sample | unpadded ms/sample | unpadded / padded |\n|---|---|---|---|")
    samples = len(batches) * args.micro_batch
    for theta in args.theta:
        for _ in range(args.warmup):
            for name in models:
                run(name, theta, 0)
        times: dict[str, list[float]] = {name: [] for name in models}
        for r in range(args.repeats):
            for name in models:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                run(name, theta, 1000 * (r + 1))  # the same gates for both paths
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append((time.perf_counter() - start) / samples * 1e3)
        padded, unpadded = statistics.median(times["padded"]), statistics.median(times["unpadded"])
        print(f"| {theta:g} | {padded:.3f} | {unpadded:.3f} | {unpadded / padded:.3f} |", flush=True)


if __name__ == "__main__":
    main()
