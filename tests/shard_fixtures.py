"""Small synthetic shards in NVIDIA's schema, with learnable structure, for tests."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from pld_ds.data import schema

VOCAB_SIZE = 100
CLS, SEP, MASK = 2, 3, 4
FIRST_WORD = 5


def make_samples(num: int, seq_len: int, max_pred: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Sequences that count upwards mod the vocabulary, so the masked tokens are predictable."""
    ids = np.zeros((num, seq_len), np.int32)
    mask = np.zeros((num, seq_len), np.int8)
    segments = np.zeros((num, seq_len), np.int8)
    positions = np.zeros((num, max_pred), np.int32)
    labels = np.zeros((num, max_pred), np.int32)
    nsp = rng.integers(0, 2, num).astype(np.int8)
    words = VOCAB_SIZE - FIRST_WORD
    for i in range(num):
        length = int(rng.integers(seq_len // 2, seq_len + 1))
        start = int(rng.integers(0, words))
        body = FIRST_WORD + (start + np.arange(length - 3)) % words
        half = (length - 3) // 2
        ids[i, :length] = np.concatenate([[CLS], body[:half], [SEP], body[half:], [SEP]])
        mask[i, :length] = 1
        segments[i, half + 2:length] = 1
        candidates = np.array([j for j in range(1, length) if ids[i, j] not in (CLS, SEP)])
        chosen = np.sort(rng.choice(candidates, size=min(max_pred, max(1, len(candidates) * 15 // 100)), replace=False))
        positions[i, :len(chosen)] = chosen
        labels[i, :len(chosen)] = ids[i, chosen]
        ids[i, chosen] = MASK
    return {"input_ids": ids, "input_mask": mask, "segment_ids": segments,
            "masked_lm_positions": positions, "masked_lm_ids": labels, "next_sentence_labels": nsp}


def write_shard(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    """Written the way NVIDIA's create_pretraining_data.py writes: gzip datasets with its dtypes."""
    with h5py.File(path, "w") as f:
        for field in schema.ALL_FIELDS:
            if field.name in arrays:
                data = arrays[field.name].astype(field.dtype)
                f.create_dataset(field.name, data=data, compression=schema.COMPRESSION)
    return path


def make_shard_dir(root: Path, shard_sizes=(64, 64), seq_len=32, max_pred=5, seed=0, validation=0) -> Path:
    rng = np.random.default_rng(seed)
    train = root / "train"
    train.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(shard_sizes):
        write_shard(train / f"train_{i:05d}.hdf5", make_samples(n, seq_len, max_pred, rng))
    if validation:
        (root / "validation").mkdir(exist_ok=True)
        write_shard(root / "validation" / "validation_00000.hdf5", make_samples(validation, seq_len, max_pred, rng))
    (root / schema.MANIFEST_NAME).write_text(f'{{"vocab": {{"size": {VOCAB_SIZE}}}}}')
    return root
