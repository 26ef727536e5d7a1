"""End-to-end speed and memory of pld-prep (corpus -> HDF5 shards), as a user runs it.

    python bench/prep_speed.py --vocab vocab.txt --input CORPUS [CORPUS ...] [--workers N] [--keep DIR]

Runs ``pld-prep`` in a child process into a fresh folder (seq 128, dupe factor 5, gzip shards:
pld-prep's defaults unless overridden) and prints wall time, input tokens/s (the manifest's
total_tokens over the wall time, start-up included), instances and peak memory.

Memory: the process tree (pld-prep and its spawn workers) is sampled from /proc every 0.1 s; the
peak of the summed RSS counts shared pages (libraries, the interpreter) once per process, so it
overstates; the peak of the summed PSS shares them out and is the better figure for "RAM the run
needs". getrusage(RUSAGE_CHILDREN) gives the largest single process's peak RSS, not a sum.
Sampling misses peaks shorter than the interval.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def _children(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    # pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, ppid in parents.items() if ppid in frontier]
        tree += frontier
    return tree


def _memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in KiB; (0, 0) once it is gone."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except (OSError, ValueError):
        pass
    return rss, pss


class TreeMemory:
    """Peak summed RSS/PSS of a process and its descendants, sampled on a thread."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid, self.interval = pid, interval
        self.peak_rss = self.peak_pss = self.peak_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = _children(self.pid)
            sizes = [_memory_kib(pid) for pid in pids]
            self.peak_rss = max(self.peak_rss, sum(r for r, _ in sizes))
            self.peak_pss = max(self.peak_pss, sum(p for _, p in sizes))
            self.peak_processes = max(self.peak_processes, sum(1 for r, _ in sizes if r))
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="corpus files or folders, as for pld-prep --input")
    p.add_argument("--vocab", required=True, help="BERT vocab.txt")
    p.add_argument("--max-seq-length", type=int, default=128)
    p.add_argument("--dupe-factor", type=int, default=5)
    p.add_argument("--workers", type=int, help="pld-prep --workers (default: its own, the CPU count)")
    p.add_argument("--keep", type=Path, metavar="DIR", help="write the shards here and keep them (must not exist)")
    p.add_argument("extra", nargs="*", help="more pld-prep arguments, after --")
    args = p.parse_args()

    if args.keep and args.keep.exists():
        p.error(f"--keep {args.keep}: exists (pld-prep would find it complete and do nothing)")
    output = args.keep or Path(tempfile.mkdtemp(prefix="prep_speed_")) / "out"
    cmd = [sys.executable, "-m", "data_prep", "--input", *args.input, "--output", str(output), "--vocab", args.vocab,
           "--max-seq-length", str(args.max_seq_length), "--dupe-factor", str(args.dupe_factor), *args.extra]
    if args.workers:
        cmd += ["--workers", str(args.workers)]
    print("command:", " ".join(cmd[2:]).replace("data_prep", "pld-prep", 1), flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd)
    memory = TreeMemory(proc.pid)
    rc = proc.wait()
    wall = time.perf_counter() - start
    memory.stop()
    if rc != 0:
        sys.exit(f"pld-prep exited with {rc}")
    manifest = json.loads((output / "manifest.json").read_text())
    shards = [shard for split in manifest["splits"].values() for shard in split["shards"]]
    gib = 1 / (1024 * 1024)
    largest = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(f"wall time            {wall:.1f} s")
    print(f"input tokens         {manifest['total_tokens']:,} ({manifest['total_documents']:,} documents)")
    print(f"input tokens/s       {manifest['total_tokens'] / wall:,.0f}")
    print(f"instances            {manifest['total_instances']:,} in {len(shards)} shards "
          f"({sum((output / s['file']).stat().st_size for s in shards) / 2**20:.0f} MiB)")
    print(f"peak memory, all processes: RSS sum {memory.peak_rss * gib:.2f} GiB, "
          f"PSS sum {memory.peak_pss * gib:.2f} GiB ({memory.peak_processes} processes at most)")
    print(f"largest single process peak RSS (getrusage children): {largest * gib:.2f} GiB")
    if not args.keep:
        shutil.rmtree(output.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
