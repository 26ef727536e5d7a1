"""pld-prep's worker processes, started before the parent loads anything heavy.

A worker's start-up is mostly importing numpy, tokenizers, blingfire and h5py and loading the
vocabulary. The command line calls ``start_pool`` right after parsing its arguments, while it is
still single-threaded: it imports those modules once and forks the workers from itself, which then
load the vocabulary while it checks its inputs and reads the first batch. Other callers get
workers from a forkserver that imports the same modules, and ``start_pool`` returns at once while
a thread waits for it. This module imports only the standard library for that reason.

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
import threading
from concurrent.futures import ProcessPoolExecutor


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on every platform
        return max(1, os.cpu_count() or 1)


# The modules a worker needs: the pipeline (numpy), and what only workers import: blingfire
# through the segmenter, tokenizers for the vocabulary, h5py for the shards.
WORKER_MODULES = ["data_prep.pipeline", "data_prep.segment", "tokenizers", "h5py"]


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
    # Everything a worker imports, once, in the server (no effect once the server runs: same modules).
    context.set_forkserver_preload(WORKER_MODULES)
    return context


def can_fork_here() -> bool:
    """Whether this process may fork its workers itself: on Linux, with no thread but this one.

    A forked child runs only the thread that forked, and a lock another thread held stays locked
    there for good; libraries start threads unasked (OpenBLAS does at import), so the kernel's
    count is asked, not ``threading``'s. macOS forks unsafely: it has forkserver and spawn only.
    """
    if not sys.platform.startswith("linux") or "fork" not in multiprocessing.get_all_start_methods():
        return False
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return False


def start_pool(
    size: int, vocab: str | None = None, lowercase: bool = True, fork_here: bool = False
) -> ProcessPoolExecutor | None:
    """A pool of ``size`` processes, all starting now (None for ``size <= 1``).

    ``fork_here``: when ``can_fork_here()``, import the worker modules in this process and fork
    the workers from it at once (the command line does this first thing, before it opens a file or
    starts a thread): no forkserver interpreter to start and import the same modules again, no
    resource tracker. Otherwise, and by default (a library caller may hold threads), the workers
    come from a forkserver.

    Unlike multiprocessing.Pool, a worker that dies fails the run instead of hanging it.
    """
    if size <= 1:
        return None
    if fork_here and can_fork_here():
        for name in WORKER_MODULES:
            importlib.import_module(name)
        if can_fork_here():  # still (an import may start a thread)
            context = multiprocessing.get_context("fork")
            pool = ProcessPoolExecutor(size, mp_context=context, initializer=init_worker, initargs=(vocab, lowercase))
            # With fork, the first task starts all `size` processes at once, before the pool's own thread.
            pool.submit(os.getpid)
            return pool
    pool = ProcessPoolExecutor(size, mp_context=_context(), initializer=init_worker, initargs=(vocab, lowercase))
    # ProcessPoolExecutor starts a process per submitted task until it has `size`: start them all now.
    # Starting the first one waits until the forkserver, a fresh interpreter, has imported the
    # worker modules and forked (about 0.2 s on one core): a thread waits for that, not the caller.
    threading.Thread(target=_start_processes, args=(pool, size), name="pld-prep-pool-start").start()
    return pool


def _start_processes(pool: ProcessPoolExecutor, size: int) -> None:
    with contextlib.suppress(RuntimeError):  # the pool was shut down first (the run failed at once)
        for _ in range(size):
            pool.submit(os.getpid)
