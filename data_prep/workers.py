"""pld-prep's worker processes, started before the parent loads anything heavy.

A worker's start-up is mostly importing numpy, tokenizers, blingfire and h5py and loading the
vocabulary. ``start_pool`` is called by the command line right after the arguments are
parsed, before the parent imports the pipeline itself: the workers' start-up then runs while the
parent does its own (imports, vocabulary check, reading the first batch), instead of after it. This
module imports only the standard library for that reason.

The pool carries no per-run state: each task brings the run's settings (see
``pipeline._use_context``), so the same processes serve whatever run they are handed to.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import multiprocessing
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on every platform
        return max(1, os.cpu_count() or 1)


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            pr_set_pdeathsig = 1
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def init_worker(vocab: str | None, lowercase: bool) -> None:
    """Runs once in each worker: signals, then the imports and the vocabulary, ahead of any task."""
    # The parent handles Ctrl-C (the terminal sends it to the whole process group) and terminates
    # the workers; and a worker must not outlive a parent that was killed outright.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    pipeline = importlib.import_module("data_prep.pipeline")
    if vocab is not None:
        pipeline.warm_encoder(vocab, lowercase)


def _context() -> multiprocessing.context.BaseContext:
    # forkserver: workers are forked from a clean server process that imported the pipeline once,
    # so N workers cost one import, not N, and none inherits the parent's tokenizer threads or open
    # files (what plain fork would risk). spawn where there is no forkserver (Windows).
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["data_prep.pipeline"])  # no effect once the server runs: same modules
    return context


def start_pool(size: int, vocab: str | None = None, lowercase: bool = True) -> ProcessPoolExecutor | None:
    """A pool of ``size`` processes, all starting now (None for ``size <= 1``).

    Unlike multiprocessing.Pool, a worker that dies fails the run instead of hanging it.
    """
    if size <= 1:
        return None
    pool = ProcessPoolExecutor(size, mp_context=_context(), initializer=init_worker, initargs=(vocab, lowercase))
    # ProcessPoolExecutor starts a process per submitted task until it has `size`: start them all now.
    for _ in range(size):
        pool.submit(os.getpid)
    return pool
