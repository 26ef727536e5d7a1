"""What pld-pretrain checks, says and tidies around DeepSpeed's start-up.

DeepSpeed's start-up takes from seconds to minutes (it builds its ops on a cold cache) and says
little that helps: a config it cannot run on this machine fails only at the end of it, a learning-rate
schedule that ends before the run does passes without a word, and a run that fails before its first
step leaves monitor files and a run_config.json that look like a run. Everything here is checked
before DeepSpeed starts, or undone when the run never got going.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pld_ds.config import ConfigError

# Lines DeepSpeed prints on every run that tell a user nothing they can act on. pld-pretrain says the
# useful part once (which accelerator, that ops are built) in its own start-up lines.
NOISE = ("Setting accelerator to CPU",  # at import, on every rank, every run
         "Attempting to get learning rate from scheduler before it has started",  # our first get_lr
         "built successfully")  # the CPU communication op, loaded on every start
SCHEDULES_WITH_AN_END = {"WarmupDecayLR": "warmup_min_lr", "WarmupCosineLR": "cos_min_ratio"}


def is_rank0() -> bool:
    """Rank 0, also before torch.distributed starts (the launcher sets RANK; one process is rank 0)."""
    return os.environ.get("RANK", "0") == "0"


def say(prog: str, message: str) -> None:
    """A start-up line on rank 0's stdout."""
    if is_rank0():
        print(f"{prog}: {message}", flush=True)


def warn(prog: str, message: str) -> None:
    if is_rank0():
        print(f"{prog}: warning: {message}", file=sys.stderr, flush=True)


def runs_on_cpu() -> bool:
    """Whether DeepSpeed will pick its CPU accelerator: DS_ACCELERATOR=cpu, or no accelerator that torch sees."""
    import torch

    chosen = os.environ.get("DS_ACCELERATOR")
    return chosen == "cpu" or (chosen is None and not torch.accelerator.is_available())


def check_precision(ds_config: dict[str, Any], source: str, on_cpu: bool) -> None:
    """fp16 on DeepSpeed's CPU accelerator fails only after its whole start-up: say so before it."""
    fp16 = ds_config.get("fp16")
    if on_cpu and isinstance(fp16, dict) and fp16.get("enabled") is True:
        raise ConfigError(f"{source}: fp16.enabled: DeepSpeed does not support fp16 on its CPU accelerator (no GPU "
                          'found); use "bf16": {"enabled": true} (or "torch_autocast" with dtype bfloat16), or fp32 '
                          '("fp16": {"enabled": false})')


def schedule_warnings(ds_config: dict[str, Any], source: str, max_steps: int) -> list[str]:
    """Learning-rate schedules that do not fit --max-steps: none at all (a constant lr, no warm-up), or one
    whose total_num_steps ends before the run does (the rest trains at the schedule's floor, 0 by default)."""
    scheduler = ds_config.get("scheduler")
    optimizer = ds_config.get("optimizer")
    lr = optimizer.get("params", {}).get("lr") if isinstance(optimizer, dict) else None
    if scheduler is None:
        return [f"{source}: no \"scheduler\" block: the learning rate stays at {lr if lr is not None else 'its'} "
                f"default for all {max_steps} steps, with no warm-up (PLD's recipe warms up, then decays); add "
                '"scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": '
                f'{lr if lr is not None else "LR"}, "warmup_num_steps": {max(1, max_steps // 50)}, '
                f'"total_num_steps": {max_steps}}}}}']
    if not isinstance(scheduler, dict) or scheduler.get("type") not in SCHEDULES_WITH_AN_END:
        return []
    params = scheduler.get("params") if isinstance(scheduler.get("params"), dict) else {}
    total = params.get("total_num_steps")
    if not isinstance(total, int) or isinstance(total, bool) or total >= max_steps:
        return []
    kind = scheduler["type"]
    floor_key = SCHEDULES_WITH_AN_END[kind]
    floor = params.get(floor_key, 0.0 if kind == "WarmupDecayLR" else 0.0001)
    floor_text = f"lr {floor}" if kind == "WarmupDecayLR" else f"{floor} x the peak lr"
    return [f"{source}: scheduler.params.total_num_steps is {total} but --max-steps is {max_steps}: steps "
            f"{total + 1}-{max_steps} train at the schedule's floor ({floor_key}: {floor_text}); set "
            f"total_num_steps to {max_steps}, or --max-steps to {total}"]


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(noise in message for noise in NOISE)


def quiet_deepspeed() -> None:
    """Drop DeepSpeed's every-run noise (NOISE) from its logger, keep its other warnings and errors.
    Works before deepspeed is imported: its logger setup reuses the same named logger."""
    logger = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _DropNoise) for f in logger.filters):
        logger.addFilter(_DropNoise())


class _LineFilter(io.TextIOBase):
    """A stdout that passes every line on except NOISE (DeepSpeed prints its op-build line with print)."""

    def __init__(self, target: Any) -> None:
        self.target, self.pending = target, ""

    # what code that inspects sys.stdout asks of it (a terminal? which descriptor?): the real stream's answers
    def fileno(self) -> int:
        return self.target.fileno()

    def isatty(self) -> bool:
        return self.target.isatty()

    @property
    def encoding(self) -> str:
        return getattr(self.target, "encoding", "utf-8")

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if not any(noise in line for noise in NOISE):
                self.target.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        if self.pending and not any(noise in self.pending for noise in NOISE):
            self.target.write(self.pending)
        self.pending = ""
        self.target.flush()


@contextlib.contextmanager
def without_noise() -> Iterator[None]:
    """Within: Python-level prints of NOISE lines are dropped (others pass through, line by line)."""
    stream = _LineFilter(sys.stdout)
    try:
        with contextlib.redirect_stdout(stream):
            yield
    finally:
        stream.flush()


class FreshOutputs:
    """Undo what a run wrote under its output folder if it fails before its first optimizer step.

    DeepSpeed's monitors create csv/ and an events file when the engine starts, and pld-pretrain writes
    run_config.json before the loop; a run that then fails (a bad shard, a checkpoint that does not fit)
    would leave what looks like a run. On rank 0, files and folders that appeared during the run are removed
    and files named in `restore` get their earlier content back. Once `watch`'s step counter has moved,
    everything stays.
    """

    def __init__(self, output: Path, restore: tuple[str, ...] = (), enabled: bool = True) -> None:
        self.output, self.enabled = Path(output), enabled
        self.existed = self.output.is_dir()
        self.before = set(self.output.rglob("*")) if enabled and self.existed else set()
        self.saved = {name: (self.output / name).read_bytes() for name in restore
                      if enabled and (self.output / name).is_file()}
        self.restore = restore
        self._steps: Callable[[], int] | None = None
        self._start = 0

    def watch(self, steps: Callable[[], int]) -> None:
        """`steps()`: the run's optimizer step; the run counts as started once it moves."""
        self._steps, self._start = steps, steps()

    @property
    def started(self) -> bool:
        return self._steps is not None and self._steps() != self._start

    def __enter__(self) -> FreshOutputs:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None or not self.enabled or self.started or not self.output.is_dir():
            return
        new = set(self.output.rglob("*")) - self.before
        for path in sorted(new, key=lambda p: len(p.parts)):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        for name in self.restore:
            if name in self.saved:
                (self.output / name).write_bytes(self.saved[name])
        if not self.existed:
            with contextlib.suppress(OSError):
                self.output.rmdir()  # only if nothing else is in it


def check_output(output: Path, flag: str = "--output") -> None:
    """The output folder can be made and written: checked before start-up, not when the monitors or the first
    checkpoint need it."""
    existing = next(p for p in (output, *output.parents) if p.exists() or p == Path(p.anchor))
    if not existing.is_dir():
        where = "exists" if existing == output else f"cannot be made: {existing} is a file"
        raise ConfigError(f"{flag} {output}: {where} (expected a folder for checkpoints and logs)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {output}: {existing} is not writable (expected a folder for checkpoints and logs)")


STALE_LOCK_SECONDS = 600


def build_lock_notes(root: Path | None = None, now: float | None = None) -> list[tuple[bool, str]]:
    """(stale, message) for each op build lock under torch's extensions folder. torch builds an op (DeepSpeed's
    Adam, its CPU communication op) under a lock file and every other process waits for the file to go, without
    a word and without a timeout; a build that was killed leaves its lock, and every later start hangs."""
    import time

    if root is None:
        from torch.utils.cpp_extension import get_default_build_root

        root = Path(get_default_build_root())
    now = time.time() if now is None else now
    notes = []
    for lock in sorted([*root.glob("*/lock"), *root.glob("*/*/lock")]):
        try:
            age = now - lock.stat().st_mtime
        except FileNotFoundError:  # the build just finished
            continue
        since = time.strftime("%H:%M:%S", time.localtime(now - age))
        if age > STALE_LOCK_SECONDS:
            notes.append((True, f"{lock} has held the build of the op {lock.parent.name} since {since} "
                                f"({age / 60:.0f} min): a build that was killed leaves its lock, and DeepSpeed then "
                                f"waits for it forever; if no build is running, delete {lock}"))
        else:
            notes.append((False, f"another process is building the op {lock.parent.name} (lock since {since}); "
                                 f"start-up waits for it"))
    return notes


def ops_to_build(ds_config: dict[str, Any], on_cpu: bool, root: Path | None = None) -> list[str]:
    """The DeepSpeed ops this start will compile, because torch's extensions folder has no build of them yet."""
    if root is None:
        from torch.utils.cpp_extension import get_default_build_root

        root = Path(get_default_build_root())
    optimizer = ds_config.get("optimizer") if isinstance(ds_config.get("optimizer"), dict) else {}
    params = optimizer.get("params") if isinstance(optimizer.get("params"), dict) else {}
    zero = ds_config.get("zero_optimization") if isinstance(ds_config.get("zero_optimization"), dict) else {}
    offload = zero.get("offload_optimizer") if isinstance(zero.get("offload_optimizer"), dict) else {}
    ops = []
    if str(optimizer.get("type", "")).lower() in ("adam", "adamw") and not params.get("torch_adam"):
        ops.append("cpu_adam" if offload.get("device") == "cpu" else "fused_adam")
    if on_cpu:
        ops.append("deepspeed_shm_comm")  # the CPU accelerator's shared-memory all-reduce
    return [op for op in ops if not any(root.glob(f"*/{op}/{op}*.so"))]


def starting_message(ds_config: dict[str, Any], on_cpu: bool, root: Path | None = None) -> str:
    where = " on its CPU accelerator (no GPU found)" if on_cpu else ""
    ops = ops_to_build(ds_config, on_cpu, root)
    if not ops:
        return f"starting DeepSpeed{where}"
    hint = ('; "torch_adam": true in the optimizer\'s params uses torch\'s Adam and compiles none'
            if any(op.endswith("_adam") for op in ops) else "")
    return (f"starting DeepSpeed{where}; it compiles {' and '.join(ops)} first (once per machine: a minute or "
            f"two on idle cores, more on busy ones{hint})")
