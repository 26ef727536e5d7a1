"""Masking at load time for shards written without masked_lm_* fields (dynamic masking).

BERT's recipe: of the real, non-special tokens, a fraction `masked_lm_prob` (at most
`max_predictions`, at least one) becomes a target; a target is replaced by [MASK] 80% of the time,
by a random token 10%, and kept 10%. The draw depends only on the generator, so a batch masked at a
given data position is masked the same way after a resume.
"""

from __future__ import annotations

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

    def __call__(self, input_ids: np.ndarray, input_mask: np.ndarray, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray]:
        """(masked input ids, labels with IGNORE_INDEX where there is no target)."""
        rows, seq_len = input_ids.shape
        candidate = (input_mask != 0) & ~np.isin(input_ids, self.special_ids, kind="table")
        cap = self.max_predictions or max(1, round(seq_len * self.masked_lm_prob))
        want = np.clip(np.rint(candidate.sum(1) * self.masked_lm_prob), 1, cap).astype(np.int64)
        # Rank the candidates of each row in a random order and keep the first `want`: the scores up to
        # the want-th smallest (a row without candidates has only inf scores and keeps none).
        scores = np.where(candidate, rng.random((rows, seq_len)), np.inf)
        kth = np.take_along_axis(np.sort(scores, axis=1), np.minimum(want, seq_len)[:, None] - 1, axis=1)
        target = candidate & (scores <= kth)

        labels = np.where(target, input_ids, IGNORE_INDEX).astype(np.int64)
        action = rng.random((rows, seq_len))
        masked = input_ids.astype(np.int64, copy=True)
        masked[target & (action < 0.8)] = self.mask_id
        randomise = target & (action >= 0.8) & (action < 0.9)
        masked[randomise] = rng.integers(0, self.vocab_size, int(randomise.sum()))
        return masked, labels

