"""Checkpoints that a crash at any moment cannot corrupt, kept to the newest N, found again on resume.

A checkpoint is written by DeepSpeed into ``ROOT/.partial-global_stepN``; once every rank has
written its part, rank 0 fsyncs the files, renames the folder to ``ROOT/global_stepN`` (one atomic
rename) and then replaces ``ROOT/latest`` (temp file, fsync, rename). So ``latest`` only ever names
a complete checkpoint, and a folder named ``global_stepN`` is always complete: a crash leaves a
``.partial-*`` folder, which the next save removes. Older checkpoints are deleted only after the
new one is in place. ROOT must be one folder shared by all ranks (DeepSpeed's own assumption).

Loading never unpickles arbitrary objects: DeepSpeed's loads go through ``torch.load(...,
weights_only=True)`` (tensors, plain Python data, numpy arrays and four plain DeepSpeed record classes).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pld_ds.errors import UserError

LATEST = "latest"
PARTIAL = ".partial-"
_TAG = re.compile(r"global_step(\d+)")


class CheckpointError(UserError):
    pass


def tag_for(step: int) -> str:
    return f"global_step{step}"


def complete_tags(root: Path) -> list[str]:
    """Checkpoint folders under root, oldest step first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p.name) for p in root.iterdir() if p.is_dir() and (m := _TAG.fullmatch(p.name))]
    return [tag for _, tag in sorted(found)]


def newest(root: Path) -> str | None:
    """The tag to resume from: what ``latest`` names if that folder exists, else the newest folder."""
    pointer = root / LATEST
    with contextlib.suppress(OSError, UnicodeDecodeError):
        tag = pointer.read_text(encoding="utf-8").strip()
        if _TAG.fullmatch(tag) and (root / tag).is_dir():
            return tag
    tags = complete_tags(root)
    return tags[-1] if tags else None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            _fsync(path)
    _fsync(folder)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{PARTIAL}{path.name}")
    tmp.write_text(text, encoding="utf-8")
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class Checkpointer:
    """Saves every ``interval`` steps (0: only when asked) and keeps the newest ``keep`` (0: all)."""

    def __init__(self, root: str | Path, interval: int = 0, keep: int = 0) -> None:
        self.root, self.interval, self.keep = Path(root), interval, keep
        self.rank = dist.get_rank() if dist.is_initialized() else 0

    def due(self, step: int) -> bool:
        return self.interval > 0 and step % self.interval == 0

    def newest(self) -> str | None:
        return newest(self.root)

    def save(self, engine: Any, client_state: dict[str, Any], step: int | None = None) -> Path:
        """Write a checkpoint of ``engine`` (a PLDEngine), named by ``step`` (default: the engine's step count;
        a run that swapped engines, as EarlyBERT does, counts its own); every rank calls this."""
        tag = tag_for(engine.global_steps if step is None else step)
        partial = self.root / f"{PARTIAL}{tag}"
        previous = self.newest()
        if self.rank == 0:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                for stale in self.root.glob(f"{PARTIAL}*"):  # left by a crash during an earlier save
                    shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
            except OSError as err:
                raise self._error(partial, err, previous) from None
        _barrier()
        try:
            engine.save_checkpoint(self.root, client_state, tag=partial.name, save_latest=False)
        except (OSError, RuntimeError) as err:
            if self.rank == 0:
                shutil.rmtree(partial, ignore_errors=True)
            raise self._error(partial, err, previous) from None
        _barrier()
        final = self.root / tag
        if self.rank == 0:
            try:
                _fsync_tree(partial)
                if final.exists():  # the same step saved again (a resumed run ending where it started)
                    old = self.root / f"{PARTIAL}old-{tag}"
                    os.replace(final, old)
                    shutil.rmtree(old)
                os.replace(partial, final)
                _fsync(self.root)
                write_text_atomic(self.root / LATEST, tag)
            except OSError as err:
                shutil.rmtree(partial, ignore_errors=True)
                raise self._error(partial, err, previous) from None
            self._prune(tag)
        _barrier()
        return final

    def _prune(self, current: str) -> None:
        if self.keep <= 0:
            return
        for tag in complete_tags(self.root)[:-self.keep]:
            if tag != current:  # renamed first: a crash mid-delete leaves a .partial-*, never a half global_stepN
                doomed = self.root / f"{PARTIAL}del-{tag}"
                with contextlib.suppress(OSError):
                    os.replace(self.root / tag, doomed)
                    shutil.rmtree(doomed, ignore_errors=True)

    @staticmethod
    def _error(path: Path, err: BaseException, previous: str | None) -> CheckpointError:
        text = str(err).strip()
        reason = getattr(err, "strerror", None) or (text.splitlines()[0] if text else type(err).__name__)
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        return CheckpointError(f"{path}: cannot write checkpoint ({reason}); {kept}")


# -- loading without unpickling arbitrary objects -------------------------------------------------

_NUMPY_DTYPES = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "float32",
                 "float64")


def _allowed_globals() -> list[Any]:
    """What a checkpoint may hold besides tensors and plain containers: numpy arrays (RNG states of older
    client states), under numpy 1 and 2 names, and the few DeepSpeed classes its ZeRO/bf16 optimizer states
    pickle (an int enum, the loss scalers, a dataclass of two ints). Rebuilding them runs no code of the
    file's choosing."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    reconstruct = np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct
    return [np.ndarray, np.dtype, (reconstruct, "numpy._core.multiarray._reconstruct"),
            (reconstruct, "numpy.core.multiarray._reconstruct"), *(type(np.dtype(n)) for n in _NUMPY_DTYPES),
            ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def safe_load(path: str | os.PathLike, map_location: Any = "cpu", *, mmap: bool = False) -> Any:
    """torch.load with weights_only=True: a file that needs anything else is refused by name, never executed."""
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        found = re.findall(r"GLOBAL (\S+)|got <class '([^']+)'>", str(err))
        names = sorted({a or b for a, b in found}) or ["objects other than tensors"]
        raise CheckpointError(f"{path}: refusing to unpickle {', '.join(names)}: only tensors, plain containers "
                              "and numpy arrays are loaded from checkpoints") from None
    except (RuntimeError, OSError, EOFError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{path}: cannot read the checkpoint file: {reason}") from None


def use_safe_loads(ds_engine: Any) -> None:
    """Route a DeepSpeed engine's checkpoint loads through safe_load (its own loader trusts every pickle)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    engine = getattr(ds_engine, "checkpoint_engine", None)
    if isinstance(engine, TorchCheckpointEngine):
        engine.load = lambda path, map_location=None: safe_load(path, map_location)


# -- pre-emption ------------------------------------------------------------------------------------

class Preempted(Exception):  # noqa: N818 - a stop, not an error
    def __init__(self, signum: int, step: int, path: Path | None) -> None:
        saved = (f"after saving {path}; the same command with --resume auto continues from there" if path else
                 "during the EarlyBERT ticket search, which is not checkpointed: the same command starts it again")
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step} {saved}")
        self.signum = signum


class Preemption:
    """SIGTERM and SIGUSR1 (what SLURM and the deepspeed launcher send before killing a job) only set a
    flag; the training loop asks ``requested()`` at each step boundary, and every rank stops at the same step.

    On several ranks the agreement is lagged so that it never lines the ranks up: the check at step t starts a
    non-blocking all-reduce (MAX) of this rank's flag and returns the result of the one started at step t - 1,
    complete by then unless some rank is more than a step behind. Every rank reads the same sequence of results,
    so all stop at the same step: one step after the first check that found a signal on any rank. A blocking
    all-reduce would make every rank wait for the slowest at every step boundary, which takes back the overlap
    of consecutive steps that the Ouroboros pipeline schedule exists for.

    The flag travels on a process group of its own, gloo on CPU tensors whatever the training backend: a pending
    collective then neither queues behind nor holds up the pipeline's point-to-point messages (NCCL runs one
    communicator's operations in issue order on one stream, so a pending all-reduce on the training group would
    hold the next step's sends until the slowest rank arrived), and reading it needs no device synchronisation.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}
        self._group: Any = None
        self._pending: tuple[Any, torch.Tensor] | None = None  # (the all-reduce's handle, its flag tensor)

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():  # signal handlers live on the main thread
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        if dist.is_initialized() and dist.get_world_size() > 1:
            self._group = dist.new_group(backend="gloo")  # every rank enters at the same point of the run
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        pending, self._pending = self._pending, None
        if exc_type is not None or self._group is None:
            # On an error the handle is let go, never waited for here: every rank that got as far as the check
            # that started it also started it, so it completes (or fails when a rank dies) within about a step,
            # and the process exit that waits for gloo's worker thread is held no longer than that.
            return
        if pending is not None:  # a normal end: every rank made the same checks, the last one completes now
            pending[0].wait()
        dist.destroy_process_group(self._group)
        self._group = None

    def _handle(self, signum: int, frame: object) -> None:
        self.signum = self.signum or signum

    def requested(self) -> int:
        """The signal number if a rank got one by its previous check (0: none); in one process, by now."""
        if self._group is None:
            return self.signum
        agreed = 0
        if self._pending is not None:
            work, flag = self._pending
            work.wait()
            agreed = int(flag.item())
        self._pending = None
        if not agreed:  # after a stop is agreed no rank starts another
            flag = torch.tensor([self.signum], dtype=torch.int64)
            self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True), flag)
        return agreed
