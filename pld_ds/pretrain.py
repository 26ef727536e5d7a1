"""Pretrain PreLN BERT with Progressive Layer Dropping through DeepSpeed.

    deepspeed --num_gpus N --module pld_ds.pretrain --deepspeed_config ds_configs/X.json --data DIR --output DIR
    pld-pretrain --deepspeed_config ds_configs/X.json --data DIR --output DIR      (one process)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pld_ds import checkpoint, earlybert, metrics, pld, startup
from pld_ds.config import ConfigError, RunConfig, compile_backend, model_config, padded_vocab_size, read_json
from pld_ds.data import schema, shards
from pld_ds.data.loader import ShardBatches
from pld_ds.data.masking import DynamicMasking
from pld_ds.data.shards import ShardError, find_shards
from pld_ds.engine_api import TrainingEngine
from pld_ds.errors import ArgumentParser, UserError, one_line_errors
from pld_ds.model import BertConfig, BertForPreTraining
from pld_ds.progress import Progress, format_duration

BERT_VOCAB_SIZE = 30522


def length_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected lengths like 64,96,128, got {text!r}") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="pld-pretrain", description=__doc__.split("\n")[0])
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
    p.add_argument("--keep-checkpoints", type=int, default=3, metavar="N",
                   help="keep the newest N checkpoints (0: all); default 3")
    p.add_argument("--nan-patience", type=int, default=10, metavar="K",
                   help="skip micro-batches whose loss is NaN/inf, and stop after K in a row (0: no check)")
    p.add_argument("--resume", metavar="auto|PATH",
                   help="auto: newest checkpoint under OUTPUT, if any; or a checkpoint folder")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--skip-bad-shards", action="store_true",
                   help="leave out shards that fail validation at start, with a warning, instead of stopping")
    p.add_argument("--data-workers", type=int, default=0,
                   help="worker processes that prepare training batches (0: a background thread)")
    p.add_argument("--bin-by-length", action="store_true",
                   help="batch samples of similar length and cut each batch to its longest (less compute on padding)")
    p.add_argument("--length-buckets", type=length_list, metavar="L1,L2,...",
                   help="implies --bin-by-length: cut each batch to the smallest of these lengths that holds it (the "
                        "shards' length is always one), so compiled graphs see few shapes (default: multiples of 8)")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute each kept layer in backward")
    p.add_argument("--compile", nargs="?", const="inductor", type=compile_backend, metavar="BACKEND",
                   help="torch.compile each encoder layer with BACKEND (default inductor); dropped layers are "
                        "still skipped, and theta's changes cause no recompiles")
    p.add_argument("--init-from", metavar="CKPT_OR_HF_DIR",
                   help="phase 2: start from these weights only (a pld_ds checkpoint: run, checkpoints or global_stepN "
                        "folder; or a pld-export folder), with a new optimizer, lr schedule and data position; a run "
                        "that resumes from its own checkpoint ignores it")
    p.add_argument("--init-pld-step", choices=("continue", "restart"), default="continue",
                   help="with --init-from: theta's curve continues from the step the weights were trained to "
                        "(default: the run goes on as one, at the depth it had reached) or restarts at theta = 1")
    p.add_argument("--masked-lm-prob", type=float, metavar="P",
                   help="share of tokens masked in training batches, up to 1 (e.g. 0.3): dynamic-masking shards are "
                        "masked at this rate, static ones masked anew (evaluation keeps their masks); default: the "
                        "manifest's")
    p.add_argument("--whole-word-masking", action=argparse.BooleanOptionalAction, default=None,
                   help="mask whole words (## pieces with the word before them) in training batches, static "
                        "shards masked anew as with --masked-lm-prob; default: the manifest's")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by deepspeed
    args = p.parse_args(argv)
    if args.vocab_size is not None and args.vocab_size < 1:
        p.error(f"--vocab-size must be >= 1, got {args.vocab_size}")
    if args.masked_lm_prob is not None and not 0.0 < args.masked_lm_prob <= 1.0:
        p.error(f"--masked-lm-prob must be in (0, 1], got {args.masked_lm_prob}")
    for name in ("max_steps", "log_interval"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("eval_interval", "eval_batches", "save_interval", "data_workers", "keep_checkpoints",
                 "nan_patience"):
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


def data_vocabulary(data: str, override: int | None, masked_lm_prob: float | None = None,
                    whole_word_masking: bool | None = None) -> tuple[int, DynamicMasking | None]:
    """Vocabulary size, and masking for dynamic-masking shards when the manifest names a vocab file: at
    ``masked_lm_prob`` and with ``whole_word_masking`` (default: what the manifest records pld-prep was asked)."""
    manifest = Path(data) / schema.MANIFEST_NAME
    if not manifest.is_file():
        return override or BERT_VOCAB_SIZE, None
    vocab = read_json(manifest, "manifest").get("vocab")
    size = vocab.get("size") if isinstance(vocab, dict) else None
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ConfigError(f"{manifest}: vocab.size: expected a positive integer, got {size!r}")
    if override is not None and override != size:
        if override < size:
            raise ConfigError(f"--vocab-size {override}: smaller than the shards' vocabulary ({manifest}: vocab.size "
                              f"{size}), whose token ids reach {size - 1}; leave out --vocab-size to use {size}")
        startup.warn("pld-pretrain", f"--vocab-size {override} overrides {manifest}'s vocab.size {size}: the "
                     f"{override - size} extra embedding rows never see a token, and an export pairs them with the "
                     f"{size}-token vocab.txt; leave out --vocab-size to use {size}")
        size = override
    vocab_file = Path(data) / vocab["file"] if isinstance(vocab.get("file"), str) else None
    if vocab_file is None or not vocab_file.is_file():
        return size, None
    try:
        tokens = {t: i for i, t in enumerate(vocab_file.read_text(encoding="utf-8").splitlines())}
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{vocab_file}: cannot read the vocabulary ({err}; expected a UTF-8 vocab.txt)") from None
    if "[MASK]" not in tokens:
        raise ConfigError(f"{vocab_file}: no [MASK] token (expected a BERT WordPiece vocab.txt)")
    special = tuple(tokens[t] for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") if t in tokens)
    info = read_json(manifest, "manifest")
    if masked_lm_prob is None:
        masked_lm_prob = info.get("masked_lm_prob", 0.15)
        if isinstance(masked_lm_prob, bool) or not isinstance(masked_lm_prob, (int, float)) \
                or not 0.0 < masked_lm_prob <= 1.0:
            raise ConfigError(f"{manifest}: masked_lm_prob: expected a number in (0, 1], got {masked_lm_prob!r}")
    if whole_word_masking is None:
        whole_word_masking = info.get("whole_word_masking", False)
        if not isinstance(whole_word_masking, bool):
            raise ConfigError(f"{manifest}: whole_word_masking: expected true or false, got {whole_word_masking!r}")
    # Word starts come from the vocabulary itself: a WordPiece piece that continues a word starts with ##.
    continuation = tuple(i for t, i in tokens.items() if t.startswith("##")) if whole_word_masking else None
    return size, DynamicMasking(mask_id=tokens["[MASK]"], special_ids=special, vocab_size=size,
                                masked_lm_prob=float(masked_lm_prob), continuation_ids=continuation)


def rng_state() -> dict[str, Any]:
    """Every global generator, as tensors and plain data (checkpoints load with weights_only=True)."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@torch.no_grad()
def evaluate(engine: TrainingEngine, batches: ShardBatches, max_batches: int) -> dict[str, float]:
    """MLM loss/accuracy and NSP accuracy (when the model has an NSP head) over the validation shards, every
    layer run, summed over ranks."""
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
            (out.nsp_logits.argmax(-1) == batch["next_sentence_labels"]).sum().double()
            if out.nsp_logits is not None else torch.zeros((), dtype=torch.float64, device=engine.device),
            torch.tensor(float(batch["input_ids"].shape[0]), dtype=torch.float64, device=engine.device),
        ])
    if dist.is_initialized():
        dist.all_reduce(sums)
    engine.train()
    mlm_loss, correct, count, nsp_ok, n = sums.tolist()
    scalars = {"eval/mlm_loss": mlm_loss / max(count, 1), "eval/mlm_accuracy": correct / max(count, 1)}
    if getattr(engine.module.config, "nsp", True):  # MLM-only models report no NSP accuracy
        scalars["eval/nsp_accuracy"] = nsp_ok / max(n, 1)
    return scalars


def remasks(args: argparse.Namespace, infos: list[shards.ShardInfo], masking: DynamicMasking | None) -> bool:
    """--masked-lm-prob and --whole-word-masking steer the loader's masking. Statically masked training shards
    given either flag are masked anew in every batch (their tokens restored first); evaluation keeps the masks
    pld-prep wrote, so eval losses stay comparable with runs that trained on the stored masks."""
    given = [flag for flag, value in (("--masked-lm-prob", args.masked_lm_prob),
                                      ("--whole-word-masking", args.whole_word_masking)) if value is not None]
    static = next((info for info in infos if info.static_masking), None)
    if given and static is not None and masking is None:
        raise ConfigError(f"{given[0]}: masking {static.path} anew needs the vocabulary's [MASK] id: expected a "
                          f"vocab file named in {args.data}/manifest.json")
    if given and static is not None:
        startup.say("pld-pretrain", f"{' and '.join(given)}: the statically masked training shards are masked anew "
                                    "in every batch; evaluation keeps the shards' own masks")
    return bool(given) and static is not None


def init_weights(model: BertForPreTraining, args: argparse.Namespace, seq_len: int) -> int:
    """--init-from: load the weights (shapes checked) and return theta's step offset (--init-pld-step)."""
    from pld_ds import warm_start

    init = warm_start.read_initial_weights(args.init_from, args.model)
    notes = warm_start.load_into(model, init, seq_len, f"--model {args.model}")
    offset = 0
    if args.init_pld_step == "continue":
        if init.step is None:
            raise UserError(f"--init-from {args.init_from}: records no training step to continue theta's curve "
                            "from; pass --init-pld-step restart")
        offset = init.step
    if startup.is_rank0():
        curve = f"continues from step {offset}" if args.init_pld_step == "continue" else "restarts at theta = 1"
        print(f"pld-pretrain: weights from {init.source} (new optimizer, lr schedule and data position; "
              f"theta's curve {curve}){''.join('; ' + n for n in notes)}", flush=True)
    return offset


def resume_target(resume: str | None, checkpoints: Path) -> tuple[Path, str] | None:
    """(folder, tag) of the checkpoint to load. auto: the newest complete one under OUTPUT, if any."""
    if resume is None:
        return None
    if resume == "auto":
        tag = checkpoint.newest(checkpoints)
        return (checkpoints, tag) if tag else None
    path = Path(resume)
    if not path.is_dir():
        raise UserError(f"--resume {resume}: no such checkpoint folder")
    tag = checkpoint.newest(path)
    return (path, tag) if tag else (path.parent, path.name)


def resume_from(engine: TrainingEngine, resume: str, target: tuple[Path, str], train: ShardBatches) -> None:
    path = target[0] / target[1]
    try:
        client = engine.load_checkpoint(*target)
    except (AssertionError, RuntimeError, KeyError, ValueError, OSError) as err:
        # DeepSpeed asserts on a checkpoint of another ZeRO stage or world size; torch on other shapes.
        raise UserError(f"--resume {resume}: {path} does not fit this model and config ({load_failure(err)})") from err
    if client is None:
        raise UserError(f"--resume {resume}: no loadable checkpoint in {path}")
    train.load_state_dict(client["data"])
    set_rng_state(client["rng"])
    # A phase-2 run goes on along the theta curve its first start chose (--init-pld-step).
    engine.pld_step_offset = int(client.get("pld", {}).get("step_offset", 0))


def load_failure(err: BaseException, shown: int = 2) -> str:
    """The cause of a failed load on one line. torch's load_state_dict names each tensor and its two shapes on the
    lines after a header, so the header alone says nothing: keep it with the first `shown` problems."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    head, problems = lines[0], [line[:300] for line in lines[1:]]
    more = f" (and {len(problems) - shown} more)" if len(problems) > shown else ""
    return " ".join([head[:300], *problems[:shown]]) + more


def log(rank: int, line: str) -> None:
    if rank == 0:
        print(line, flush=True)


def warn_skipped(rank: int, batches: ShardBatches, total: int) -> None:
    if rank == 0:
        for k, err in enumerate(batches.skipped, start=1):
            print(f"pld-pretrain: warning: skipping bad shard {k} of {len(batches.skipped)} "
                  f"({total} in the folder): {err}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> dict[str, float]:
    """Train; a run that fails before its first step leaves its output folder as it found it."""
    with startup.FreshOutputs(Path(args.output), restore=("run_config.json",), enabled=startup.is_rank0()) as outputs:
        return _run(args, outputs)


def _run(args: argparse.Namespace, outputs: startup.FreshOutputs) -> dict[str, float]:
    inputs = check_inputs(args)  # every input before the model is built: a typo costs a second, not a start-up
    seed_everything(args.seed)
    output, checkpoints = Path(args.output), Path(args.output) / "checkpoints"
    target = resume_target(args.resume, checkpoints)
    startup.quiet_deepspeed()
    # EarlyBERT: search (slimming coefficients, no checkpoints), then the slim model from step `offset` on.
    # A resumed run whose ticket was drawn continues the slim model.
    cfg, offset, searching = earlybert.start_phase(inputs.config.earlybert, inputs.model, output, target is not None)
    target = None if searching else target
    model, pld_step_offset = build_model(args, cfg, inputs.seq_len, initialize=target is None)
    search = earlybert.TicketSearch(model, inputs.config.earlybert) if searching else None
    build_engine = engine_factory(args, inputs.config)
    engine = start_engine(build_engine, model, inputs, pld_step_offset)
    rank = dist.get_rank() if dist.is_initialized() else 0
    train, valid = open_data(args, inputs, engine, rank)
    if target is not None:
        resume(engine, args, target, train, offset)
    outputs.watch(lambda: offset + engine.global_steps)  # from here on, a failure keeps what the run wrote
    resolved = write_run_config(args, cfg, engine, train, rank)
    saver = RunCheckpoints(checkpoints, args, train, resolved)
    ticket = earlybert.SearchThenSlim(search, output=output, resolved=resolved, seq_len=train.seq_len,
                                      build_engine=build_engine, compile_backend=args.compile,
                                      log=functools.partial(log, rank), writes=rank == 0)
    batches, scalars = metrics.CountedBatches(iter(train)), {}
    progress = Progress(args.max_steps, offset + engine.global_steps, enabled=rank == 0)
    train_log = TrainLog(batches, progress, args, offset + engine.global_steps)
    evaluator = Evaluator(valid, progress, args, rank)

    with checkpoint.Preemption() as preemption, progress:
        while offset + engine.global_steps < args.max_steps:
            losses = engine.train_batch(batches, max_nonfinite=args.nan_patience)
            step = offset + engine.global_steps  # one axis for search and slim phases
            scalars = train_log.after_step(engine, step, losses) or scalars
            evaluator.after_step(engine, step)
            if ticket.searching:  # the search keeps no checkpoints
                if drawn := ticket.after_step(step, engine):
                    engine, offset = drawn  # the slim model's engine, whose steps count from the draw
            else:
                saver.after_step(engine, step)
            if signum := preemption.requested():
                raise saver.preempted(engine, step, signum, searching=ticket.searching)
            progress.update(step, scalars)
    last = offset + engine.global_steps
    saver.at_end(engine, last)
    scalars.update(evaluator.at_end(engine, last))
    for line in engine.keep_summary():
        log(rank, line)
    log(rank, f"checkpoint: {checkpoints / checkpoint.tag_for(last)}")
    return scalars


# -- set-up ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunInputs:
    """What pld-pretrain checked before building anything."""

    config: RunConfig  # the DeepSpeed JSON with our blocks, read and validated once
    on_cpu: bool
    train_paths: list[Path]
    eval_paths: list[Path]
    vocab_size: int  # of the data (or --vocab-size); the model's embedding is padded from it
    masking: DynamicMasking | None
    remask: bool  # static training shards masked anew in every batch (--masked-lm-prob / --whole-word-masking)
    model: BertConfig  # before EarlyBERT's choice (slimming coefficients, or the drawn ticket)
    seq_len: int
    nsp: bool  # the shards have next-sentence labels


def check_inputs(args: argparse.Namespace) -> RunInputs:
    """Config, output folder, data and model flags, each checked once; warnings for what would run, but not as
    the user likely meant."""
    config = RunConfig.read(args.deepspeed_config)
    on_cpu = startup.runs_on_cpu()
    startup.check_precision(config.ds_config, config.source, on_cpu)
    for warning in startup.schedule_warnings(config.ds_config, config.source, args.max_steps):
        startup.warn("pld-pretrain", warning)
    startup.check_output(Path(args.output))
    train_paths, eval_paths = data_folders(args.data, args.eval_data)
    if args.eval_interval and not eval_paths:
        startup.warn("pld-pretrain", f"--eval-interval {args.eval_interval}: no validation shards ({args.data} has "
                     "no validation/ folder and --eval-data is not given), so no evaluation will run")
    vocab_size, masking = data_vocabulary(args.data, args.vocab_size, args.masked_lm_prob, args.whole_word_masking)
    cfg = model_config(args.model, vocab_size=padded_vocab_size(vocab_size),
                       activation_checkpointing=args.activation_checkpointing or None)
    startup.say("pld-pretrain", f"checking {len(train_paths)} training shards")
    infos, _ = shards.inspect_paths(train_paths, args.skip_bad_shards)
    seq_len = shards.check_seq_len(infos)[0].seq_len
    data_nsp = shards.check_nsp(infos)[0].nsp
    if not data_nsp:  # MLM-only shards: no NSP head, so no NSP cost
        cfg = dataclasses.replace(cfg, nsp=False)
    remask = remasks(args, infos, masking)
    if seq_len > cfg.max_position_embeddings:
        raise ShardError(f"{infos[0].path}: sequence length {seq_len} exceeds the model's "
                         f"max_position_embeddings {cfg.max_position_embeddings}")
    return RunInputs(config=config, on_cpu=on_cpu, train_paths=train_paths, eval_paths=eval_paths,
                     vocab_size=vocab_size, masking=masking, model=cfg, seq_len=seq_len, nsp=data_nsp,
                     remask=remask)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(args: argparse.Namespace, cfg: BertConfig, seq_len: int, initialize: bool
                ) -> tuple[BertForPreTraining, int]:
    """The model (with --init-from's weights when ``initialize``, i.e. not resuming; compiled on --compile) and
    theta's step offset (--init-pld-step)."""
    model = BertForPreTraining(cfg)
    pld_step_offset = 0
    if args.init_from and initialize:
        pld_step_offset = init_weights(model, args, seq_len)
    if args.compile:
        model.compile_layers(backend=args.compile)
    return model, pld_step_offset


def engine_factory(args: argparse.Namespace, config: RunConfig) -> Callable[..., TrainingEngine]:
    """model -> the engine the config asks for (data parallel, or a pipeline of stages), for this run."""
    from pld_ds.pipeline import make_engine  # imports deepspeed (seconds): after the input checks

    return functools.partial(make_engine, config=config, seed=args.seed, output_dir=Path(args.output))


def start_engine(build_engine: Callable[..., TrainingEngine], model: BertForPreTraining, inputs: RunInputs,
                 pld_step_offset: int) -> TrainingEngine:
    startup.say("pld-pretrain", startup.starting_message(inputs.config.ds_config, inputs.on_cpu))
    for stale, note in startup.build_lock_notes():
        (startup.warn if stale else startup.say)("pld-pretrain", note)
    started = time.perf_counter()
    with startup.without_noise():
        engine = build_engine(model, pld_step_offset=pld_step_offset)
    startup.say("pld-pretrain", f"DeepSpeed started in {time.perf_counter() - started:.0f} s")
    return engine


def open_data(args: argparse.Namespace, inputs: RunInputs, engine: TrainingEngine, rank: int
              ) -> tuple[ShardBatches, ShardBatches | None]:
    """This rank's training and validation batches (the stages of a pipeline replica read alike)."""
    data_rank, data_world = engine.data_parallel
    shard_args = dict(micro_batch=engine.micro_batch_size, vocab_size=inputs.vocab_size, rank=data_rank,
                      world_size=data_world, masking=inputs.masking, skip_bad_shards=args.skip_bad_shards,
                      nsp=inputs.nsp)
    train = ShardBatches(inputs.train_paths, seed=args.seed, workers=args.data_workers,
                         bin_by_length=args.bin_by_length or args.length_buckets is not None,
                         length_buckets=args.length_buckets, remask=inputs.remask, **shard_args)
    warn_skipped(rank, train, len(inputs.train_paths))
    valid = ShardBatches(inputs.eval_paths, seq_len=train.seq_len, **shard_args) if inputs.eval_paths else None
    if valid is not None:
        warn_skipped(rank, valid, len(inputs.eval_paths))
    return train, valid


def resume(engine: TrainingEngine, args: argparse.Namespace, target: tuple[Path, str], train: ShardBatches,
           offset: int) -> None:
    resume_from(engine, args.resume, target, train)
    if offset + engine.global_steps >= args.max_steps:
        startup.warn("pld-pretrain", f"--resume {args.resume}: {target[0] / target[1]} is at step "
                     f"{offset + engine.global_steps}, not below --max-steps {args.max_steps}: nothing to train; "
                     "raise --max-steps to go on")


def write_run_config(args: argparse.Namespace, cfg: BertConfig, engine: TrainingEngine, train: ShardBatches,
                     rank: int) -> dict[str, Any]:
    """The run's resolved settings (flags, model, PLD, DeepSpeed), written to OUTPUT/run_config.json on rank 0
    and returned for the checkpoints; then the line that says what trains."""
    resolved = {"args": {k: v for k, v in vars(args).items() if k != "local_rank"}, "model": asdict(cfg),
                "pld": asdict(engine.pld), "deepspeed": engine.ds_config}
    if rank == 0:
        output = Path(args.output)
        output.mkdir(parents=True, exist_ok=True)
        checkpoint.write_text_atomic(output / earlybert.RUN_CONFIG_FILE, json.dumps(resolved, indent=2))
    world = dist.get_world_size() if dist.is_initialized() else 1
    # ZeRO-3 leaves partitioned parameters empty; ds_numel is their full size.
    params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    log(rank, f"pld-pretrain: {args.model} ({params / 1e6:.1f}M params), "
        f"{len(train.infos)} shards, {train.batches_per_epoch} steps/epoch, world {world}, PLD {engine.pld}")
    return resolved


# -- the loop's components, each at its own cadence -----------------------------------------------------


class TrainLog:
    """Counts every step's samples and FLOPs; every --log-interval steps and at --max-steps writes the row of
    scalars to the monitors and its line to the console, and returns the row."""

    def __init__(self, batches: metrics.CountedBatches, progress: Progress, args: argparse.Namespace,
                 step: int) -> None:
        self.batches, self.progress, self.meter = batches, progress, metrics.Meter(step)
        self.interval, self.max_steps = args.log_interval, args.max_steps

    def after_step(self, engine: TrainingEngine, step: int, losses: dict[str, torch.Tensor]
                   ) -> dict[str, float] | None:
        cfg = engine.module.config  # EarlyBERT's draw changes the model
        self.meter.count(cfg, self.batches.drain(), pld.keep_probs(cfg.num_layers, engine.theta_used()))
        if step % self.interval and step != self.max_steps:
            return None
        rates = self.meter.report(step, functools.partial(sum_over_ranks, device=engine.device,
                                                          copies=engine.num_stages))
        scalars = train_scalars(engine, losses, rates)
        engine.write_scalars(scalars, step)
        line = f"step {step:>6}  " + "  ".join(f"{k.split('/')[1]} {v:.4g}" for k, v in scalars.items()
                                            if k.count("/") == 1)  # per-layer keep rates: TensorBoard only
        self.progress.write(f"{line}  {interval_status(rates, self.max_steps - step)}")
        return scalars


class Evaluator:
    """Every --eval-interval steps below --max-steps (a line through the progress bar), and at the end; nothing
    without validation shards."""

    def __init__(self, valid: ShardBatches | None, progress: Progress, args: argparse.Namespace, rank: int) -> None:
        self.valid, self.progress, self.rank = valid, progress, rank
        self.interval, self.batches, self.max_steps = args.eval_interval, args.eval_batches, args.max_steps

    def after_step(self, engine: TrainingEngine, step: int) -> None:
        if self.valid and self.interval and step % self.interval == 0 and step < self.max_steps:
            results = evaluate(engine, self.valid, self.batches)
            engine.write_scalars(results, step)
            self.progress.write(f"eval   {step:>6}  " + "  ".join(f"{k[5:]} {v:.4f}" for k, v in results.items()))

    def at_end(self, engine: TrainingEngine, step: int) -> dict[str, float]:
        if not self.valid:
            return {}
        results = evaluate(engine, self.valid, self.batches)
        engine.write_scalars(results, step)
        log(self.rank, "eval  " + "  ".join(f"{k} {v:.4f}" for k, v in results.items()))
        return results


class RunCheckpoints:
    """Checkpoints every --save-interval steps below --max-steps, at a pre-emption signal and at the end, each
    with the data position, every RNG state and the resolved settings."""

    def __init__(self, root: Path, args: argparse.Namespace, train: ShardBatches, resolved: dict[str, Any]) -> None:
        self.root, self.train, self.resolved, self.max_steps = root, train, resolved, args.max_steps
        self.checkpointer = checkpoint.Checkpointer(root, args.save_interval, args.keep_checkpoints)

    def save(self, engine: TrainingEngine, step: int) -> None:
        self.checkpointer.save(engine, {"data": self.train.state_dict(), "rng": rng_state(), "config": self.resolved},
                               step=step)

    def after_step(self, engine: TrainingEngine, step: int) -> None:
        if self.checkpointer.due(step) and step < self.max_steps:
            self.save(engine, step)

    def preempted(self, engine: TrainingEngine, step: int, signum: int, searching: bool) -> checkpoint.Preempted:
        """The stop to raise after SIGTERM/SIGUSR1: with a checkpoint of this step, except during EarlyBERT's
        search, which keeps none."""
        if not searching:
            self.save(engine, step)
        return checkpoint.Preempted(signum, step, None if searching else self.root / checkpoint.tag_for(step))

    def at_end(self, engine: TrainingEngine, step: int) -> None:
        if self.checkpointer.newest() != checkpoint.tag_for(step):
            self.save(engine, step)


def sum_over_ranks(values: list[float], device: torch.device, copies: int = 1) -> list[float]:
    """Summed over every rank; `copies` ranks count each sample (the stages of a pipeline replica)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return values
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return (total / copies).tolist()


def interval_status(rates: metrics.Rates, steps_left: int) -> str:
    """The end of a log line: step time and ETA from the same interval as the line's samples/s and TFLOP/s."""
    return (f"{rates.sec_per_step:.3g} s/step  eta {format_duration(steps_left * rates.sec_per_step)}  "
            f"(rates over the last {rates.steps} steps)")


def train_scalars(engine: TrainingEngine, losses: dict[str, torch.Tensor], rates: metrics.Rates) -> dict[str, float]:
    """The row of the step just taken: its losses, the theta it ran with, and throughput over the interval since
    the previous row (all ranks, every micro-batch of each accumulation window, FLOPs at the lengths computed)."""
    scalars = {f"train/{k}": v.item() for k, v in losses.items()}
    scalars.update(engine.pld_scalars())
    scalars.update({"train/lr": engine.get_lr(), "train/samples_per_sec": rates.samples_per_sec,
                    "train/tflops": rates.tflops})
    peak = metrics.peak_tflops(metrics.device_name())
    if peak:
        world = dist.get_world_size() if dist.is_initialized() else 1
        scalars["train/mfu"] = rates.tflops / (peak * world)
    scalars.update(engine.optimizer_scalars())
    if engine.nonfinite_skipped:
        scalars["train/skipped_nonfinite"] = float(engine.nonfinite_skipped)
    return scalars


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        with one_line_errors("pld-pretrain", args.debug):
            run(args)
    except checkpoint.Preempted as stop:
        print(f"pld-pretrain: {stop}", file=sys.stderr)
        sys.exit(128 + stop.signum)
    finally:
        if dist.is_initialized():  # else NCCL warns at exit
            dist.destroy_process_group()
        remove_cpu_allreduce_buffer()


def remove_cpu_allreduce_buffer() -> None:
    """DeepSpeed's CPU all-reduce maps a 69 MB buffer per rank in /dev/shm (named by user, master address,
    port and rank) and never unlinks it: RAM lost until reboot, and a stale buffer a later run on the
    same port could attach to. Each rank removes its own at exit (the others' mappings stay valid)."""
    addr, port, rank = (os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "RANK"))
    if addr and port and rank and not torch.cuda.is_available():
        with contextlib.suppress(OSError):
            (Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}").unlink()


if __name__ == "__main__":
    main()
