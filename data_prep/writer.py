"""Everything written to disk: atomic files, per-batch spill files, HDF5 shards and the manifest.

Every file is written as ``NAME.tmp`` in its final folder, fsynced, then renamed over ``NAME``, so a
reader or a re-run never sees half a file; leftover ``*.tmp`` files are debris and are deleted.
"""

from __future__ import annotations

import contextlib
import json
import os
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from pld_ds.data import schema

TMP_SUFFIX = ".tmp"
SPLITS = ("train", "validation")
# gzip level 1 with HDF5's byte-shuffle filter: on Wikipedia shards within 5% of the size of level 4
# and a quarter less CPU to write; readers need nothing but stock h5py.
GZIP_LEVEL = 1
# Attribute on every shard: the data key of the run that wrote it, to recognise finished shards.
KEY_ATTR = "pld_prep_key"


@contextlib.contextmanager
def atomic_path(path: Path, sync_dir: bool = True, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write ``path`` through; on success it is fsynced and renamed.

    ``sync_dir=False`` leaves the folder's fsync to a later file in the same folder (one fsync
    makes all earlier renames in it durable). ``durable=False``: renamed without any fsync, for
    scratch files whose reader checks them (a reader never sees half a file; a machine crash may
    leave one).
    """
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        yield tmp
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if sync_dir and durable:
        _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not every platform lets a directory be opened.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def remove_tmp_files(folder: Path) -> None:
    if folder.is_dir():
        for tmp in folder.glob("*" + TMP_SUFFIX):
            with contextlib.suppress(OSError):
                tmp.unlink()


# ---------------------------------------------------------------------------------------------
# Spill files: a few .npy files per finished batch, memory-mapped when the shards are built.

SPILL_ARRAYS = ("input_ids", "lengths", "b_starts", "next_sentence_labels", "masked_lm_positions", "masked_lm_ids")


def spill_dtypes(vocab_size: int) -> dict[str, np.dtype]:
    # Compact on disk: BERT vocabularies fit in 16 bits, positions and lengths fit in int16.
    ids = np.dtype("uint16") if vocab_size <= 65536 else np.dtype("int32")
    return {
        "input_ids": ids,
        "lengths": np.dtype("int16"),
        "b_starts": np.dtype("int16"),
        "next_sentence_labels": np.dtype("int8"),
        "masked_lm_positions": np.dtype("int16"),
        "masked_lm_ids": ids,
    }


def _spill_file(spill_dir: Path, batch: int, name: str) -> Path:
    return spill_dir / f"batch_{batch:06d}.{name}.npy"


def _spill_meta(spill_dir: Path, batch: int) -> Path:
    return spill_dir / f"batch_{batch:06d}.json"


def write_spill(
    spill_dir: Path, batch: int, arrays: dict[str, np.ndarray | None], dtypes: dict[str, np.dtype], stats: dict
) -> None:
    """Store one batch's instances; the small JSON written last marks the batch complete.

    Spill files are scratch, deleted seconds later in a small run, so they are not fsynced (that and
    deleting synced files took a good part of a small run's end). Instead the JSON holds each
    array's CRC-32, and a re-run reuses the batch only if its arrays still match
    (``read_spill_meta``): a batch that a machine crash left incomplete is made again.
    """
    checksums = {}
    for name in SPILL_ARRAYS:
        array = arrays[name]
        if array is None:
            continue
        data = np.ascontiguousarray(array, dtype=dtypes[name])
        checksums[name] = zlib.crc32(data)
        with atomic_path(_spill_file(spill_dir, batch, name), durable=False) as tmp, open(tmp, "wb") as f:
            np.save(f, data)
    with atomic_path(_spill_meta(spill_dir, batch), durable=False) as tmp:
        tmp.write_text(json.dumps({"stats": stats, "crc32": checksums}), encoding="utf-8")


def read_spill_meta(spill_dir: Path, batch: int) -> dict | None:
    """The stats of a finished batch whose arrays are intact; None when it has to be made (again)."""
    try:
        meta = json.loads(_spill_meta(spill_dir, batch).read_text(encoding="utf-8"))
        checksums = meta["crc32"]
        for name, expected in checksums.items():
            if zlib.crc32(np.ascontiguousarray(np.load(_spill_file(spill_dir, batch, name)))) != expected:
                return None
        return dict(meta["stats"])
    except (OSError, ValueError, KeyError, TypeError, EOFError):
        return None


# ---------------------------------------------------------------------------------------------
# Shards.


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:05d}{schema.SHARD_SUFFIX}"


def shard_sizes(num_samples: int, num_shards: int) -> list[int]:
    """Sizes that add up to ``num_samples`` and differ by at most one."""
    base, extra = divmod(num_samples, num_shards)
    return [base + 1] * extra + [base] * (num_shards - extra)


def shard_is_complete(path: Path, key: str, num_samples: int) -> bool:
    if not path.is_file():  # a fresh run: no h5py import for the parent, which only checks shards
        return False
    import h5py  # imported where used: pld-prep's parent rarely needs it, its workers have it already

    try:
        with h5py.File(path, "r") as f:
            return f.attrs.get(KEY_ATTR) == key and f[schema.INPUT_IDS.name].shape[0] == num_samples
    except (OSError, KeyError):
        return False


def gather_rows(
    spill_dir: Path, batches: Sequence[int], offsets: np.ndarray, rows: np.ndarray, names: Sequence[str]
) -> dict[str, np.ndarray]:
    """Rows ``rows`` (global indices over ``batches`` in order; ``offsets`` = cumulative counts,
    starting at 0) of the named spill arrays, in the order given."""
    order = np.argsort(rows, kind="stable")
    sorted_rows = rows[order]
    owner_bounds = np.searchsorted(sorted_rows, offsets)
    out: dict[str, np.ndarray] = {}
    for k, batch in enumerate(batches):
        lo, hi = owner_bounds[k], owner_bounds[k + 1]
        if lo == hi:
            continue
        local = sorted_rows[lo:hi] - offsets[k]
        for name in names:
            source = np.load(_spill_file(spill_dir, batch, name), mmap_mode="r")
            if name not in out:
                out[name] = np.empty((len(rows), *source.shape[1:]), dtype=source.dtype)
            out[name][order[lo:hi]] = source[local]
    return out


def write_shard(
    path: Path,
    spill_dir: Path,
    batches: Sequence[int],
    offsets: np.ndarray,
    rows: np.ndarray,
    seq_len: int,
    dynamic_masking: bool,
    key: str,
    nsp: bool = True,
) -> None:
    """Write the instances ``rows`` (in that order) as one HDF5 shard in schema.py's format; without
    ``nsp`` (MLM-only) the shard has no next_sentence_labels."""
    names = [n for n in SPILL_ARRAYS if not (dynamic_masking and n.startswith("masked_lm"))
             and not (not nsp and n == "next_sentence_labels")]
    spill = gather_rows(spill_dir, batches, offsets, rows, names)
    positions = np.arange(seq_len)[None, :]
    lengths = spill["lengths"].astype(np.int64)[:, None]
    data = {
        schema.INPUT_IDS.name: spill["input_ids"],
        schema.INPUT_MASK.name: positions < lengths,
        schema.SEGMENT_IDS.name: (positions >= spill["b_starts"][:, None]) & (positions < lengths),
    }
    if nsp:
        data[schema.NEXT_SENTENCE_LABELS.name] = spill["next_sentence_labels"]
    if not dynamic_masking:
        data[schema.MASKED_LM_POSITIONS.name] = spill["masked_lm_positions"]
        data[schema.MASKED_LM_IDS.name] = spill["masked_lm_ids"]
    fields = schema.shard_fields(static_masking=not dynamic_masking, nsp=nsp)
    import h5py

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs[KEY_ATTR] = key
        for field in fields:
            f.create_dataset(
                field.name,
                data=np.ascontiguousarray(data[field.name], dtype=field.dtype),
                compression=schema.COMPRESSION,
                compression_opts=GZIP_LEVEL,
                shuffle=True,
            )


def write_manifest(output: Path, manifest: dict) -> None:
    atomic_write_text(output / schema.MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")


def read_manifest(output: Path) -> dict | None:
    try:
        manifest = json.loads((output / schema.MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None
