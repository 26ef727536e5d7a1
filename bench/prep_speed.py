"""End-to-end speed and memory of pld-prep (corpus -> HDF5 shards), as a user runs it.

    python bench/prep_speed.py --vocab vocab.txt --input CORPUS [CORPUS ...] [--workers N] [--keep DIR]

Runs ``pld-prep`` in a child process into a fresh folder (seq 128, dupe factor 5, gzip shards:
pld-prep's defaults unless overridden) and prints wall time, input tokens/s (the manifest's
total_tokens over the wall time, start-up included), instances and peak memory.

Memory: the process tree (pld-prep and the workers it forks) is sampled from /proc every 0.1 s; the
peak of the summed RSS counts shared pages (libraries, the interpreter) once per process, so it
overstates; the peak of the summed PSS shares them out and is the better figure for "RAM the run
needs". getrusage(RUSAGE_CHILDREN) gives the largest single process's peak RSS, not a sum.
Sampling misses peaks shorter than the interval.

Against NVIDIA's create_pretraining_data.py (start-up included on both sides):

    python bench/prep_speed.py --vocab vocab.txt --input WIKIEXTRACTOR_FILES... \
        --reference PATH/TO/create_pretraining_data.py [--reference-pythonpath DIR] --sizes-mb 4 12 --repeats 3

For each size, the first input files (sorted) that reach it are the corpus. pld-prep reads them as
they are (2 workers by default, sentence segmentation included); the reference, one process as
NVIDIA runs it, reads the same documents already split one sentence per line (split beforehand,
outside the timing). Both use seq 128, dupe factor 5, 20 predictions. Runs alternate (pld-prep,
reference, next size, ...) in each round, so load on a shared machine hits both sides alike; both
rates use the same token count (pld-prep's manifest: WordPiece tokens of the corpus). The script
prints the load average before and after, and the median over the rounds.
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
from statistics import median


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


def _corpus(files: list[Path], megabytes: float) -> list[Path]:
    chosen, total = [], 0
    for path in sorted(files):
        chosen.append(path)
        total += path.stat().st_size
        if total >= megabytes * 1e6:
            return chosen
    sys.exit(f"--sizes-mb {megabytes}: the inputs hold only {total / 1e6:.1f} MB")


def _sentence_per_line(files: list[Path], out: Path) -> None:
    """The documents of ``files`` one sentence per line, a blank line between documents (NVIDIA's input)."""
    from data_prep.segment import split_sentences
    from data_prep.sources import CorpusReader, resolve_inputs

    with open(out, "w", encoding="utf-8") as f:
        for document in CorpusReader(resolve_inputs([str(p) for p in files])):
            f.write("\n".join(s.strip() for s in split_sentences(document) if s.strip()) + "\n\n")


def _become_subreaper() -> None:
    # Descendants that outlive their parent (a forkserver, and the workers it forked and reaped) are
    # handed to this process instead of init, so their CPU time is counted when we reap them.
    import ctypes

    pr_set_child_subreaper = 36
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_child_subreaper, 1)


def _reap_all() -> None:
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def _timed(cmd: list[str], cpu: list[float], env: dict[str, str] | None = None, cwd: str | None = None) -> float:
    """Wall seconds of one command (until it exits); the CPU seconds of it and every process it
    started, however they ended, go to ``cpu``."""
    _reap_all()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    _reap_all()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    return wall


def compare(args: argparse.Namespace) -> None:
    reference = Path(args.reference).resolve()
    if not reference.is_file():
        sys.exit(f"--reference {reference}: no such file (expected NVIDIA's create_pretraining_data.py)")
    env = dict(os.environ)
    if args.reference_pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([args.reference_pythonpath, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if sys.platform.startswith("linux"):
        _become_subreaper()
    work = Path(tempfile.mkdtemp(prefix="prep_speed_"))
    inputs = [Path(p) for p in args.input]
    files = [f.resolve() for p in inputs for f in (sorted(p.iterdir()) if p.is_dir() else [p])]
    args.vocab = str(Path(args.vocab).resolve())
    corpora = {}
    for size in args.sizes_mb:
        chosen = _corpus(files, size)
        text = work / f"sentences_{size:g}mb.txt"
        _sentence_per_line(chosen, text)
        corpora[size] = (chosen, text)
    workers = args.workers or 2
    walls: dict[tuple[float, str], list[float]] = {}
    cpus: dict[tuple[float, str], list[float]] = {}  # CPU seconds: less sensitive to other jobs than wall time
    tokens: dict[float, int] = {}
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs)", flush=True)
    for round_ in range(args.repeats):
        for size, (chosen, text) in corpora.items():
            out = work / f"pld_{size:g}_{round_}"
            cmd = [sys.executable, "-m", "data_prep", "--input", *map(str, chosen), "--output", str(out),
                   "--vocab", args.vocab, "--max-seq-length", str(args.max_seq_length),
                   "--dupe-factor", str(args.dupe_factor), "--workers", str(workers), *args.extra]
            walls.setdefault((size, "pld-prep"), []).append(_timed(cmd, cpus.setdefault((size, "pld-prep"), [])))
            tokens[size] = json.loads((out / "manifest.json").read_text())["total_tokens"]
            shutil.rmtree(out, ignore_errors=True)
            if args.other_pythonpath:
                other_env = dict(os.environ, PYTHONPATH=args.other_pythonpath)
                # From its own folder: the working directory comes first on sys.path.
                walls.setdefault((size, "other"), []).append(
                    _timed(cmd, cpus.setdefault((size, "other"), []), env=other_env, cwd=args.other_pythonpath)
                )
                shutil.rmtree(out, ignore_errors=True)
            ref_out = work / f"ref_{size:g}_{round_}.hdf5"
            cmd = [sys.executable, str(reference), "--input_file", str(text), "--output_file", str(ref_out),
                   "--vocab_file", str(Path(args.vocab).resolve()), "--do_lower_case",
                   "--max_seq_length", str(args.max_seq_length), "--max_predictions_per_seq", "20",
                   "--masked_lm_prob", "0.15", "--random_seed", "12345", "--dupe_factor", str(args.dupe_factor)]
            walls.setdefault((size, "reference"), []).append(
                _timed(cmd, cpus.setdefault((size, "reference"), []), env=env, cwd=str(reference.parent))
            )
            ref_out.unlink(missing_ok=True)
            other = f", other pld-prep {walls[size, 'other'][-1]:.2f} s" if args.other_pythonpath else ""
            print(f"round {round_ + 1}, {size:g} MB: pld-prep {walls[size, 'pld-prep'][-1]:.2f} s, "
                  f"reference {walls[size, 'reference'][-1]:.2f} s{other}", flush=True)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    results = []
    for size in corpora:
        ours, theirs = median(walls[size, "pld-prep"]), median(walls[size, "reference"])
        row = {"mb": size, "tokens": tokens[size], "pld_prep_s": ours, "reference_s": theirs,
               "pld_prep_tokens_per_s": tokens[size] / ours, "reference_tokens_per_s": tokens[size] / theirs,
               "speedup": theirs / ours, "pld_prep_runs": walls[size, "pld-prep"],
               "reference_runs": walls[size, "reference"], "pld_prep_cpu_s": median(cpus[size, "pld-prep"]),
               "reference_cpu_s": median(cpus[size, "reference"]), "pld_prep_cpu_runs": cpus[size, "pld-prep"],
               "reference_cpu_runs": cpus[size, "reference"]}
        if args.other_pythonpath:
            row["other_s"] = median(walls[size, "other"])
            row["other_runs"] = walls[size, "other"]
            row["other_speedup"] = theirs / row["other_s"]
            row["other_cpu_s"] = median(cpus[size, "other"])
        results.append(row)
        print(f"{size:g} MB ({tokens[size]:,} tokens): pld-prep ({workers} workers) {ours:.2f} s = "
              f"{row['pld_prep_tokens_per_s']:,.0f} tokens/s; reference {theirs:.2f} s = "
              f"{row['reference_tokens_per_s']:,.0f} tokens/s; {row['speedup']:.1f}x (medians of {args.repeats}); "
              f"CPU seconds {row['pld_prep_cpu_s']:.2f} against {row['reference_cpu_s']:.2f}")
        if args.other_pythonpath:
            print(f"  other pld-prep ({args.other_pythonpath}): {row['other_s']:.2f} s, {row['other_speedup']:.1f}x, "
                  f"CPU seconds {row['other_cpu_s']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="corpus files or folders, as for pld-prep --input")
    p.add_argument("--vocab", required=True, help="BERT vocab.txt")
    p.add_argument("--max-seq-length", type=int, default=128)
    p.add_argument("--dupe-factor", type=int, default=5)
    p.add_argument("--workers", type=int, help="pld-prep --workers (default: its own, the CPU count)")
    p.add_argument("--keep", type=Path, metavar="DIR", help="write the shards here and keep them (must not exist)")
    p.add_argument("--reference", metavar="PY", help="NVIDIA's create_pretraining_data.py: compare against it")
    p.add_argument("--reference-pythonpath", metavar="DIR", help="extra PYTHONPATH for the reference (six, boto3)")
    p.add_argument("--sizes-mb", type=float, nargs="+", default=[4, 12], help="corpus sizes to compare (MB)")
    p.add_argument("--repeats", type=int, default=3, help="rounds of the comparison (median reported)")
    p.add_argument("--other-pythonpath", metavar="DIR",
                   help="also time the data_prep package under DIR (e.g. an older checkout), in the same rounds")
    p.add_argument("--json", type=Path, help="comparison: write the results here")
    p.add_argument("extra", nargs="*", help="more pld-prep arguments, after --")
    args = p.parse_args()
    if args.reference:
        compare(args)
        return

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
