"""Masking at load time for shards written without masked_lm_* fields (dynamic masking).

BERT's recipe: of the real, non-special tokens, a fraction `masked_lm_prob` (at most
`max_predictions`, at least one) becomes a target; a target is replaced by [MASK] 80% of the time,
by a random token 10%, and kept 10%. The draw depends only on the generator, so a batch masked at a
given data position is masked the same way after a resume.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from pld_ds.data.schema import IGNORE_INDEX


@dataclass(frozen=True)
class DynamicMasking:
    mask_id: int
    special_ids: tuple[int, ...]  # never chosen as targets ([CLS], [SEP], [PAD], ...)
    vocab_size: int
    masked_lm_prob: float = 0.15
    max_predictions: int | None = None  # default: round(seq_len * masked_lm_prob)

    @functools.cached_property
    def _is_special(self) -> np.ndarray:
        """Lookup table: id -> special; one entry past the largest id, False, stands for every larger id."""
        table = np.zeros(max(self.vocab_size, *(i + 1 for i in self.special_ids)) + 1, dtype=bool)
        table[list(self.special_ids)] = True
        return table

    def __call__(self, input_ids: np.ndarray, input_mask: np.ndarray, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray]:
        """(masked input ids, labels with IGNORE_INDEX where there is no target)."""
        rows, seq_len = input_ids.shape
        candidate = (input_mask != 0) & ~self._is_special.take(input_ids, mode="clip")
        cap = min(seq_len, self.max_predictions or max(1, round(seq_len * self.masked_lm_prob)))
        want = np.clip(np.rint(np.count_nonzero(candidate, axis=1) * self.masked_lm_prob), 1, cap).astype(np.int64)
        # Rank the candidates of each row by a random key and keep the `want` smallest. A key is random
        # high bits above the position: no two keys of a row tie, integers sort fast, and the position
        # comes back from the low bits. Non-candidates get the largest key and are never kept.
        pos_bits = max(1, (seq_len - 1).bit_length())
        dtype, raw_bits = (np.int32, 32) if pos_bits <= 16 else (np.int64, 64)
        count = rows * seq_len
        raw = rng.bit_generator.random_raw(-(-count * raw_bits // 64)).view(f"u{raw_bits // 8}")[:count]
        keys = (raw >> (pos_bits + 1)).astype(dtype).reshape(rows, seq_len) << pos_bits
        keys |= np.arange(seq_len, dtype=dtype)
        top = np.iinfo(dtype).max
        keys[~candidate] = top
        smallest = np.sort(keys, axis=1)[:, :cap]
        keep = (np.arange(cap) < want[:, None]) & (smallest != top)
        row = np.nonzero(keep)[0]
        col = (smallest[keep] & ((1 << pos_bits) - 1)).astype(np.int64)

        labels = np.full((rows, seq_len), IGNORE_INDEX, dtype=np.int64)
        labels[row, col] = input_ids[row, col]
        masked = input_ids.astype(np.int64)
        action = rng.random(row.size)
        to_mask, to_random = action < 0.8, (action >= 0.8) & (action < 0.9)
        masked[row[to_mask], col[to_mask]] = self.mask_id
        masked[row[to_random], col[to_random]] = rng.integers(0, self.vocab_size, int(to_random.sum()))
        return masked, labels
