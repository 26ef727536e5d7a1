"""What binning by length saves: padding computed, and the time of training steps, with and without.

    python bench/length_binning.py --data PREP_OUTPUT [--model mini] [--micro-batch 32] [--batches 20] [--repeats 3]

Reads the first N batches of an epoch both ways (ShardBatches with and without bin_by_length, same
seed) and reports the fraction of computed token positions that are padding. Then times forward +
backward + an SGD step of the model preset on each set of batches (on a GPU when there is one, under
bf16 autocast), alternating the two sets `repeats` times (so drift in machine load hits both), and
prints the median seconds per sample.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch

from pld_ds.config import model_config, padded_vocab_size
from pld_ds.data.loader import ShardBatches
from pld_ds.model import BertForPreTraining
from pld_ds.pretrain import data_folders, data_vocabulary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--model", default="mini")
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    train_paths, _ = data_folders(args.data, None)
    vocab_size, masking = data_vocabulary(args.data, None)
    sets = {}
    for binned in (False, True):
        loader = ShardBatches(train_paths, args.micro_batch, vocab_size, masking=masking, seed=1, bin_by_length=binned)
        sets[binned] = list(itertools.islice(iter(loader), args.batches))
    seq = sets[False][0]["input_ids"].shape[1]
    for binned, batches in sets.items():
        computed = sum(b["input_ids"].numel() for b in batches)
        real = sum(int(b["attention_mask"].sum()) for b in batches)
        print(f"{'binned' if binned else 'plain '}: {computed / (len(batches) * args.micro_batch * seq):.3f} of the "
              f"full width computed, padding {1 - real / computed:.3f} of it")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    sets = {binned: [{k: v.to(device) for k, v in b.items()} for b in batches] for binned, batches in sets.items()}
    torch.manual_seed(0)
    model = BertForPreTraining(model_config(args.model, vocab_size=padded_vocab_size(vocab_size))).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)

    def run(batches: list[dict[str, torch.Tensor]]) -> None:
        for batch in batches:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):  # bf16 on a GPU, fp32 on CPU
                loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    run(sets[False][:2] + sets[True][:2])  # warm-up
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.repeats):
        for binned in (False, True):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            run(sets[binned])
            if cuda:
                torch.cuda.synchronize()
            times[binned].append((time.perf_counter() - start) / (len(sets[binned]) * args.micro_batch))
    plain, binned = statistics.median(times[False]), statistics.median(times[True])
    where = torch.cuda.get_device_name() + ", bf16 autocast" if cuda else f"{torch.get_num_threads()} threads"
    print(f"{args.model}, seq {seq}, micro-batch {args.micro_batch}, {where}: "
          f"{plain * 1e3:.3f} ms/sample plain, {binned * 1e3:.3f} ms/sample binned: ratio {binned / plain:.3f}")


if __name__ == "__main__":
    main()
