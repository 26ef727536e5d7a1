"""Open and validate HDF5 shards; every error names the shard and what was expected."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from pld_ds.data import schema
from pld_ds.errors import UserError


class ShardError(UserError):
    pass


@dataclass(frozen=True)
class ShardInfo:
    path: Path
    num_samples: int
    seq_len: int
    max_predictions: int  # 0 for dynamic-masking shards
    static_masking: bool
    nsp: bool = True  # False: an MLM-only shard, without next_sentence_labels


def find_shards(folder: str | Path, what: str = "--data") -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ShardError(f"{what} {folder}: no such directory (expected a folder of *{schema.SHARD_SUFFIX} shards)")
    shards = sorted(folder.glob(f"*{schema.SHARD_SUFFIX}"))
    if not shards:
        raise ShardError(f"{what} {folder}: no *{schema.SHARD_SUFFIX} shards in this folder")
    return shards


def inspect_shard(path: Path) -> ShardInfo:
    """Check names, dtypes and shapes without reading the data."""
    try:
        with h5py.File(path, "r") as f:
            missing = [field.name for field in schema.TOKEN_FIELDS if field.name not in f]
            if missing:
                names = ", ".join(fl.name for fl in schema.BASE_FIELDS)
                raise ShardError(f"{path}: missing dataset {missing[0]} (expected {names})")
            static = all(field.name in f for field in schema.MASK_FIELDS)
            if not static and any(field.name in f for field in schema.MASK_FIELDS):
                raise ShardError(f"{path}: has only one of masked_lm_positions / masked_lm_ids "
                                 "(expected both or neither)")
            nsp = schema.NEXT_SENTENCE_LABELS.name in f  # absent: an MLM-only shard
            fields = schema.shard_fields(static, nsp)
            datasets = {field.name: f[field.name] for field in fields}
            for field in fields:
                data = datasets[field.name]
                if not isinstance(data, h5py.Dataset):
                    raise ShardError(f"{path}: {field.name} is an HDF5 {type(data).__name__}, not a dataset "
                                     f"(expected an array of {field.dtype})")
                if data.dtype.kind not in "iu":
                    raise ShardError(f"{path}: {field.name} has dtype {data.dtype} (expected integers, {field.dtype})")
            # Sizes come from input_ids [N, seq] and masked_lm_ids [N, pred]; check their rank before reading them.
            for field, dims in ((schema.INPUT_IDS, "[samples, sequence length]"),
                                (schema.MASKED_LM_IDS, "[samples, max predictions]")):
                data = datasets.get(field.name)
                if data is not None and data.ndim != 2:  # ndim is 0 for a scalar and for an empty dataspace
                    raise ShardError(f"{path}: {field.name} has shape {data.shape} (expected {dims})")
            num, seq = datasets[schema.INPUT_IDS.name].shape
            if seq == 0:
                raise ShardError(f"{path}: input_ids has shape {(num, seq)} (expected a sequence length of at least 1)")
            max_pred = datasets[schema.MASKED_LM_IDS.name].shape[1] if static else 0
            for field in fields:
                data = datasets[field.name]
                want = schema.expected_shape(field, num, seq, max_pred)
                # NVIDIA's next_sentence_labels is [N]; accept [N, 1] too.
                if data.shape != want and not (field.dims == () and data.shape == (num, 1)):
                    raise ShardError(f"{path}: {field.name} has shape {data.shape} (expected {want})")
    except (OSError, KeyError, RuntimeError, ValueError) as err:
        # h5py reports a damaged file as any of these, depending on which of its structures is damaged.
        raise ShardError(f"{path}: not a readable HDF5 shard ({err})") from None
    return ShardInfo(path, num, seq, max_pred, static, nsp)


# Rows per sequential read: about this many bytes of input_ids, and never less than one chunk.
SLAB_BYTES = 8 << 20


def _slab_rows(datasets: dict[str, h5py.Dataset], num_samples: int) -> int:
    ids = datasets[schema.INPUT_IDS.name]
    row_bytes = max(1, ids.dtype.itemsize * int(np.prod(ids.shape[1:])))
    chunk_rows = max((ds.chunks[0] for ds in datasets.values() if ds.chunks), default=1)
    return max(1, min(num_samples, max(chunk_rows, SLAB_BYTES // row_bytes)))


def slab_rows(info: ShardInfo) -> int:
    """Rows per sequential read of this shard (read_rows reads slabs [k * slab, (k + 1) * slab))."""
    fields = schema.shard_fields(info.static_masking, info.nsp)
    try:
        with h5py.File(info.path, "r") as f:
            return _slab_rows({field.name: f[field.name] for field in fields}, info.num_samples)
    except OSError as err:
        raise ShardError(f"{info.path}: not a readable HDF5 shard ({err})") from None


def check_rows(info: ShardInfo, arrays: dict[str, np.ndarray], vocab_size: int) -> None:
    """Token ids inside the vocabulary, 0/1 fields, prediction positions inside the sequence: min/max checks."""
    for name in (schema.INPUT_IDS.name, schema.MASKED_LM_IDS.name):
        if name in arrays and arrays[name].size and (arrays[name].min() < 0 or arrays[name].max() >= vocab_size):
            raise ShardError(f"{info.path}: {name} holds token ids outside [0, {vocab_size}) "
                             "(expected ids of the model's vocabulary)")
    for name in (schema.SEGMENT_IDS.name, schema.INPUT_MASK.name, schema.NEXT_SENTENCE_LABELS.name):
        if name in arrays and arrays[name].size and (arrays[name].min() < 0 or arrays[name].max() > 1):
            raise ShardError(f"{info.path}: {name} holds values outside {{0, 1}} (expected 0 or 1)")
    positions = arrays.get(schema.MASKED_LM_POSITIONS.name)
    if positions is not None and positions.size and (positions.min() < 0 or positions.max() >= info.seq_len):
        raise ShardError(f"{info.path}: masked_lm_positions outside [0, {info.seq_len}) "
                         "(expected positions inside the sequence, 0 for unused slots)")


def read_lengths(info: ShardInfo, rows: np.ndarray) -> np.ndarray:
    """Tokens up to the last real one (input_mask) of samples ``rows``: what a batch of them must keep."""
    mask = read_rows(info, rows, 0, names=(schema.INPUT_MASK.name,))[schema.INPUT_MASK.name] != 0
    return np.where(mask.any(1), mask.shape[1] - np.argmax(mask[:, ::-1], axis=1), 0)


def read_rows(info: ShardInfo, rows: np.ndarray, vocab_size: int, names: tuple[str, ...] | None = None
              ) -> dict[str, np.ndarray]:
    """Samples ``rows`` of a shard, in the order given (indices may repeat).

    HDF5 compresses chunks of many rows, so picking rows one by one decompresses a chunk per row
    (hundreds of times slower than reading in order). Instead the shard is read in order, in slabs
    of a few MB, skipping slabs that hold none of ``rows``; only ``rows`` are kept. Every slab read is
    checked (``check_rows``) before use.
    """
    rows = np.asarray(rows, dtype=np.int64)
    order = np.argsort(rows, kind="stable")
    wanted = rows[order]
    fields = schema.shard_fields(info.static_masking, info.nsp)
    nsp = schema.NEXT_SENTENCE_LABELS.name
    try:
        with h5py.File(info.path, "r") as f:
            every = {field.name: f[field.name] for field in fields}
            step = _slab_rows(every, info.num_samples)  # from every field: slabs stay where the loader expects
            datasets = {name: ds for name, ds in every.items() if names is None or name in names}
            out = {name: np.empty((len(rows), *(ds.shape[1:] if name != nsp else ())), ds.dtype)
                   for name, ds in datasets.items()}
            bounds = np.searchsorted(wanted, np.arange(0, info.num_samples + step, step))
            for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
                if a == b:
                    continue
                lo = k * step
                slab = {name: ds[lo:lo + step] for name, ds in datasets.items()}
                if nsp in slab:
                    slab[nsp] = slab[nsp].reshape(-1)
                check_rows(info, slab, vocab_size)
                for name, values in slab.items():
                    out[name][order[a:b]] = values[wanted[a:b] - lo]
    except OSError as err:
        raise ShardError(f"{info.path}: cannot read shard data ({err})") from None
    return out


def inspect_paths(paths: list[Path], skip_bad: bool = False) -> tuple[list[ShardInfo], list[ShardError]]:
    """(infos of the good shards, errors of the bad ones); without ``skip_bad`` the first error is raised."""
    infos, bad = [], []
    for path in paths:
        try:
            infos.append(inspect_shard(path))
        except ShardError as err:
            if not skip_bad:
                raise
            bad.append(err)
    if not infos:
        raise ShardError(f"{paths[0].parent}: all {len(paths)} shards failed validation (first: {bad[0]})")
    return infos, bad


def check_seq_len(infos: list[ShardInfo], seq_len: int | None = None) -> list[ShardInfo]:
    """Every shard has ``seq_len`` (default: the first shard's sequence length)."""
    # Name where the expected length comes from: the first shard, or the caller (the training shards).
    origin = f"as in {infos[0].path}" if seq_len is None else "as the other shards of this run"
    seq_len = seq_len or infos[0].seq_len
    for info in infos:
        if info.seq_len != seq_len:
            raise ShardError(f"{info.path}: sequence length {info.seq_len} (expected {seq_len}, {origin})")
    return infos


def check_nsp(infos: list[ShardInfo], nsp: bool | None = None) -> list[ShardInfo]:
    """Every shard has next_sentence_labels, or none has (default: as the first shard)."""
    origin = f"as {infos[0].path}" if nsp is None else "as the training shards of this run"
    nsp = infos[0].nsp if nsp is None else nsp
    for info in infos:
        if info.nsp != nsp:
            have = "has next_sentence_labels" if info.nsp else "has no next_sentence_labels (an MLM-only shard)"
            want = "with" if nsp else "without"
            raise ShardError(f"{info.path}: {have} (expected shards {want} them, {origin})")
    return infos
