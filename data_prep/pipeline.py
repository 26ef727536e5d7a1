"""The whole run: read -> batch -> (workers: segment, tokenize, build instances, spill) -> shards -> manifest.

Documents are grouped, in reading order, into batches of about ``BATCH_CHARS`` characters per
split. A batch is the unit of parallel work and of randomness (its Generator is seeded with
``(seed, batch index)``), so the output depends on the seed and the inputs but not on
``--workers``. Workers spill each finished batch to disk as compact NumPy arrays; once every
batch is done, each split is shuffled globally with one permutation and cut into shards whose
sizes differ by at most one. Finished batches and shards survive an interruption and are reused
by a re-run with the same arguments; the manifest is written last and marks the output complete.

Validation split: systematic sampling over the documents in reading order. With fraction f > 0,
document i goes to validation when floor((i + 1) * f + 1 - 2f) > floor(i * f + 1 - 2f): about one
document in 1/f, always including the second one, so any corpus of two or more documents has a
validation document. A document longer than PART_CHARS (a whole book) counts as parts of about that
size cut at paragraph breaks, so one book has a validation part too. Random next sentences never
cross the split.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from data_prep import __version__
from data_prep.errors import PrepError
from data_prep.instances import InstanceConfig, continuation_table, create_instances
from data_prep.sources import MIN_DOC_CHARS, CorpusReader, Source, resolve_inputs
from data_prep.vocab import VOCAB_FILE, Vocab, WordPieceEncoder, load_vocab, train_vocab
from data_prep.workers import start_pool
from data_prep.writer import (
    SPLITS,
    atomic_path,
    atomic_write_text,
    read_manifest,
    read_spill_meta,
    remove_tmp_files,
    shard_is_complete,
    shard_name,
    shard_sizes,
    spill_dtypes,
    write_manifest,
    write_shard,
    write_spill,
)
from pld_ds.data import schema

MANIFEST_VERSION = 1
# A document longer than this (a whole book) is cut at paragraph boundaries into parts of about this many
# characters before the validation split, so that a corpus of one or a few books still has validation text.
PART_CHARS = 100_000
# Batch size in characters (~450k WordPiece tokens of English): large enough that random next
# sentences come from hundreds of Wikipedia articles or several books, small enough to keep a
# worker near 200 MB and both cores busy to the end.
BATCH_CHARS = 2_000_000
# Shards per split when --num-shards is not given: about this many samples each.
SAMPLES_PER_SHARD = 65536
# A small corpus still gets up to MIN_SHARDS shards of at least MIN_SHARD_SAMPLES samples: writing a
# shard is one process's work (compressing 45k samples takes about 0.5 CPU-seconds), so with one big
# shard every other worker would wait. Counts depend on the data only, never on --workers.
MIN_SHARDS = 4
MIN_SHARD_SAMPLES = 16384
SPILL_DIR = ".pld-prep-work"
_PROGRESS_SECONDS = 10.0


@dataclass(frozen=True)
class PrepConfig:
    inputs: tuple[str, ...]
    output: Path
    vocab: Path | None = None
    train_vocab: int | None = None
    lowercase: bool = True
    input_format: str = "auto"
    text_key: str = "text"
    max_seq_length: int = 128
    max_predictions_per_seq: int = 20
    short_seq_prob: float = 0.1
    masked_lm_prob: float = 0.15
    dupe_factor: int = 5
    dynamic_masking: bool = False
    nsp: bool = True  # False: MLM-only shards of packed full sentences (--no-nsp)
    whole_word_masking: bool = False
    seed: int = 12345
    workers: int = 1
    num_shards: int | None = None
    validation_fraction: float = 0.01


@dataclass
class Summary:
    documents: int = 0
    skipped_documents: int = 0
    sentences: int = 0
    tokens: int = 0
    instances: dict[str, int] = field(default_factory=dict)
    shards: dict[str, int] = field(default_factory=dict)
    shards_reused: int = 0
    batches_reused: int = 0
    wall_seconds: float = 0.0
    already_complete: bool = False

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.wall_seconds if self.wall_seconds > 0 else 0.0


def run(
    cfg: PrepConfig, log: Callable[[str], None] = lambda _: None, pool: ProcessPoolExecutor | None = None
) -> Summary:
    """Prepare ``cfg.output``; raises PrepError for bad input, anything else is a bug.

    ``pool``: worker processes from ``workers.start_pool`` (the command line starts them before it
    imports this module); without one, they are started when the first batch is ready. Either way
    the run shuts them down.
    """
    try:
        return _run(cfg, log, pool)
    finally:
        if pool is not None:  # a no-op when the run's _Workers has shut it down already
            pool.shutdown(wait=False, cancel_futures=True)


def _run(cfg: PrepConfig, log: Callable[[str], None], pool: ProcessPoolExecutor | None) -> Summary:
    start = time.perf_counter()
    output = cfg.output
    if output.exists() and not output.is_dir():
        raise PrepError(f"--output {output}: exists and is not a directory")
    sources = resolve_inputs(cfg.inputs, cfg.input_format, exclude=output)
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PrepError(f"--output {output}: cannot create ({e.strerror})") from e
    for folder in (output, *(output / s for s in SPLITS)):
        remove_tmp_files(folder)

    vocab = load_vocab(cfg.vocab, cfg.lowercase) if cfg.vocab is not None else None
    request_key = _request_key(cfg, sources, vocab)
    done = _completed_manifest(output, request_key)
    if done is not None:
        summary = _summary_from_manifest(done)
        summary.already_complete = True
        summary.wall_seconds = time.perf_counter() - start
        return summary
    with contextlib.suppress(FileNotFoundError):
        (output / schema.MANIFEST_NAME).unlink()  # no manifest = not complete, until we finish

    if vocab is None:
        assert cfg.train_vocab is not None
        started = time.perf_counter()
        training = CorpusReader(sources, cfg.text_key, cfg.workers)
        tokens = train_vocab(iter(training), cfg.train_vocab, cfg.lowercase)
        if not any(s.documents for s in training.stats):
            raise PrepError(_empty_corpus_message(cfg, training))
        atomic_write_text(output / VOCAB_FILE, "".join(t + "\n" for t in tokens))
        log(f"trained a {len(tokens):,}-token vocabulary in {time.perf_counter() - started:.1f} s")
        vocab = load_vocab(output / VOCAB_FILE, cfg.lowercase, flag="--train-vocab")
    else:
        # The output folder is self-contained: training and fine-tuning find the vocabulary beside the shards.
        copy = output / VOCAB_FILE
        if vocab.path.resolve() != copy.resolve():
            with atomic_path(copy) as tmp:
                tmp.write_bytes(vocab.path.read_bytes())  # byte for byte: the manifest holds its hash
    data_key = _hash({"request": request_key, "vocab": vocab.sha256})
    spill_dir = output / SPILL_DIR / data_key[:16]
    _prepare_spill(output / SPILL_DIR, spill_dir)

    inst_cfg = InstanceConfig(
        max_seq_length=cfg.max_seq_length,
        max_predictions_per_seq=cfg.max_predictions_per_seq,
        short_seq_prob=cfg.short_seq_prob,
        masked_lm_prob=cfg.masked_lm_prob,
        dupe_factor=cfg.dupe_factor,
        dynamic_masking=cfg.dynamic_masking,
        vocab_size=vocab.size,
        cls_id=vocab.cls_id,
        sep_id=vocab.sep_id,
        mask_id=vocab.mask_id,
        nsp=cfg.nsp,
        continuation=_continuation(vocab) if cfg.whole_word_masking and not cfg.dynamic_masking else None,
    )
    reader = CorpusReader(sources, cfg.text_key, cfg.workers)
    summary = Summary()
    try:
        with _Workers(cfg.workers, vocab, inst_cfg, cfg.seed, spill_dir, pool) as workers:
            batches = _process_batches(reader, cfg, workers, spill_dir, summary, log)
            summary.documents = sum(s.documents for s in reader.stats)
            summary.skipped_documents = sum(s.skipped_documents for s in reader.stats)
            if summary.documents == 0:
                raise PrepError(_empty_corpus_message(cfg, reader))
            if not any(b["instances"] for b in batches):
                raise PrepError(f"--input {' '.join(cfg.inputs)}: no sentence pairs could be made (no text tokenized)")
            shards = _write_shards(batches, cfg, workers, spill_dir, data_key, summary, log)
    except BaseException:
        # Terminated workers may leave half-written files behind; finished ones stay for a re-run.
        for folder in (spill_dir, *(output / s for s in SPLITS)):
            remove_tmp_files(folder)
        raise
    _remove_stale_shards(output, shards)
    manifest = _manifest(cfg, vocab, reader, batches, shards, request_key, data_key, summary)
    write_manifest(output, manifest)
    shutil.rmtree(output / SPILL_DIR, ignore_errors=True)
    summary.wall_seconds = time.perf_counter() - start
    return summary


# ---------------------------------------------------------------------------------------------
# Keys and resumption.


def _hash(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _request_key(cfg: PrepConfig, sources: list[Source], vocab: Vocab | None) -> str:
    """Everything that decides the output: settings, the input files as they are now, the vocab."""
    settings = asdict(cfg)
    for ignored in ("output", "workers", "inputs", "vocab"):
        settings.pop(ignored)
    files = []
    for source in sources:
        for path, fmt in source.files:
            st = path.stat()
            files.append([str(path.resolve()), fmt, st.st_size, st.st_mtime_ns])
    return _hash(
        {
            "version": __version__,
            "manifest_version": MANIFEST_VERSION,
            "batch_chars": BATCH_CHARS,
            "samples_per_shard": SAMPLES_PER_SHARD,
            "min_shards": [MIN_SHARDS, MIN_SHARD_SAMPLES],
            "settings": settings,
            "files": files,
            "vocab_sha256": vocab.sha256 if vocab is not None else None,
        }
    )


def _completed_manifest(output: Path, request_key: str) -> dict | None:
    manifest = read_manifest(output)
    if manifest is None or manifest.get("request_key") != request_key:
        return None
    vocab = manifest.get("vocab", {})
    path = output / VOCAB_FILE
    if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != vocab.get("sha256"):
        return None
    for split in SPLITS:
        for shard in manifest["splits"][split]["shards"]:
            if not shard_is_complete(output / shard["file"], manifest["data_key"], shard["samples"]):
                return None
    return manifest


def _continuation(vocab: Vocab) -> np.ndarray:
    """Whole-word masking's table: per token id, whether the piece continues a word (##...)."""
    return continuation_table(vocab.path.read_bytes().decode("utf-8").splitlines())


def _prepare_spill(root: Path, spill_dir: Path) -> None:
    # Work left by a run with other settings can never be reused.
    if root.is_dir():
        for other in root.iterdir():
            if other != spill_dir:
                shutil.rmtree(other, ignore_errors=True)
    spill_dir.mkdir(parents=True, exist_ok=True)
    remove_tmp_files(spill_dir)


# ---------------------------------------------------------------------------------------------
# Workers.

_state: dict[str, object] = {}


def _use_context(context: tuple) -> None:
    """Make a run's settings current in this process (a worker may have served another run before)."""
    key, vocab, inst_cfg, seed, spill_dir = context
    if _state.get("key") != key:
        _state.update(key=key, encoder=_encoder(vocab), cfg=inst_cfg, seed=seed, spill_dir=spill_dir, vocab=vocab)


def _encoder(vocab: Vocab) -> WordPieceEncoder:
    encoders: dict = _state.setdefault("encoders", {})  # type: ignore[assignment]
    key = (vocab.sha256, vocab.lowercase)
    if key not in encoders:
        encoders[key] = WordPieceEncoder(vocab)
    return encoders[key]


def warm_encoder(vocab_path: str, lowercase: bool) -> None:
    """Load the vocabulary into a worker before its first task (workers.init_worker calls this)."""
    with contextlib.suppress(Exception):  # a bad vocabulary is the parent's to report, in one line
        _encoder(load_vocab(Path(vocab_path), lowercase))


def _process_batch(context: tuple, batch: int, documents: list[str]) -> dict:
    from data_prep.segment import tokenize_documents  # blingfire: loaded by the workers only

    _use_context(context)
    cfg: InstanceConfig = _state["cfg"]  # type: ignore[assignment]
    tokenized = tokenize_documents(documents, _state["encoder"])  # type: ignore[arg-type]
    rng = np.random.default_rng([_state["seed"], batch])  # type: ignore[list-item]
    instances = create_instances(tokenized, cfg, rng)
    stats = {
        "documents": tokenized.num_documents,
        "sentences": tokenized.num_sentences,
        "tokens": tokenized.num_tokens,
        "instances": len(instances),
        "instance_tokens": int(instances.lengths.sum()),
    }
    arrays = {
        "input_ids": instances.input_ids,
        "lengths": instances.lengths,
        "b_starts": instances.b_starts,
        "next_sentence_labels": instances.next_sentence_labels,
        "masked_lm_positions": instances.masked_lm_positions,
        "masked_lm_ids": instances.masked_lm_ids,
    }
    vocab: Vocab = _state["vocab"]  # type: ignore[assignment]
    write_spill(_state["spill_dir"], batch, arrays, spill_dtypes(vocab.size), stats)  # type: ignore[arg-type]
    return stats


def _write_shard_task(args: tuple) -> str:
    path, *rest = args
    write_shard(path, *rest)
    return str(path)


class _Workers:
    """The run's process pool (workers.start_pool), or the calling process itself when ``workers == 1``."""

    def __init__(
        self,
        workers: int,
        vocab: Vocab,
        inst_cfg: InstanceConfig,
        seed: int,
        spill_dir: Path,
        pool: ProcessPoolExecutor | None = None,
    ) -> None:
        self.size = workers
        # Sent with every batch: pool processes are started before the run's settings are known.
        self.context = (os.urandom(8).hex(), vocab, inst_cfg, seed, spill_dir)
        self._given = pool
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> _Workers:
        if self.size > 1:
            self._pool = self._given or start_pool(self.size)
        else:
            _use_context(self.context)
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        pool, self._pool = self._pool, None
        _state.clear()
        if pool is None:
            return
        if exc_type is None:
            pool.shutdown(wait=True)
            return
        # Error or Ctrl-C: stop now. Workers killed mid-write leave only *.tmp files, which the
        # caller deletes once they are gone. (ProcessPoolExecutor has no public terminate before 3.14.)
        processes = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.terminate()
        for process in processes:
            process.join(timeout=10)

    def submit(self, fn: Callable, *args: object) -> Future:
        if self._pool is not None:
            return self._pool.submit(fn, *args)
        future: Future = Future()
        future.set_result(fn(*args))
        return future

    def map_unordered(self, fn: Callable, tasks: list) -> Iterator:
        if self._pool is None:
            return map(fn, tasks)
        return (f.result() for f in as_completed([self._pool.submit(fn, t) for t in tasks]))


# ---------------------------------------------------------------------------------------------
# Phase 1: batches.


def _parts(document: str, size: int = PART_CHARS) -> Iterator[str]:
    """The document in parts of at least ``size`` characters cut at paragraph breaks (the last part up to
    1.5 x ``size``); a document of at most 1.5 x ``size`` is one part."""
    start = 0
    while len(document) - start > size * 3 // 2:
        cut = document.find("\n\n", start + size)
        if cut < 0:
            break
        yield document[start:cut]
        start = cut + 2
    yield document[start:]


def _is_validation(i: int, numerator: int, denominator: int) -> bool:
    offset = denominator - 2 * numerator
    return ((i + 1) * numerator + offset) // denominator > (i * numerator + offset) // denominator


def _progress(started: float, fraction: float) -> str:
    """'42%, ETA 0:01:05': the rest at the rate so far."""
    fraction = min(max(fraction, 0.0), 0.99)  # compressed inputs count decompressed bytes
    if fraction == 0.0:
        return "0%"
    left = round((time.perf_counter() - started) * (1 - fraction) / fraction)
    return f"{fraction:.0%}, ETA {left // 3600}:{left % 3600 // 60:02d}:{left % 60:02d}"


def _process_batches(
    reader: CorpusReader,
    cfg: PrepConfig,
    workers: _Workers,
    spill_dir: Path,
    summary: Summary,
    log: Callable[[str], None],
) -> list[dict]:
    """Read, batch and process every document; returns the stats of each batch in index order."""
    denominator = 1_000_000
    numerator = round(cfg.validation_fraction * denominator)
    pending: deque[tuple[int, str, Future]] = deque()
    results: list[dict] = []
    buffers: dict[str, list[str]] = {s: [] for s in SPLITS}
    sizes = dict.fromkeys(SPLITS, 0)
    next_batch = 0
    started = last_report = time.perf_counter()
    total_bytes = sum(path.stat().st_size for source in reader.sources for path, _ in source.files)

    def collect(block: bool) -> None:
        while pending and (block or len(pending) >= 2 * workers.size):
            index, split, handle = pending.popleft()
            stats = handle.result()
            results.append({"batch": index, "split": split, **stats})

    def flush(split: str) -> None:
        nonlocal next_batch, last_report
        index, next_batch = next_batch, next_batch + 1
        documents, buffers[split], sizes[split] = buffers[split], [], 0
        meta = read_spill_meta(spill_dir, index)
        if meta is not None:
            summary.batches_reused += 1
            results.append({"batch": index, "split": split, **meta})
            return
        pending.append((index, split, workers.submit(_process_batch, workers.context, index, documents)))
        collect(block=False)
        if time.perf_counter() - last_report > _PROGRESS_SECONDS:
            last_report = time.perf_counter()
            docs = sum(s.documents for s in reader.stats)
            read = sum(s.bytes for s in reader.stats) / max(total_bytes, 1)
            log(f"{docs:,} documents read, {len(results):,} of {next_batch:,} batches done; "
                f"input {_progress(started, read)}")

    for i, document in enumerate(part for whole in reader for part in _parts(whole)):
        split = "validation" if numerator and _is_validation(i, numerator, denominator) else "train"
        buffers[split].append(document)
        sizes[split] += len(document)
        if sizes[split] >= BATCH_CHARS:
            flush(split)
    for split in SPLITS:
        if buffers[split]:
            flush(split)
    collect(block=True)
    results.sort(key=lambda r: r["batch"])
    for r in results:
        summary.sentences += r["sentences"]
        summary.tokens += r["tokens"]
    return results


def _empty_corpus_message(cfg: PrepConfig, reader: CorpusReader) -> str:
    files = sum(s.files for s in reader.stats)
    skipped = sum(s.skipped_documents for s in reader.stats)
    return (
        f"--input {' '.join(cfg.inputs)}: no documents found in {files} file(s) "
        f"({skipped} skipped as empty, shorter than {MIN_DOC_CHARS} characters, malformed or without the "
        f"{cfg.text_key!r} field); expected text in one of the supported formats"
    )


# ---------------------------------------------------------------------------------------------
# Phase 2: shards.


def _num_shards(split: str, samples: int, requested: int | None) -> int:
    if samples == 0:
        return 0
    if split == "train" and requested:
        return max(1, min(requested, samples))
    return max(1, math.ceil(samples / SAMPLES_PER_SHARD), min(MIN_SHARDS, samples // MIN_SHARD_SAMPLES))


def _write_shards(
    batches: list[dict],
    cfg: PrepConfig,
    workers: _Workers,
    spill_dir: Path,
    data_key: str,
    summary: Summary,
    log: Callable[[str], None],
) -> dict[str, list[dict]]:
    shards: dict[str, list[dict]] = {}
    tasks = []
    for split_index, split in enumerate(SPLITS):
        mine = [b for b in batches if b["split"] == split]
        counts = np.array([b["instances"] for b in mine], dtype=np.int64)
        offsets = np.concatenate(([0], np.cumsum(counts)))
        total = int(offsets[-1])
        count = _num_shards(split, total, cfg.num_shards)
        if split == "train" and cfg.num_shards and count < cfg.num_shards:
            log(f"only {total} training instances: writing {count} shards, not {cfg.num_shards}")
        order = np.random.default_rng([cfg.seed, 1_000_003, split_index]).permutation(total)
        bounds = np.concatenate(([0], np.cumsum(shard_sizes(total, count)))) if count else np.zeros(1, np.int64)
        folder = cfg.output / split
        folder.mkdir(exist_ok=True)
        batch_ids, seq = [b["batch"] for b in mine], cfg.max_seq_length
        shards[split] = []
        for k in range(count):
            name = shard_name(split, k)
            rows = order[bounds[k] : bounds[k + 1]]
            shards[split].append({"file": f"{split}/{name}", "samples": len(rows)})
            if shard_is_complete(folder / name, data_key, len(rows)):
                summary.shards_reused += 1
                continue
            tasks.append((folder / name, spill_dir, batch_ids, offsets, rows, seq, cfg.dynamic_masking, data_key,
                          cfg.nsp))
        summary.instances[split] = total
        summary.shards[split] = count
    started = last_report = time.perf_counter()
    for done, _ in enumerate(workers.map_unordered(_write_shard_task, tasks), start=1):
        if time.perf_counter() - last_report > _PROGRESS_SECONDS:
            last_report = time.perf_counter()
            log(f"{done} of {len(tasks)} shards written; {_progress(started, done / len(tasks))}")
    return shards


def _remove_stale_shards(output: Path, shards: dict[str, list[dict]]) -> None:
    # Shards of an earlier run with more shards would otherwise be read as part of this data set.
    for split in SPLITS:
        keep = {Path(s["file"]).name for s in shards[split]}
        for path in (output / split).glob(f"{split}_*{schema.SHARD_SUFFIX}"):
            if path.name not in keep:
                path.unlink()


# ---------------------------------------------------------------------------------------------
# Manifest.


def _manifest(
    cfg: PrepConfig,
    vocab: Vocab,
    reader: CorpusReader,
    batches: list[dict],
    shards: dict[str, list[dict]],
    request_key: str,
    data_key: str,
    summary: Summary,
) -> dict:
    splits = {}
    for split in SPLITS:
        mine = [b for b in batches if b["split"] == split]
        splits[split] = {
            "documents": sum(b["documents"] for b in mine),
            "sentences": sum(b["sentences"] for b in mine),
            "tokens": sum(b["tokens"] for b in mine),
            "instances": sum(b["instances"] for b in mine),
            "instance_tokens": sum(b["instance_tokens"] for b in mine),
            "shards": shards[split],
        }
    fields = schema.shard_fields(static_masking=not cfg.dynamic_masking, nsp=cfg.nsp)
    return {
        "version": MANIFEST_VERSION,
        "generator": f"pld-prep {__version__}",
        "format": "nvidia-bert-hdf5",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "request_key": request_key,
        "data_key": data_key,
        "seed": cfg.seed,
        "max_seq_length": cfg.max_seq_length,
        "max_predictions_per_seq": cfg.max_predictions_per_seq,
        "dynamic_masking": cfg.dynamic_masking,
        # false: MLM-only shards (packed full sentences, no next_sentence_labels)
        "nsp": cfg.nsp,
        # with dynamic masking, the loader masks at this rate and, if set, whole words
        "whole_word_masking": cfg.whole_word_masking,
        "dupe_factor": cfg.dupe_factor,
        "short_seq_prob": cfg.short_seq_prob,
        "masked_lm_prob": cfg.masked_lm_prob,
        "validation_fraction": cfg.validation_fraction,
        "fields": {f.name: {"dtype": f.dtype.name, "dims": list(f.dims)} for f in fields},
        "vocab": {
            "file": VOCAB_FILE,  # beside the manifest
            "trained": cfg.vocab is None,
            "source": None if cfg.vocab is None else str(cfg.vocab),
            "size": vocab.size,
            "sha256": vocab.sha256,
            "lowercase": vocab.lowercase,
        },
        "sources": [s.as_dict() for s in reader.stats],
        "splits": splits,
        "total_documents": summary.documents,
        "total_sentences": summary.sentences,
        "total_tokens": summary.tokens,
        "total_instances": sum(splits[s]["instances"] for s in SPLITS),
    }


def _summary_from_manifest(manifest: dict) -> Summary:
    splits = manifest["splits"]
    return Summary(
        documents=manifest["total_documents"],
        skipped_documents=sum(s["skipped_documents"] for s in manifest["sources"]),
        sentences=manifest["total_sentences"],
        tokens=manifest["total_tokens"],
        instances={s: splits[s]["instances"] for s in SPLITS},
        shards={s: len(splits[s]["shards"]) for s in SPLITS},
    )


def eprint(message: str) -> None:
    print(f"pld-prep: {message}", file=sys.stderr, flush=True)
