"""Per-rank batches from a folder of shards, with an exact, resumable position.

One epoch is a stream of samples: shards in an order shuffled by (seed, epoch), the samples of each
shard shuffled by (seed, epoch, shard). Each optimizer micro-step takes the next world_size x
micro_batch samples of the stream and rank r keeps slice r, so every rank runs the same number of
steps, no sample is seen twice in an epoch, and the position is one integer (plus the epoch).

Memory: a rank reads, from each shard it reaches, only the rows it will use from that shard this
epoch (about 1/world_size of them), with sequential reads (shards.read_rows), and holds at most
two shards' worth of them. A background thread prepares the next ``prefetch`` batches while the
caller trains; the position (state_dict) is always that of the last batch handed to the caller.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from pld_ds.data import schema, shards
from pld_ds.data.masking import DynamicMasking

Position = tuple[int, int]  # (epoch, batch in epoch)
Batch = dict[str, torch.Tensor]


class _RankRows:
    """The rows of one shard that one rank uses in one epoch, in stream order."""

    def __init__(self, stream: np.ndarray, data: dict[str, np.ndarray]) -> None:
        self.stream, self.data = stream, data

    def take(self, lo: int, hi: int) -> dict[str, np.ndarray]:
        a, b = np.searchsorted(self.stream, [lo, hi])
        return {k: v[a:b] for k, v in self.data.items()}


class _Reader:
    """Builds batches for one iteration; owns its cache, so iterations (and threads) share nothing."""

    def __init__(self, loader: ShardBatches) -> None:
        self.loader = loader
        self.orders: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.cache: dict[tuple[int, int], _RankRows] = {}

    def order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if epoch not in self.orders:
            self.orders = {epoch: self.loader._epoch_order(epoch)}
        return self.orders[epoch]

    def rank_rows(self, epoch: int, pos: int) -> _RankRows:
        key = (epoch, pos)
        if key not in self.cache:
            if len(self.cache) >= 2:  # a batch spans two shards unless they are tiny
                self.cache.pop(next(iter(self.cache)))
            self.cache[key] = self.loader._read_rank_rows(epoch, pos, self.order(epoch))
        return self.cache[key]

    def batch(self, epoch: int, batch: int) -> Batch:
        ld = self.loader
        _, starts = self.order(epoch)
        first = batch * ld.global_batch + ld.rank * ld.micro_batch
        last = first + ld.micro_batch
        # Batches come in stream order: rows before this batch are done with, free them before reading more.
        for key in [k for k, rows in self.cache.items() if k[0] != epoch or not rows.stream.size
                    or rows.stream[-1] < first]:
            del self.cache[key]
        parts = []
        for pos in range(int(np.searchsorted(starts, first, side="right")) - 1,
                         int(np.searchsorted(starts, last - 1, side="right"))):
            parts.append(self.rank_rows(epoch, pos).take(first, last))
        # Dynamic masking draws from (seed, epoch, batch, rank): a resumed run masks identically.
        return ld._collate(parts, lambda: np.random.default_rng([ld.seed, epoch, batch, ld.rank]))


def _long(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array.astype(np.int64))  # always a copy: a batch never aliases cached rows


_DONE = object()


class _Prefetch:
    """make(position) for each position in order, on a daemon thread, at most ``depth`` ahead."""

    def __init__(self, make: Callable[[int, int], Batch], positions: Iterable[Position], depth: int) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(make, positions), daemon=True,
                                        name="ShardBatches-prefetch")
        self._thread.start()

    def _run(self, make: Callable[[int, int], Batch], positions: Iterable[Position]) -> None:
        try:
            for position in positions:
                if self._stop.is_set() or not self._put((position, make(*position))):
                    return
        except BaseException as err:  # handed to the consumer, raised there at this position
            self._put(err)
            return
        self._put(_DONE)

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def __iter__(self) -> Iterator[tuple[Position, Batch]]:
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        """Stop the thread; it finishes the batch in hand (and reads nothing more) before this returns."""
        self._stop.set()
        with contextlib.suppress(queue.Empty):
            while True:  # unblock a put in progress
                self._queue.get_nowait()
        self._thread.join()


class ShardBatches:
    def __init__(
        self,
        paths: list[Path],
        micro_batch: int,
        vocab_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        seq_len: int | None = None,
        masking: DynamicMasking | None = None,
        prefetch: int = 2,
        skip_bad_shards: bool = False,
    ) -> None:
        """``prefetch``: batches prepared ahead on a background thread (0: none). ``skip_bad_shards``: leave
        out shards that fail inspection (listed in ``skipped``) instead of raising the first error."""
        infos, self.skipped = shards.inspect_paths(paths, skip_bad_shards)
        self.infos = shards.check_seq_len(infos, seq_len)
        unmasked = next((info for info in self.infos if not info.static_masking), None)
        if unmasked is not None and masking is None:
            raise shards.ShardError(f"{unmasked.path}: a dynamic-masking shard (no masked_lm_* datasets) needs the "
                                    "vocabulary's [MASK] id: expected a vocab file named in manifest.json")
        self.masking = masking
        self.seq_len = self.infos[0].seq_len
        self.vocab_size = vocab_size
        self.micro_batch, self.rank, self.world_size, self.seed = micro_batch, rank, world_size, seed
        self.prefetch = prefetch
        counts = np.array([info.num_samples for info in self.infos])
        self.global_batch = micro_batch * world_size
        self.batches_per_epoch = int(counts.sum()) // self.global_batch
        if self.batches_per_epoch == 0:
            raise shards.ShardError(f"{paths[0].parent}: {counts.sum()} samples, fewer than one global batch "
                                    f"of {self.global_batch} (micro batch {micro_batch} x {world_size} ranks)")
        self.epoch, self.batch_in_epoch = 0, 0

    # -- position -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "seed": self.seed,
                "global_batch": self.global_batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise shards.ShardError(f"checkpoint data position was saved with data seed {state['seed']}, this run "
                                    f"has seed {self.seed}: resume with --seed {state['seed']} to continue that order")
        if state.get("global_batch", self.global_batch) != self.global_batch:
            raise shards.ShardError(f"checkpoint data position was saved with global batch {state['global_batch']}, "
                                    f"this run has {self.global_batch}: the position cannot be resumed exactly")
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])

    # -- order ----------------------------------------------------------------------------------
    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard order, first stream index of each shard in that order, plus the total)."""
        rng = np.random.default_rng([self.seed, epoch])
        shard_order = rng.permutation(len(self.infos))
        starts = np.cumsum([0] + [self.infos[i].num_samples for i in shard_order])
        return shard_order, starts

    def _read_rank_rows(self, epoch: int, pos: int, order: tuple[np.ndarray, np.ndarray]) -> _RankRows:
        """The rows of the pos-th shard of the epoch that land in this rank's slices of full global batches."""
        shard_order, starts = order
        index = int(shard_order[pos])
        lo, hi = int(starts[pos]), min(int(starts[pos + 1]), self.batches_per_epoch * self.global_batch)
        stream = np.arange(lo, max(lo, hi))
        stream = stream[(stream % self.global_batch) // self.micro_batch == self.rank]
        # The samples of each shard are shuffled by (seed, epoch, shard).
        rows = np.random.default_rng([self.seed, epoch, index]).permutation(self.infos[index].num_samples)
        return _RankRows(stream, shards.read_rows(self.infos[index], rows[stream - lo], self.vocab_size))

    def _collate(self, parts: list[dict[str, np.ndarray]], rng: Callable[[], np.random.Generator]) -> Batch:
        cat = {k: np.concatenate([p[k] for p in parts]) if len(parts) > 1 else parts[0][k] for k in parts[0]}
        input_ids = cat[schema.INPUT_IDS.name]
        if schema.MASKED_LM_POSITIONS.name not in cat:
            input_ids, labels = self.masking(input_ids, cat[schema.INPUT_MASK.name], rng())
        else:
            positions, ids = cat[schema.MASKED_LM_POSITIONS.name], cat[schema.MASKED_LM_IDS.name]
            labels = np.full(input_ids.shape, schema.IGNORE_INDEX, dtype=np.int64)
            # Position 0 is [CLS] and never masked: NVIDIA pads unused prediction slots with 0.
            rows, slots = np.nonzero(positions > 0)
            labels[rows, positions[rows, slots]] = ids[rows, slots]
        return {
            "input_ids": _long(input_ids),
            "token_type_ids": _long(cat[schema.SEGMENT_IDS.name]),
            "attention_mask": _long(cat[schema.INPUT_MASK.name]),
            "masked_lm_labels": _long(labels),
            "next_sentence_labels": _long(cat[schema.NEXT_SENTENCE_LABELS.name]),
        }

    # -- iteration ------------------------------------------------------------------------------
    def _stream(self, positions: Iterable[Position]) -> Iterator[tuple[Position, Batch]]:
        reader = _Reader(self)
        if self.prefetch <= 0:
            for position in positions:
                yield position, reader.batch(*position)
            return
        ahead = _Prefetch(reader.batch, positions, self.prefetch)
        try:
            yield from ahead
        finally:
            ahead.close()

    def _positions_from(self, epoch: int, batch: int) -> Iterator[Position]:
        while True:
            while batch < self.batches_per_epoch:
                yield epoch, batch
                batch += 1
            epoch, batch = epoch + 1, 0

    def __iter__(self) -> Iterator[Batch]:
        """Endless: continues from the current position, epoch after epoch."""
        while True:
            stream = self._stream(self._positions_from(self.epoch, self.batch_in_epoch))
            try:
                for (epoch, batch), data in stream:
                    self.epoch, self.batch_in_epoch = epoch, batch + 1
                    yield data
                    if (self.epoch, self.batch_in_epoch) != (epoch, batch + 1):
                        break  # load_state_dict moved the position: prepare from there
            finally:
                stream.close()

    def one_pass(self) -> Iterator[Batch]:
        """Every full global batch of epoch 0 once, in order (for evaluation); leaves the position alone."""
        stream = self._stream((0, batch) for batch in range(self.batches_per_epoch))
        try:
            for _, data in stream:
                yield data
        finally:
            stream.close()
