"""Masking at load time for shards written without masked_lm_* fields (dynamic masking).

BERT's recipe: of the real, non-special tokens, a fraction `masked_lm_prob` (at most
`max_predictions`, at least one) becomes a target; a target is replaced by [MASK] 80% of the time,
by a random token 10%, and kept 10%. The draw depends only on the generator, so a batch masked at a
given data position is masked the same way after a resume.

Whole-word masking (``continuation_ids`` given: the ids of the vocabulary's ``##`` pieces): a piece
that continues a word goes with the word before it; the row's words are drawn in a random order and
each is taken whole while it fits the row's target count, as in Google's and NVIDIA's static
whole-word masking; every piece of a taken word gets its own 80/10/10 draw.
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
    # Whole-word masking: the ids of pieces that continue a word (WordPiece "##..."); None: mask pieces.
    continuation_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.masked_lm_prob <= 1.0:
            raise ValueError(f"masked_lm_prob must be in (0, 1], got {self.masked_lm_prob!r}")

    @functools.cached_property
    def _continues(self) -> np.ndarray:
        """Lookup table: id -> continues a word; ids past the table (clipped to its last entry) do not."""
        table = np.zeros(max(self.vocab_size, *(i + 1 for i in self.continuation_ids or ())) + 1, dtype=bool)
        table[list(self.continuation_ids or ())] = True
        return table

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
        if self.continuation_ids is not None:
            row, col = np.nonzero(self._whole_words(input_ids, candidate, want, rng))
            return self._replace(input_ids, row, col, rng)
        # Rank the candidates of each row by a random key and keep the `want` smallest. A key is random
        # high bits above the position: no two keys of a row tie, integers sort fast, and the position
        # comes back from the low bits. Non-candidates get the largest key and are never kept.
        keys, pos_bits = _position_keys(rows, seq_len, rng)
        top = np.iinfo(keys.dtype).max
        keys[~candidate] = top
        smallest = np.sort(keys, axis=1)[:, :cap]
        keep = (np.arange(cap) < want[:, None]) & (smallest != top)
        row = np.nonzero(keep)[0]
        col = (smallest[keep] & ((1 << pos_bits) - 1)).astype(np.int64)
        return self._replace(input_ids, row, col, rng)

    def _replace(self, input_ids: np.ndarray, row: np.ndarray, col: np.ndarray, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray]:
        """Targets at (row, col): labels there, and 80% [MASK], 10% a random id, 10% kept."""
        rows, seq_len = input_ids.shape
        labels = np.full((rows, seq_len), IGNORE_INDEX, dtype=np.int64)
        labels[row, col] = input_ids[row, col]
        masked = input_ids.astype(np.int64)
        action = rng.random(row.size)
        to_mask, to_random = action < 0.8, (action >= 0.8) & (action < 0.9)
        masked[row[to_mask], col[to_mask]] = self.mask_id
        masked[row[to_random], col[to_random]] = rng.integers(0, self.vocab_size, int(to_random.sum()))
        return masked, labels

    def _whole_words(self, input_ids: np.ndarray, candidate: np.ndarray, want: np.ndarray,
                     rng: np.random.Generator) -> np.ndarray:
        """[rows, seq] bool: the pieces of the words chosen in each row. A word starts at a candidate that is
        not a ## piece following another candidate; words are taken in a random order while they fit ``want``."""
        rows, seq_len = candidate.shape
        previous = np.zeros_like(candidate)
        previous[:, 1:] = candidate[:, :-1]
        start = candidate & ~(self._continues.take(input_ids, mode="clip") & previous)
        flat_start, flat_candidate = start.reshape(-1), candidate.reshape(-1)
        word_of = np.cumsum(flat_start) - 1  # running word index; candidates always follow their word's start
        length_at = np.zeros(rows * seq_len, dtype=np.int64)
        length_at[flat_start] = np.bincount(word_of[flat_candidate], minlength=int(flat_start.sum()))
        # Words in a random order: the word starts sorted by random keys (non-starts after every word).
        keys, pos_bits = _position_keys(rows, seq_len, rng)
        keys[~start] = np.iinfo(keys.dtype).max
        order = (np.sort(keys, axis=1) & ((1 << pos_bits) - 1)).astype(np.int64)
        sorted_length = np.take_along_axis(length_at.reshape(rows, seq_len), order, axis=1)
        words = start.sum(axis=1)
        taken = np.zeros(rows, dtype=np.int64)
        chosen = np.zeros((rows, seq_len), dtype=bool)
        for column in range(int(words.max(initial=0))):
            active = (taken < want) & (column < words)
            if not active.any():
                break
            fits = active & (taken + sorted_length[:, column] <= want)
            chosen[:, column] = fits
            taken += np.where(fits, sorted_length[:, column], 0)
        chosen_start = np.zeros((rows, seq_len), dtype=bool)
        row, column = np.nonzero(chosen)
        chosen_start[row, order[row, column]] = True
        return (flat_candidate & chosen_start.reshape(-1)[flat_start][np.maximum(word_of, 0)]).reshape(rows, seq_len)


def _position_keys(rows: int, seq_len: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """[rows, seq_len] random sort keys, and how many low bits hold the position: random high bits above the
    position, so no two keys of a row tie, integers sort fast, and the position comes back from the low bits."""
    pos_bits = max(1, (seq_len - 1).bit_length())
    dtype, raw_bits = (np.int32, 32) if pos_bits <= 16 else (np.int64, 64)
    count = rows * seq_len
    raw = rng.bit_generator.random_raw(-(-count * raw_bits // 64)).view(f"u{raw_bits // 8}")[:count]
    keys = (raw >> (pos_bits + 1)).astype(dtype).reshape(rows, seq_len) << pos_bits
    keys |= np.arange(seq_len, dtype=dtype)
    return keys, pos_bits
