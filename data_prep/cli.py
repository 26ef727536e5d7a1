"""Command line: ``pld-prep`` / ``python -m data_prep``."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from data_prep.errors import PrepError
from data_prep.sources import FORMATS
from data_prep.workers import default_workers, start_pool

if TYPE_CHECKING:
    from data_prep.pipeline import PrepConfig, Summary

PROG = "pld-prep"
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, no usage block: scripts grep for it, people read it.
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def _int_at_least(low: int, high: int | None = None) -> Callable[[str], int]:
    expected = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


def _fraction(low: float, high: float, low_open: bool = False) -> Callable[[str], float]:
    expected = f"a number {'>' if low_open else '>='} {low} and <= {high}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        below = value <= low if low_open else value < low
        if below or value > high or value != value:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description=(
            "Build BERT pretraining shards (HDF5, NVIDIA's create_pretraining_data.py format) from "
            "WikiExtractor output, Gutenberg books, plain text, JSONL, Wikipedia XML dumps or parquet."
        ),
    )
    p.add_argument("--input", nargs="+", required=True, metavar="PATH", help="files or folders (walked recursively)")
    p.add_argument("--output", required=True, type=Path, metavar="DIR", help="output folder")
    vocab = p.add_mutually_exclusive_group(required=True)
    vocab.add_argument("--vocab", type=Path, metavar="FILE", help="a BERT vocab.txt")
    vocab.add_argument(
        "--train-vocab", type=_int_at_least(16), metavar="N", help="train an N-token WordPiece vocab into DIR/vocab.txt"
    )
    p.add_argument("--cased", action="store_true", help="keep case and accents (default: lowercase)")
    p.add_argument("--input-format", choices=("auto", *FORMATS), default="auto", help="default: detect per file")
    p.add_argument("--text-key", default="text", help="JSONL field / parquet column with the text (default: text)")
    p.add_argument("--max-seq-length", type=_int_at_least(8, 32767), default=128, metavar="N", help="default 128")
    p.add_argument("--max-predictions-per-seq", type=_int_at_least(1), default=20, metavar="N", help="default 20")
    p.add_argument(
        "--masked-lm-prob",
        type=_fraction(0.0, 1.0, low_open=True),
        default=0.15,
        metavar="P",
        help="share of tokens masked, e.g. 0.3 as MosaicBERT (default 0.15); with --dynamic-masking the loader "
        "masks at this rate",
    )
    p.add_argument("--short-seq-prob", type=_fraction(0.0, 1.0), default=0.1, metavar="P", help="default 0.1")
    p.add_argument(
        "--dupe-factor",
        type=_int_at_least(1),
        default=5,
        metavar="N",
        help="passes over the data, each masked anew (default 5)",
    )
    p.add_argument(
        "--dynamic-masking", action="store_true", help="write shards without masked_lm_* (masked at load time)"
    )
    p.add_argument(
        "--whole-word-masking",
        action="store_true",
        help="mask whole words (a ## WordPiece piece goes with the word before it); with --dynamic-masking the "
        "loader does",
    )
    p.add_argument(
        "--no-nsp",
        action="store_true",
        help="MLM only, RoBERTa's full sentences: pack consecutive sentences up to the length, across documents "
        "with [SEP] between them; shards without next_sentence_labels",
    )
    p.add_argument("--seed", type=_int_at_least(0), default=12345, metavar="N", help="default 12345")
    p.add_argument("--workers", type=_int_at_least(1), default=None, metavar="N", help="processes (default: CPU count)")
    p.add_argument(
        "--num-shards",
        type=_int_at_least(1),
        default=None,
        metavar="N",
        help=f"training shards (default: one per ~{65536:,} samples, up to 4 of at least {16384:,} for a small "
        "corpus); validation is always sized that way",
    )
    p.add_argument(
        "--validation-fraction",
        type=_fraction(0.0, 0.5),
        default=0.01,
        metavar="F",
        help="share of documents held out, every 1/F-th document; at least one when there are two (default 0.01)",
    )
    return p


def _config(args: argparse.Namespace) -> PrepConfig:
    if args.max_predictions_per_seq > args.max_seq_length:
        raise PrepError(
            f"--max-predictions-per-seq {args.max_predictions_per_seq}: expected at most --max-seq-length "
            f"({args.max_seq_length})"
        )
    from data_prep.pipeline import PrepConfig

    return PrepConfig(
        inputs=tuple(args.input),
        output=args.output,
        vocab=args.vocab,
        train_vocab=args.train_vocab,
        lowercase=not args.cased,
        input_format=args.input_format,
        text_key=args.text_key,
        max_seq_length=args.max_seq_length,
        max_predictions_per_seq=args.max_predictions_per_seq,
        short_seq_prob=args.short_seq_prob,
        masked_lm_prob=args.masked_lm_prob,
        dupe_factor=args.dupe_factor,
        dynamic_masking=args.dynamic_masking,
        nsp=not args.no_nsp,
        whole_word_masking=args.whole_word_masking,
        seed=args.seed,
        workers=args.workers or default_workers(),
        num_shards=args.num_shards,
        validation_fraction=args.validation_fraction,
    )


def _report(summary: Summary, output: Path) -> None:
    if summary.already_complete:
        print(f"{PROG}: {output} is already complete for these arguments; nothing to do")
    train, valid = summary.instances.get("train", 0), summary.instances.get("validation", 0)
    print(
        f"{PROG}: {summary.documents:,} documents ({summary.skipped_documents:,} skipped), "
        f"{summary.sentences:,} sentences, {summary.tokens:,} tokens -> "
        f"{train:,} train / {valid:,} validation instances in "
        f"{summary.shards.get('train', 0)} + {summary.shards.get('validation', 0)} shards"
    )
    if not summary.already_complete:
        reused = ""
        if summary.batches_reused or summary.shards_reused:
            reused = f" (reused {summary.batches_reused} batches and {summary.shards_reused} shards of an earlier run)"
        print(
            f"{PROG}: {summary.wall_seconds:.1f} s wall, {summary.tokens_per_second:,.0f} tokens/s{reused}; "
            f"output in {output}"
        )


def _contents(folder: Path) -> set[str] | None:
    """Names in the output folder before the run; None when there is no folder yet."""
    return {p.name for p in folder.iterdir()} if folder.is_dir() else None


def _left_behind(folder: Path, before: set[str] | None) -> str:
    """The end of a failed run's error line: what it left in the output folder, how to go on or clean up."""
    if not folder.is_dir():
        return ""
    new = [p for p in folder.iterdir() if before is None or p.name not in before]
    made = sorted(p.name + ("/" if p.is_dir() else "") for p in new)
    if not made:
        return ""
    clean = f"rm -r {folder}" if before is None else "remove " + " ".join(str(folder / name) for name in made)
    return (f"; this run left {', '.join(made)} in {folder}: a re-run reuses the finished work that still matches "
            f"its arguments; to clean up, {clean}")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if "numpy" not in sys.modules:  # this process is pld-prep, not a program that imported it
        # pld-prep does no linear algebra: without this, importing numpy starts OpenBLAS's thread
        # pool (about 0.03 CPU-seconds), and a process with a second thread cannot fork its workers.
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    # The workers start now, before this process opens a file or starts a thread: it imports their
    # modules and forks them (workers.start_pool), and they load the vocabulary while it checks its
    # inputs and reads the first batch. On small corpora that start-up is a good part of the run.
    # (Not when an input or the vocabulary is missing: that run ends at once with an error.)
    vocab = None if args.vocab is None else str(args.vocab)
    present = all(Path(p).exists() for p in args.input) and (vocab is None or Path(vocab).is_file())
    workers = args.workers or default_workers()
    pool = start_pool(workers, vocab, lowercase=not args.cased, fork_here=True) if present else None
    from data_prep.pipeline import eprint, run

    # A scheduler's SIGTERM gets the same clean stop as Ctrl-C: no half files, resumable.
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if on_main_thread else None
    before = _contents(args.output)
    try:
        cfg = _config(args)
        wanted = round(cfg.max_seq_length * cfg.masked_lm_prob)
        if not cfg.dynamic_masking and wanted > cfg.max_predictions_per_seq:
            eprint(f"warning: --masked-lm-prob {cfg.masked_lm_prob} at --max-seq-length {cfg.max_seq_length} "
                   f"wants up to {wanted} predictions per sequence, but --max-predictions-per-seq is "
                   f"{cfg.max_predictions_per_seq}: full sequences get only that many")
        summary = run(cfg, log=eprint, pool=pool)
    except PrepError as e:
        print(f"{PROG}: error: {e}{_left_behind(args.output, before)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; finished batches and shards are kept and a re-run resumes", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)
        if pool is not None:  # stopped by the run already, unless the arguments were refused first
            pool.shutdown(wait=False, cancel_futures=True)
    _report(summary, cfg.output)
    return 0
