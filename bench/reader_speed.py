"""Speed and memory of ShardBatches: samples/s of iteration, masking and collation included.

    python bench/reader_speed.py --data DIR [--micro-batch 64] [--world-size W --rank R] [--batches N]

DIR is a pld-prep output folder (its manifest gives the vocabulary, and the [MASK] id for
dynamic-masking shards) or a folder of shards. One full epoch is read (or N batches) on one rank,
with torch limited to one thread. Reported: wall samples/s, samples per CPU-second of this process
(the prefetch thread included: "per core"), and RSS at the start, every tenth of the epoch, and at
the end.
"""

from __future__ import annotations

import argparse
import time

import torch

from pld_ds.data.loader import ShardBatches
from pld_ds.pretrain import data_folders, data_vocabulary


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="pld-prep output folder, or a folder of shards")
    p.add_argument("--micro-batch", type=int, default=64)
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--batches", type=int, default=0, help="batches to read (default: one epoch)")
    p.add_argument("--step-ms", type=float, default=0.0,
                   help="sleep this long after each batch, standing in for a training step on a GPU (which holds "
                        "no Python lock): shows how much of the reading prefetch hides")
    args = p.parse_args()
    torch.set_num_threads(1)

    rss_before = rss_mib()
    train_paths, _ = data_folders(args.data, None)
    vocab_size, masking = data_vocabulary(args.data, None)
    loader = ShardBatches(train_paths, args.micro_batch, vocab_size, rank=args.rank, world_size=args.world_size,
                          masking=masking, prefetch=args.prefetch)
    kind = "dynamic" if masking is not None and not loader.infos[0].static_masking else "static"
    batches = args.batches or loader.batches_per_epoch
    samples = sum(info.num_samples for info in loader.infos)
    print(f"{args.data}: {len(loader.infos)} shards, {samples:,} samples, seq {loader.seq_len}, {kind} masking; "
          f"reading {batches:,} batches of {args.micro_batch} on rank {args.rank} of {args.world_size}")
    rss = [rss_mib()]
    checkpoints = {max(1, batches * k // 10) for k in range(1, 11)}
    wall, cpu = time.perf_counter(), time.process_time()
    it = iter(loader)
    masked, waited = 0, 0.0
    for i in range(1, batches + 1):
        before = time.perf_counter()
        batch = next(it)
        waited += time.perf_counter() - before
        masked += int((batch["masked_lm_labels"] != -100).sum())
        if args.step_ms:
            time.sleep(args.step_ms / 1000)
        if i in checkpoints:
            rss.append(rss_mib())
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    n = batches * args.micro_batch
    if args.step_ms:
        print(f"time waiting for data      {waited:.2f} s of {wall:.2f} s ({waited / batches * 1e3:.2f} ms a batch)")
    print(f"samples/s (wall)           {n / wall:,.0f}")
    print(f"samples per CPU-second     {n / cpu:,.0f}  ({cpu / wall:.2f} cores busy on average)")
    print(f"MLM targets per sample     {masked / n:.1f}")
    print(f"RSS MiB before loader      {rss_before:.0f}")
    print("RSS MiB start, each 10%    " + " ".join(f"{r:.0f}" for r in rss))


if __name__ == "__main__":
    main()
