"""Per-rank batches from a folder of shards, with an exact, resumable position.

One epoch is a stream of samples: shards in an order shuffled by (seed, epoch), the samples of each
shard shuffled by (seed, epoch, shard), in windows of at most SHUFFLE_WINDOW_BYTES when the shard
is larger. Each optimizer micro-step takes the next world_size x micro_batch samples of the stream
and rank r keeps slice r, so every rank runs the same number of steps, no sample is seen twice in an
epoch, and the position is one integer (plus the epoch).

Memory: a rank reads one shuffle window at a time, with sequential reads (shards.read_rows), keeps
only the rows it will use (about 1/world_size of them) and holds at most two windows' worth: a
shard need not fit in memory. A background thread prepares the next ``prefetch`` batches while the
caller trains, or ``workers`` DataLoader processes build alternate batches, each reading only the
rows of its own batches. The position (state_dict) is always that of the last batch handed to the
caller.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import queue
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from pld_ds.data import schema, shards
from pld_ds.data.masking import DynamicMasking

Position = tuple[int, int]  # (epoch, batch in epoch)
Batch = dict[str, torch.Tensor]


# A shard is shuffled in windows of whole read slabs holding about this many bytes of input_ids:
# memory is bounded by the window, not the shard. A shard that fits in one window is shuffled whole.
SHUFFLE_WINDOW_BYTES = 32 << 20


class _ShardLayout:
    """The order of one shard's samples in one epoch, in windows that are read one at a time.

    The shard's rows are cut into blocks of `slab` rows (the slabs read_rows reads); the blocks are
    put in a random order by (seed, epoch, shard) and grouped into windows of `per_window` blocks;
    the rows of window j are shuffled by (seed, epoch, shard, j). With a single window this is one
    permutation of the shard by (seed, epoch, shard).
    """

    def __init__(self, num_samples: int, slab: int, per_window: int, key: tuple[int, int, int]) -> None:
        self.num_samples, self.slab, self.key = num_samples, slab, key
        blocks = -(-num_samples // slab)
        self.single = blocks <= per_window
        order = np.arange(blocks) if self.single else np.random.default_rng(list(key)).permutation(blocks)
        self.windows = [order[i:i + per_window] for i in range(0, blocks, per_window)]
        sizes = [sum(min(slab, num_samples - b * slab) for b in window) for window in self.windows]
        self.offsets = np.cumsum([0, *sizes])  # first sample of each window in the shard's stream

    def rows(self, j: int) -> np.ndarray:
        if self.single:
            return np.random.default_rng(list(self.key)).permutation(self.num_samples)
        rows = np.concatenate([np.arange(b * self.slab, min((b + 1) * self.slab, self.num_samples))
                               for b in self.windows[j]])
        return rows[np.random.default_rng([*self.key, j]).permutation(len(rows))]


class _RankRows:
    """The rows of one window that one reader uses, with their stream positions, in stream order."""

    def __init__(self, stream: np.ndarray, data: dict[str, np.ndarray]) -> None:
        self.stream, self.data = stream, data

    def take(self, lo: int, hi: int) -> dict[str, np.ndarray]:
        a, b = np.searchsorted(self.stream, [lo, hi])
        return {k: v[a:b] for k, v in self.data.items()}


class _Reader:
    """Builds batches for one iteration; owns its cache, so iterations (threads, workers) share nothing.

    Reader `worker` of `workers` builds every workers-th batch from position `start` on (worker 0
    the first), and reads only their rows."""

    def __init__(self, loader: ShardBatches, worker: int = 0, workers: int = 1, start: Position = (0, 0)) -> None:
        self.loader, self.worker, self.workers = loader, worker, workers
        self.first = start[0] * loader.batches_per_epoch + start[1]  # running index of the start position
        self.orders: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.layouts: dict[tuple[int, int], _ShardLayout] = {}
        self.cache: dict[tuple[int, int, int], _RankRows] = {}

    def order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if epoch not in self.orders:
            self.orders = {epoch: self.loader._epoch_order(epoch)}
            self.layouts = {}
        return self.orders[epoch]

    def layout(self, epoch: int, pos: int) -> _ShardLayout:
        if (epoch, pos) not in self.layouts:
            index = int(self.order(epoch)[0][pos])
            self.layouts[epoch, pos] = self.loader._shard_layout(epoch, index)
        return self.layouts[epoch, pos]

    def window_rows(self, epoch: int, pos: int, j: int) -> _RankRows:
        key = (epoch, pos, j)
        if key not in self.cache:
            if len(self.cache) >= 2:  # a batch spans two windows unless they are tiny
                self.cache.pop(next(iter(self.cache)))
            self.cache[key] = self.read_window(epoch, pos, j)
        return self.cache[key]

    def read_window(self, epoch: int, pos: int, j: int) -> _RankRows:
        """The rows of window j of the pos-th shard of the epoch that land in this reader's batches."""
        ld = self.loader
        shard_order, starts = self.order(epoch)
        layout = self.layout(epoch, pos)
        lo = int(starts[pos] + layout.offsets[j])
        hi = min(int(starts[pos] + layout.offsets[j + 1]), ld.batches_per_epoch * ld.global_batch)
        stream = np.arange(lo, max(lo, hi))
        mine = (stream % ld.global_batch) // ld.micro_batch == ld.rank
        if self.workers > 1:
            running = epoch * ld.batches_per_epoch + stream // ld.global_batch
            mine &= (running - self.first) % self.workers == self.worker
        rows = ld._window_order(layout, j, int(shard_order[pos]), lo)[: len(stream)][mine]
        return _RankRows(stream[mine], shards.read_rows(ld.infos[int(shard_order[pos])], rows, ld.vocab_size))

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
            offsets = self.layout(epoch, pos).offsets
            lo, hi = max(first, starts[pos]) - starts[pos], min(last, starts[pos + 1]) - starts[pos]
            for j in range(int(np.searchsorted(offsets, lo, side="right")) - 1,
                           int(np.searchsorted(offsets, hi - 1, side="right"))):
                parts.append(self.window_rows(epoch, pos, j).take(first, last))
        # Dynamic masking draws from (seed, epoch, batch, rank): a resumed run masks identically.
        return ld._collate(parts, lambda: np.random.default_rng([ld.seed, epoch, batch, ld.rank]))


def _long(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array.astype(np.int64))  # always a copy: a batch never aliases cached rows


_DONE = object()


class _Prefetch:
    """make(position) for each position in order, on a daemon thread, at most ``depth`` ahead.

    A stream nobody closed (a generator still referenced, or in a reference cycle, when the program ends) is
    closed at exit, before the interpreter finalizes: a daemon thread still inside h5py or torch then would be
    unwound out of C++ code, and the process would abort ("terminate called without an active exception")
    after a run that had finished and saved everything."""

    _live: weakref.WeakSet[_Prefetch] = weakref.WeakSet()

    def __init__(self, make: Callable[[int, int], Batch], positions: Iterable[Position], depth: int) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(make, positions), daemon=True,
                                        name="ShardBatches-prefetch")
        self._live.add(self)
        self._thread.start()

    @classmethod
    def close_all(cls) -> None:
        for ahead in list(cls._live):
            ahead.close()

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
        self._live.discard(self)


atexit.register(_Prefetch.close_all)


def _batch_lengths(buckets: Sequence[int] | None, seq_len: int, where: Path) -> tuple[int, ...]:
    """The lengths a binned batch may be cut to, ascending, ending with seq_len."""
    if buckets is None:
        return (*range(8, seq_len, 8), seq_len)
    bad = [b for b in buckets if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or not 1 <= b <= seq_len]
    if bad or not buckets:
        raise shards.ShardError(f"{where.parent}: length buckets: expected lengths from 1 to the shards' sequence "
                                f"length {seq_len}, got {list(buckets)!r}")
    return tuple(sorted({int(b) for b in buckets} | {seq_len}))


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
        nsp: bool | None = None,
        masking: DynamicMasking | None = None,
        prefetch: int = 2,
        skip_bad_shards: bool = False,
        workers: int = 0,
        bin_by_length: bool = False,
        length_buckets: Sequence[int] | None = None,
        remask: bool = False,
    ) -> None:
        """``prefetch``: batches prepared ahead on a background thread (0: none), or per worker.
        ``workers``: worker processes (torch DataLoader workers) that build every workers-th batch each,
        reading only those batches' rows (0: build them in this process). ``skip_bad_shards``: leave out
        shards that fail inspection (listed in ``skipped``) instead of raising the first error.
        ``bin_by_length``: global batches of samples of similar length, each cut to its longest sample
        (rounded up to a multiple of 8), so little compute goes to padding; shapes then vary by batch.
        ``length_buckets``: with ``bin_by_length``, the lengths a batch may be cut to (each batch takes the
        smallest that holds its longest sample; the shards' sequence length is always one), so compiled
        graphs and CUDA graphs see at most len(batch_lengths) shapes; None: every multiple of 8.
        ``nsp``: whether the shards must carry next_sentence_labels (default: as the first shard); batches
        of MLM-only shards have no next_sentence_labels. ``remask``: statically masked shards are masked anew by
        ``masking`` in every batch (their original tokens restored from masked_lm_ids first), as dynamic-masking
        shards are; False: their stored masks are used."""
        infos, self.skipped = shards.inspect_paths(paths, skip_bad_shards)
        self.infos = shards.check_nsp(shards.check_seq_len(infos, seq_len), nsp)
        self.nsp = self.infos[0].nsp
        unmasked = next((info for info in self.infos if not info.static_masking), None)
        if remask and masking is None:
            raise ValueError("remask needs a masking")
        if unmasked is not None and masking is None:
            raise shards.ShardError(f"{unmasked.path}: a dynamic-masking shard (no masked_lm_* datasets) needs the "
                                    "vocabulary's [MASK] id: expected a vocab file named in manifest.json")
        self.masking, self.remask = masking, remask
        self.seq_len = self.infos[0].seq_len
        self.vocab_size = vocab_size
        self.micro_batch, self.rank, self.world_size, self.seed = micro_batch, rank, world_size, seed
        self.prefetch, self.workers, self.bin_by_length = prefetch, workers, bin_by_length
        self.batch_lengths = _batch_lengths(length_buckets, self.seq_len, self.infos[0].path)
        counts = np.array([info.num_samples for info in self.infos])
        self.global_batch = micro_batch * world_size
        self.batches_per_epoch = int(counts.sum()) // self.global_batch
        if self.batches_per_epoch == 0:
            raise shards.ShardError(f"{paths[0].parent}: {counts.sum()} samples, fewer than one global batch "
                                    f"of {self.global_batch} (micro batch {micro_batch} x {world_size} ranks)")
        self.epoch, self.batch_in_epoch = 0, 0
        self._slab_rows: dict[int, int] = {}  # per shard index, filled as shards are reached

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

    def _shard_layout(self, epoch: int, index: int) -> _ShardLayout:
        info = self.infos[index]
        if index not in self._slab_rows:
            self._slab_rows[index] = shards.slab_rows(info)
        slab = self._slab_rows[index]
        row_bytes = 4 * info.seq_len  # input_ids as int32, as NVIDIA writes them
        per_window = max(1, SHUFFLE_WINDOW_BYTES // (slab * row_bytes))
        return _ShardLayout(info.num_samples, slab, per_window, (self.seed, epoch, index))

    def _window_order(self, layout: _ShardLayout, j: int, index: int, stream_start: int) -> np.ndarray:
        """The rows of window j in stream order (the window starts at stream position stream_start).

        With ``bin_by_length`` they are sorted by length (ties in the shuffled order) and cut into
        groups on the global-batch grid of the stream; the whole groups are shuffled by (seed, epoch,
        shard, window), the partial ones (batches shared with the previous or next window) stay at
        the ends. So every global batch inside the window holds samples of similar length."""
        rows = layout.rows(j)
        if not self.bin_by_length:
            return rows
        by_length = rows[np.lexsort((np.arange(len(rows)), shards.read_lengths(self.infos[index], rows)))]
        size = self.global_batch
        head = min(len(rows), -stream_start % size)
        whole = (len(rows) - head) // size
        groups = np.random.default_rng([*layout.key, j, 1]).permutation(whole)
        middle = [by_length[head + g * size:head + (g + 1) * size] for g in groups]
        return np.concatenate([by_length[:head], *middle, by_length[head + whole * size:]])

    def _collate(self, parts: list[dict[str, np.ndarray]], rng: Callable[[], np.random.Generator]) -> Batch:
        cat = {k: np.concatenate([p[k] for p in parts]) if len(parts) > 1 else parts[0][k] for k in parts[0]}
        input_ids = cat[schema.INPUT_IDS.name]
        static = schema.MASKED_LM_POSITIONS.name in cat
        if static:
            positions, ids = cat[schema.MASKED_LM_POSITIONS.name], cat[schema.MASKED_LM_IDS.name]
            # Position 0 is [CLS] and never masked: NVIDIA pads unused prediction slots with 0.
            rows, slots = np.nonzero(positions > 0)
        if static and not self.remask:
            labels = np.full(input_ids.shape, schema.IGNORE_INDEX, dtype=np.int64)
            labels[rows, positions[rows, slots]] = ids[rows, slots]
        else:
            if static:  # the original tokens back in place of [MASK] and the random replacements
                input_ids = input_ids.copy()
                input_ids[rows, positions[rows, slots]] = ids[rows, slots]
            input_ids, labels = self.masking(input_ids, cat[schema.INPUT_MASK.name], rng())
        mask, segments = cat[schema.INPUT_MASK.name], cat[schema.SEGMENT_IDS.name]
        if self.bin_by_length:  # drop the columns that are padding in every row, up to the next bucket
            real = mask.any(0)
            longest = len(real) - int(np.argmax(real[::-1])) if real.any() else 1
            keep = self.batch_lengths[int(np.searchsorted(self.batch_lengths, longest))]
            input_ids, segments, mask, labels = (a[:, :keep] for a in (input_ids, segments, mask, labels))
        batch = {
            "input_ids": _long(input_ids),
            "token_type_ids": _long(segments),
            "attention_mask": _long(mask),
            "masked_lm_labels": _long(labels),
        }
        if self.nsp:
            batch["next_sentence_labels"] = _long(cat[schema.NEXT_SENTENCE_LABELS.name])
        return batch

    # -- iteration ------------------------------------------------------------------------------
    def _positions_from(self, epoch: int, batch: int, count: int | None = None) -> Iterator[Position]:
        """Positions in order from (epoch, batch), ``count`` of them or endlessly."""
        def endless() -> Iterator[Position]:
            e, b = epoch, batch
            while True:
                while b < self.batches_per_epoch:
                    yield e, b
                    b += 1
                e, b = e + 1, 0
        return itertools.islice(endless(), count)

    def _stream(self, start: Position, count: int | None = None) -> Iterator[tuple[Position, Batch]]:
        positions = self._positions_from(*start, count)
        if self.workers > 0:
            yield from self._worker_stream(positions, start, count)
            return
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

    def _worker_stream(self, positions: Iterator[Position], start: Position, count: int | None
                       ) -> Iterator[tuple[Position, Batch]]:
        # torch's DataLoader hands out an iterable dataset's items worker by worker, round robin, in
        # order: worker w builds batches w, w + W, ..., so the stream comes back in position order.
        batches = torch.utils.data.DataLoader(_WorkerBatches(self, start, count), batch_size=None,
                                              num_workers=self.workers, prefetch_factor=max(1, self.prefetch))
        it = iter(batches)
        try:
            for position, item in zip(positions, it, strict=True):
                if isinstance(item, _WorkerError):
                    raise item.error
                yield position, item
        finally:
            del it  # shuts the worker processes down

    def __iter__(self) -> Iterator[Batch]:
        """Endless: continues from the current position, epoch after epoch."""
        while True:
            stream = self._stream((self.epoch, self.batch_in_epoch))
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
        stream = self._stream((0, 0), self.batches_per_epoch)
        try:
            for _, data in stream:
                yield data
        finally:
            stream.close()


class _WorkerError:
    """An error raised in a worker, carried to the caller as an item (DataLoader would rewrap it with
    the worker's traceback in its message)."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


class _WorkerBatches(torch.utils.data.IterableDataset):
    def __init__(self, loader: ShardBatches, start: Position, count: int | None) -> None:
        self.loader, self.start, self.count = loader, start, count

    def __iter__(self) -> Iterator[Batch | _WorkerError]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        reader = _Reader(self.loader, worker, workers, self.start)
        positions = self.loader._positions_from(*self.start, self.count)
        for position in itertools.islice(positions, worker, None, workers):
            try:
                yield reader.batch(*position)
            except Exception as err:  # noqa: BLE001 - handed to the caller, raised there at this position
                yield _WorkerError(err)
                return
