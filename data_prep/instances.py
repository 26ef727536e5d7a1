"""Pretraining instances with the semantics of NVIDIA's ``create_pretraining_data.py``.

Per document and per dupe: a target length of ``max_seq_length - 3`` tokens (a random shorter one
with probability ``short_seq_prob``); sentences gathered into chunks of about that length; each
chunk split at a random sentence into A and B; with probability 0.5 (always for a one-sentence
chunk) B is replaced by sentences from a random other document and the unused sentences of the
chunk are put back; the pair is trimmed one token at a time from a random end of the longer side;
``[CLS] A [SEP] B [SEP]``; then static masking of ``masked_lm_prob`` of the tokens (at most
``max_predictions_per_seq``, at least one): 80% ``[MASK]``, 10% a random vocabulary id, 10% kept.

Whole-word masking (``whole_word_masking``, as Google's and NVIDIA's later releases): a WordPiece
piece that starts with ``##`` belongs to the word before it; words are drawn in a random order and
taken whole while they fit the row's prediction budget (one that does not fit is passed over), and
each of a taken word's pieces gets its own 80/10/10 draw.

MLM-only (``nsp=False``, RoBERTa's "full sentences"): consecutive sentences are packed up to
``max_seq_length - 2`` tokens, across document boundaries with ``[SEP]`` between documents:
``[CLS] s1 s2 ... [SEP] t1 t2 ... [SEP]``, one segment, no next-sentence label. A sentence longer
than the whole sequence is cut at its end.

Differences, by design: the random next document is drawn from the documents of the same batch
(not the whole corpus), which is what keeps the work parallel and memory bounded; and random draws
come from a NumPy ``Generator`` per batch, so the same seed gives the same instances for any
number of workers. The chunking walk is scalar Python over sentence lengths only; everything on
tokens (assembly, trimming, masking) is vectorised over the whole batch.
"""

from __future__ import annotations

import functools
import itertools
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # segment imports blingfire, which only the workers need
    from data_prep.segment import TokenizedBatch


@dataclass(frozen=True)
class InstanceConfig:
    max_seq_length: int
    max_predictions_per_seq: int
    short_seq_prob: float
    masked_lm_prob: float
    dupe_factor: int
    dynamic_masking: bool
    vocab_size: int
    cls_id: int
    sep_id: int
    mask_id: int
    nsp: bool = True  # False: packed full sentences, no next_sentence_labels
    # Whole-word masking: per token id, whether the piece continues a word ("##..."); None: mask pieces.
    continuation: np.ndarray | None = None


@dataclass(frozen=True)
class Instances:
    """A batch of instances in compact form; shards expand ``input_mask`` and ``segment_ids``."""

    input_ids: np.ndarray  # [n, seq] int32, padded with 0
    lengths: np.ndarray  # [n] real tokens: len(A) + len(B) + 3
    b_starts: np.ndarray  # [n] position of B's first token: len(A) + 2
    next_sentence_labels: np.ndarray | None  # [n] int8, 1 = random next; None when MLM-only
    masked_lm_positions: np.ndarray | None  # [n, pred] int32, padded with 0
    masked_lm_ids: np.ndarray | None  # [n, pred] int32, padded with 0

    def __len__(self) -> int:
        return len(self.lengths)


def _uniform_stream(rng: np.random.Generator) -> Callable[[], float]:
    """Scalar uniforms from ``rng``, drawn 64k at a time: the per-draw cost is a C-level ``next``."""

    def blocks() -> Iterator[list[float]]:
        while True:
            yield rng.random(65536).tolist()

    return functools.partial(next, itertools.chain.from_iterable(blocks()))


def create_instances(batch: TokenizedBatch, cfg: InstanceConfig, rng: np.random.Generator) -> Instances:
    labels: np.ndarray | None = None
    if cfg.nsp:
        pairs = _plan_pairs(batch, cfg, _uniform_stream(rng))
        a_lo, a_len, b_lo, b_len, labels = _truncate(pairs, cfg.max_seq_length - 3, rng)
        input_ids, lengths, b_starts = _assemble(batch.tokens, a_lo, a_len, b_lo, b_len, cfg)
    else:
        input_ids, lengths = _packed_full_sentences(batch, cfg, _uniform_stream(rng))
        b_starts = lengths  # one segment: segment_ids are all 0
    positions = masked_ids = None
    if not cfg.dynamic_masking:
        if cfg.nsp and cfg.continuation is None:
            positions, masked_ids = _mask(input_ids, lengths, b_starts, cfg, rng)
        else:
            positions, masked_ids = _mask_words(input_ids, lengths, cfg, rng)
    return Instances(input_ids, lengths, b_starts, labels, positions, masked_ids)


def continuation_table(tokens: list[str]) -> np.ndarray:
    """Per id of a WordPiece vocabulary (tokens in id order): True for pieces that continue a word (##...)."""
    return np.fromiter((t.startswith("##") for t in tokens), dtype=bool, count=len(tokens))


def _packed_full_sentences(
    batch: TokenizedBatch, cfg: InstanceConfig, uniform: Callable[[], float]
) -> tuple[np.ndarray, np.ndarray]:
    """RoBERTa's full sentences: (input ids [n, seq] int32 padded with 0, lengths [n]) for each dupe.

    The walk runs over a stream of the batch's tokens with one [SEP] after every document, in which
    sentence i spans [start[i], end[i]); a sequence of sentences a..b costs end[b] - start[a] tokens,
    the [SEP]s between its documents included, so the longest one that fits is one bisect.
    """
    sent = batch.sentence_offsets
    doc_of_sentence = np.repeat(np.arange(batch.num_documents), np.diff(batch.document_offsets))
    start = (sent[:-1] + doc_of_sentence).tolist()
    end = (sent[1:] + doc_of_sentence).tolist()
    doc_ends = sent[batch.document_offsets[1:]]
    stream = np.insert(batch.tokens, doc_ends, cfg.sep_id)
    max_tokens = cfg.max_seq_length - 2
    short_prob = cfg.short_seq_prob
    los: list[int] = []
    his: list[int] = []
    for _ in range(cfg.dupe_factor):
        first, count = 0, len(start)
        while first < count:
            target = max_tokens
            if uniform() < short_prob:
                target = 2 + int(uniform() * (max_tokens - 1))
            # The last sentence that still fits; at least one sentence (cut to the target below).
            last = max(first, bisect_right(end, start[first] + target, first, count) - 1)
            los.append(start[first])
            his.append(min(end[last], start[first] + max_tokens))
            first = last + 1
    lo = np.array(los, dtype=np.int64)
    length = np.array(his, dtype=np.int64) - lo
    n, seq = len(lo), cfg.max_seq_length
    ids = np.zeros((n, seq), dtype=np.int32)
    flat = ids.reshape(-1)
    row_starts = np.arange(n, dtype=np.int64) * seq
    run_starts = np.cumsum(length) - length
    dest = np.arange(int(length.sum()), dtype=np.int64) - np.repeat(run_starts - row_starts - 1, length)
    flat[dest] = stream[dest + np.repeat(lo - row_starts - 1, length)]
    ids[:, 0] = cfg.cls_id
    flat[row_starts + length + 1] = cfg.sep_id
    return ids, length + 2


def _plan_pairs(batch: TokenizedBatch, cfg: InstanceConfig, uniform: Callable[[], float]) -> np.ndarray:
    """[n, 5] int64: A start, A end, B start, B end (token offsets into batch.tokens), label."""
    sent = batch.sentence_offsets.tolist()
    docs = batch.document_offsets.tolist()
    num_docs = batch.num_documents
    max_tokens = cfg.max_seq_length - 3
    short_prob = cfg.short_seq_prob
    out: list[tuple[int, int, int, int, int]] = []
    for _ in range(cfg.dupe_factor):
        for d in range(num_docs):
            first, last = docs[d], docs[d + 1]
            target = max_tokens
            if uniform() < short_prob:
                target = 2 + int(uniform() * (max_tokens - 1))
            chunk_first = first
            while chunk_first < last:
                # The chunk ends at the first sentence that brings it to `target` tokens, or at the
                # document's end: NVIDIA's sentence-by-sentence walk, done with one bisect.
                i = bisect_left(sent, sent[chunk_first] + target, chunk_first + 1, last) - 1
                size = i - chunk_first + 1
                a_end = chunk_first + (1 if size < 2 else 1 + int(uniform() * (size - 1)))
                a_lo, a_hi = sent[chunk_first], sent[a_end]
                if size == 1 or uniform() < 0.5:
                    other = d
                    for _ in range(10):
                        other = int(uniform() * num_docs)
                        if other != d:
                            break
                    o_first, o_last = docs[other], docs[other + 1]
                    j = o_first + int(uniform() * (o_last - o_first))
                    b_lo = sent[j]
                    target_b = target - (a_hi - a_lo)
                    j = bisect_left(sent, b_lo + target_b, j + 1, o_last) - 1
                    out.append((a_lo, a_hi, b_lo, sent[j + 1], 1))
                    # The chunk's sentences after A were not used: the next chunk starts there.
                    chunk_first = a_end
                else:
                    out.append((a_lo, a_hi, a_hi, sent[i + 1], 0))
                    chunk_first = i + 1
    if not out:
        return np.zeros((0, 5), dtype=np.int64)
    return np.array(out, dtype=np.int64)


def _truncate(
    pairs: np.ndarray, max_tokens: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """NVIDIA's truncate_seq_pair in closed form.

    It removes one token at a time from the longer side (B on ties) until the pair fits, each from
    the front or the back with equal chance. Which side loses how many tokens depends only on the
    lengths; the front/back split of each side's losses is then Binomial(losses, 0.5).
    """
    a_lo, a_hi, b_lo, b_hi, labels = pairs.T
    la, lb = a_hi - a_lo, b_hi - b_lo
    excess = np.maximum(la + lb - max_tokens, 0)
    cut_a = np.where(la > lb, np.minimum(excess, la - lb), 0)
    excess = excess - cut_a
    new_la = la - cut_a
    cut_b = np.where(lb > new_la, np.minimum(excess, lb - new_la), 0)
    excess = excess - cut_b
    # Sides are now equal; removal alternates, starting with B.
    cut_b = cut_b + (excess + 1) // 2
    cut_a = cut_a + excess // 2
    front_a = rng.binomial(cut_a, 0.5)
    front_b = rng.binomial(cut_b, 0.5)
    return a_lo + front_a, la - cut_a, b_lo + front_b, lb - cut_b, labels.astype(np.int8)


def _assemble(
    tokens: np.ndarray,
    a_lo: np.ndarray,
    a_len: np.ndarray,
    b_lo: np.ndarray,
    b_len: np.ndarray,
    cfg: InstanceConfig,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n, seq = len(a_lo), cfg.max_seq_length
    ids = np.zeros((n, seq), dtype=np.int32)
    flat = ids.reshape(-1)
    row_starts = np.arange(n, dtype=np.int64) * seq
    # Copy A to positions 1.. and B to positions len(A) + 2.. with one flat gather each: every
    # destination index, and the constant (source - destination) of its run.
    for lo, length, first in ((a_lo, a_len, row_starts + 1), (b_lo, b_len, row_starts + a_len + 2)):
        run_starts = np.cumsum(length) - length
        dest = np.arange(int(length.sum()), dtype=np.int64) - np.repeat(run_starts - first, length)
        flat[dest] = tokens[dest + np.repeat(lo - first, length)]
    ids[:, 0] = cfg.cls_id
    flat[row_starts + a_len + 1] = cfg.sep_id
    flat[row_starts + a_len + b_len + 2] = cfg.sep_id
    return ids, a_len + b_len + 3, a_len + 2


def _mask(
    ids: np.ndarray, lengths: np.ndarray, b_starts: np.ndarray, cfg: InstanceConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Mask ``ids`` in place; returns masked_lm_positions and masked_lm_ids (0-padded, by position)."""
    n = len(ids)
    pred = cfg.max_predictions_per_seq
    # Candidates are every token but [CLS] and the two [SEP]s: number them 0..candidates-1.
    candidates = lengths - 3
    # NVIDIA: min(max_predictions, max(1, round(len(tokens) * masked_lm_prob))), round half to even.
    count = np.minimum(pred, np.maximum(1, np.round(lengths * cfg.masked_lm_prob).astype(np.int64)))
    count = np.minimum(count, candidates)
    chosen = _random_subsets(candidates, count, pred, rng)
    valid = chosen < candidates[:, None]
    # Candidate c sits at position c + 1 in A, or c + 2 once past A's [SEP].
    a_len = (b_starts - 2)[:, None]
    positions = np.where(valid, np.where(chosen < a_len, chosen + 1, chosen + 2), 0)
    rows = np.broadcast_to(np.arange(n)[:, None], positions.shape)
    original = np.where(valid, ids[rows, positions], 0)
    roll = rng.random((n, pred))
    random_ids = rng.integers(0, cfg.vocab_size, size=(n, pred))
    replacement = np.where(roll < 0.8, cfg.mask_id, np.where(roll < 0.9, original, random_ids))
    ids[rows[valid], positions[valid]] = replacement[valid]
    return positions.astype(np.int32), original.astype(np.int32)


def _random_subsets(population: np.ndarray, count: np.ndarray, width: int, rng: np.random.Generator) -> np.ndarray:
    """Per row, ``count`` distinct values drawn uniformly from range(population), sorted ascending;
    the rest of the ``width`` columns hold ``population`` (out of range).

    Floyd's algorithm, vectorised over rows: ``width`` small steps instead of sorting a random key
    per token, which is what NVIDIA's shuffle-and-take-the-first-k amounts to.
    """
    n = len(population)
    # Column-major work arrays: each step reads and writes one contiguous row of length n.
    chosen = np.empty((width, n), dtype=np.int64)
    draws = rng.random((width, n))
    start = population - count
    for step in range(width):
        # Floyd: for j = population - count + step, pick t in [0, j]; if taken already, take j.
        j = start + step
        t = (draws[step] * (j + 1)).astype(np.int64)
        taken = (chosen[:step] == t).any(axis=0) if step else np.zeros(n, dtype=bool)
        chosen[step] = np.where(step < count, np.where(taken, j, t), population)
    return np.sort(chosen.T, axis=1)


def _mask_words(
    ids: np.ndarray, lengths: np.ndarray, cfg: InstanceConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Mask ``ids`` in place, whole words when ``cfg.continuation`` is set, pieces otherwise; returns
    masked_lm_positions and masked_lm_ids (0-padded, by position). Any layout: every token but [CLS]
    and [SEP] is a candidate.

    Google's loop, vectorised over rows: words in a random order, each taken when it fits what is
    left of the row's budget ``min(max_predictions, max(1, round(length * masked_lm_prob)))``.
    """
    n, seq = ids.shape
    pred = cfg.max_predictions_per_seq
    candidate = (np.arange(seq)[None, :] < lengths[:, None]) & (ids != cfg.cls_id) & (ids != cfg.sep_id)
    start = candidate
    if cfg.continuation is not None:
        # A ## piece continues the word before it, if that position is a candidate at all.
        previous = np.zeros_like(candidate)
        previous[:, 1:] = candidate[:, :-1]
        start = candidate & ~(cfg.continuation.take(ids, mode="clip") & previous)
    count = np.minimum(pred, np.maximum(1, np.round(lengths * cfg.masked_lm_prob).astype(np.int64)))
    count = np.minimum(count, candidate.sum(axis=1))
    chosen_words = _choose_words(candidate, start, count, rng)
    masked = chosen_words & candidate
    rows, cols = np.nonzero(masked)  # row-major: each row's positions ascending
    per_row = masked.sum(axis=1)
    slots = np.arange(len(rows)) - np.repeat(np.cumsum(per_row) - per_row, per_row)
    positions = np.zeros((n, pred), dtype=np.int32)
    masked_ids = np.zeros((n, pred), dtype=np.int32)
    original = ids[rows, cols]
    roll = rng.random(len(rows))
    random_ids = rng.integers(0, cfg.vocab_size, size=len(rows))
    ids[rows, cols] = np.where(roll < 0.8, cfg.mask_id, np.where(roll < 0.9, original, random_ids))
    positions[rows, slots] = cols
    masked_ids[rows, slots] = original
    return positions, masked_ids


def _choose_words(candidate: np.ndarray, start: np.ndarray, budget: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[n, seq] bool: the positions of the chosen words (a word is a start and the candidates after it up
    to the next start). Per row, words in a random order, each taken whole if it fits the rest of ``budget``."""
    n, seq = candidate.shape
    flat_start = start.reshape(-1)
    word_of = np.cumsum(flat_start) - 1  # word index of every position (of the word before, for non-candidates)
    flat_candidate = candidate.reshape(-1)
    word_length = np.bincount(word_of[flat_candidate], minlength=int(flat_start.sum()))
    length_at = np.zeros(n * seq, dtype=np.int64)
    length_at[flat_start] = word_length
    # Words in a random order: random high bits above the position make keys that never tie and sort as
    # integers; the position comes back from the low bits. Non-starts sort after every word.
    pos_bits = max(1, (seq - 1).bit_length())
    dtype, raw_bits = (np.int32, 32) if pos_bits <= 16 else (np.int64, 64)
    raw = rng.bit_generator.random_raw(-(-n * seq * raw_bits // 64)).view(f"u{raw_bits // 8}")[: n * seq]
    keys = (raw >> (pos_bits + 1)).astype(dtype).reshape(n, seq) << pos_bits
    keys |= np.arange(seq, dtype=dtype)
    keys[~start] = np.iinfo(dtype).max
    order = (np.sort(keys, axis=1) & ((1 << pos_bits) - 1)).astype(np.int64)
    sorted_length = np.take_along_axis(length_at.reshape(n, seq), order, axis=1)
    words = start.sum(axis=1)
    taken = np.zeros(n, dtype=np.int64)
    chosen_sorted = np.zeros((n, seq), dtype=bool)
    for column in range(int(words.max(initial=0))):
        active = (taken < budget) & (column < words)
        if not active.any():
            break
        fits = active & (taken + sorted_length[:, column] <= budget)
        chosen_sorted[:, column] = fits
        taken += np.where(fits, sorted_length[:, column], 0)
    chosen_start = np.zeros((n, seq), dtype=bool)
    row, column = np.nonzero(chosen_sorted)
    chosen_start[row, order[row, column]] = True
    chosen_word = chosen_start.reshape(-1)[flat_start]
    return (flat_candidate & chosen_word[np.maximum(word_of, 0)]).reshape(n, seq)
