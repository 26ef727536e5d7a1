"""Pretrain PreLN BERT with Progressive Layer Dropping through DeepSpeed.

    deepspeed --num_gpus N --module pld_ds.pretrain --deepspeed_config ds_configs/X.json --data DIR --output DIR
    pld-pretrain --deepspeed_config ds_configs/X.json --data DIR --output DIR      (one process)
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pld_ds import metrics
from pld_ds.config import ConfigError, model_config, padded_vocab_size, read_json, split_ds_config
from pld_ds.data import schema
from pld_ds.data.loader import ShardBatches
from pld_ds.data.masking import DynamicMasking
from pld_ds.data.shards import ShardError, find_shards
from pld_ds.errors import UserError
from pld_ds.model import BertForPreTraining

BERT_VOCAB_SIZE = 30522


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="pld-pretrain", description=__doc__.split("\n")[0])
    p.add_argument("--deepspeed_config", "--deepspeed-config", required=True, metavar="FILE",
                   help="DeepSpeed JSON, may hold a progressive_layer_drop block")
    p.add_argument("--data", required=True, metavar="DIR",
                   help="folder of *.hdf5 shards, or a folder with train/ and validation/ shard folders")
    p.add_argument("--eval-data", metavar="DIR", help="folder of validation shards (default: DATA/validation)")
    p.add_argument("--output", required=True, metavar="DIR", help="checkpoints, logs and TensorBoard events")
    p.add_argument("--model", default="base", help="tiny, mini, small, base, large, or a JSON file of model fields")
    p.add_argument("--vocab-size", type=int, help="vocabulary size (default: the data's manifest.json, else 30522)")
    p.add_argument("--max-steps", type=int, default=1000, help="optimizer steps to train to")
    p.add_argument("--log-interval", type=int, default=10, help="write scalars every N optimizer steps")
    p.add_argument("--eval-interval", type=int, default=0, help="evaluate every N steps (0: only at the end)")
    p.add_argument("--eval-batches", type=int, default=50, help="at most N micro-batches per rank per evaluation")
    p.add_argument("--save-interval", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--resume", metavar="auto|PATH",
                   help="auto: newest checkpoint under OUTPUT, if any; or a checkpoint folder")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--skip-bad-shards", action="store_true",
                   help="leave out shards that fail validation at start, with a warning, instead of stopping")
    p.add_argument("--data-workers", type=int, default=0,
                   help="worker processes that prepare training batches (0: a background thread)")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute each kept layer in backward")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by deepspeed
    args = p.parse_args(argv)
    for name in ("max_steps", "log_interval"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("eval_interval", "eval_batches", "save_interval", "data_workers"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0")
    return args


def data_folders(data: str, eval_data: str | None) -> tuple[list[Path], list[Path]]:
    root = Path(data)
    train_dir = root / "train" if (root / "train").is_dir() else root
    train = find_shards(train_dir, "--data")
    if eval_data:
        return train, find_shards(eval_data, "--eval-data")
    validation = root / "validation"
    return train, find_shards(validation, "--data") if validation.is_dir() else []


def data_vocabulary(data: str, override: int | None) -> tuple[int, DynamicMasking | None]:
    """Vocabulary size, and masking for dynamic-masking shards when the manifest names a vocab file."""
    manifest = Path(data) / schema.MANIFEST_NAME
    if not manifest.is_file():
        return override or BERT_VOCAB_SIZE, None
    vocab = read_json(manifest, "manifest").get("vocab")
    size = vocab.get("size") if isinstance(vocab, dict) else None
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ConfigError(f"{manifest}: vocab.size: expected a positive integer, got {size!r}")
    size = override or size
    vocab_file = Path(data) / vocab["file"] if isinstance(vocab.get("file"), str) else None
    if vocab_file is None or not vocab_file.is_file():
        return size, None
    tokens = {t: i for i, t in enumerate(vocab_file.read_text(encoding="utf-8").splitlines())}
    if "[MASK]" not in tokens:
        raise ConfigError(f"{vocab_file}: no [MASK] token (expected a BERT WordPiece vocab.txt)")
    special = tuple(tokens[t] for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") if t in tokens)
    return size, DynamicMasking(mask_id=tokens["[MASK]"], special_ids=special, vocab_size=size)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@torch.no_grad()
def evaluate(engine: Any, batches: ShardBatches, max_batches: int) -> dict[str, float]:
    """MLM loss/accuracy and NSP accuracy over the validation shards, every layer run, summed over ranks."""
    engine.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=engine.device)  # mlm loss, correct, count, nsp ok, n
    for i, batch in enumerate(batches.one_pass()):
        if i >= max_batches:
            break
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        out = engine(**batch)
        labels = batch["masked_lm_labels"][batch["masked_lm_labels"] != schema.IGNORE_INDEX]
        sums += torch.stack([
            out.mlm_loss.double() * labels.numel(), (out.mlm_logits.argmax(-1) == labels).sum().double(),
            torch.tensor(labels.numel(), dtype=torch.float64, device=engine.device),
            (out.nsp_logits.argmax(-1) == batch["next_sentence_labels"]).sum().double(),
            torch.tensor(float(batch["input_ids"].shape[0]), dtype=torch.float64, device=engine.device),
        ])
    if dist.is_initialized():
        dist.all_reduce(sums)
    engine.train()
    mlm_loss, correct, count, nsp_ok, n = sums.tolist()
    return {"eval/mlm_loss": mlm_loss / max(count, 1), "eval/mlm_accuracy": correct / max(count, 1),
            "eval/nsp_accuracy": nsp_ok / max(n, 1)}


def resume_target(resume: str | None, checkpoints: Path) -> tuple[Path, str | None] | None:
    """(folder, tag) of the checkpoint to load: tag None means the folder's `latest`."""
    if resume is None or (resume == "auto" and not (checkpoints / "latest").is_file()):
        return None
    if resume == "auto":
        return checkpoints, None
    path = Path(resume)
    if not path.exists():
        raise UserError(f"--resume {resume}: no such checkpoint folder")
    return (path, None) if (path / "latest").is_file() else (path.parent, path.name)


def resume_from(engine: Any, resume: str, target: tuple[Path, str | None], train: ShardBatches) -> None:
    client = engine.load_checkpoint(*target)
    if client is None:
        raise UserError(f"--resume {resume}: no loadable checkpoint there")
    train.load_state_dict(client["data"])
    set_rng_state(client["rng"])


def log(rank: int, line: str) -> None:
    if rank == 0:
        print(line, flush=True)


def warn_skipped(rank: int, batches: ShardBatches, total: int) -> None:
    if rank == 0:
        for k, err in enumerate(batches.skipped, start=1):
            print(f"pld-pretrain: warning: skipping bad shard {k} of {len(batches.skipped)} "
                  f"({total} in the folder): {err}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> dict[str, float]:
    # Every input is checked before the model is built, so a typo costs a second, not a start-up.
    split_ds_config(args.deepspeed_config)
    train_paths, eval_paths = data_folders(args.data, args.eval_data)
    vocab_size, masking = data_vocabulary(args.data, args.vocab_size)
    cfg = model_config(args.model, vocab_size=padded_vocab_size(vocab_size),
                       activation_checkpointing=args.activation_checkpointing or None)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    output = Path(args.output)
    checkpoints = output / "checkpoints"
    target = resume_target(args.resume, checkpoints)
    from pld_ds.engine import PLDEngine  # imports deepspeed (seconds): after the input checks

    engine = PLDEngine(BertForPreTraining(cfg), args.deepspeed_config, seed=args.seed, output_dir=output)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    shard_args = dict(micro_batch=engine.micro_batch_size, vocab_size=vocab_size, rank=rank, world_size=world,
                      masking=masking, skip_bad_shards=args.skip_bad_shards)
    train = ShardBatches(train_paths, seed=args.seed, workers=args.data_workers, **shard_args)
    warn_skipped(rank, train, len(train_paths))
    if train.seq_len > cfg.max_position_embeddings:
        raise ShardError(f"{train_paths[0]}: sequence length {train.seq_len} exceeds the model's "
                         f"max_position_embeddings {cfg.max_position_embeddings}")
    valid = ShardBatches(eval_paths, seq_len=train.seq_len, **shard_args) if eval_paths else None
    if valid is not None:
        warn_skipped(rank, valid, len(eval_paths))
    if target is not None:
        resume_from(engine, args.resume, target, train)
    if rank == 0:
        output.mkdir(parents=True, exist_ok=True)
        resolved = {"args": vars(args), "model": asdict(cfg), "pld": asdict(engine.pld), "deepspeed": engine.ds_config}
        (output / "run_config.json").write_text(json.dumps(resolved, indent=2, default=str))
    # ZeRO-3 leaves partitioned parameters empty; ds_numel is their full size.
    params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    log(rank, f"pld-pretrain: {args.model} ({params / 1e6:.1f}M params), "
        f"{len(train.infos)} shards, {train.batches_per_epoch} steps/epoch, world {world}, PLD {engine.pld}")

    def save() -> None:
        engine.save_checkpoint(checkpoints, {"data": train.state_dict(), "rng": rng_state()})

    batches, meter, scalars = iter(train), metrics.Throughput(engine.global_steps * train.global_batch), {}
    masked_per_seq = 0.15 * train.seq_len
    while engine.global_steps < args.max_steps:
        losses = engine.train_batch(batches)
        step = engine.global_steps
        if step % args.log_interval == 0 or step == args.max_steps:
            samples_per_sec = meter.tick(step * train.global_batch)
            depth = engine.expected_depth() or cfg.num_layers
            flops = metrics.training_flops_per_sequence(cfg, train.seq_len, masked_per_seq, depth)
            scalars = {f"train/{k}": v.item() for k, v in losses.items()}
            scalars.update(engine.pld_scalars(), **{"train/lr": engine.get_lr(),
                           "train/samples_per_sec": samples_per_sec, "train/tflops": samples_per_sec * flops / 1e12})
            engine.write_scalars(scalars, step)
            log(rank, f"step {step:>6}  " + "  ".join(f"{k.split('/')[1]} {v:.4g}" for k, v in scalars.items()))
        if valid and args.eval_interval and step % args.eval_interval == 0 and step < args.max_steps:
            engine.write_scalars(evaluate(engine, valid, args.eval_batches), step)
        if args.save_interval and step % args.save_interval == 0 and step < args.max_steps:
            save()
    save()
    if valid:
        scalars.update(evaluate(engine, valid, args.eval_batches))
        engine.write_scalars({k: v for k, v in scalars.items() if k.startswith("eval/")}, engine.global_steps)
        log(rank, "eval  " + "  ".join(f"{k} {v:.4f}" for k, v in scalars.items() if k.startswith("eval/")))
    log(rank, f"checkpoint: {checkpoints}")
    return scalars


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        run(args)
    except UserError as err:
        if args.debug:
            raise
        print(f"pld-pretrain: error: {err}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():  # else NCCL warns at exit
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
