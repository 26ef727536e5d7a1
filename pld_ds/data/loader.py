"""Per-rank batches from a folder of shards, with an exact, resumable position.

One epoch is a stream of samples: shards in an order shuffled by (seed, epoch), the samples of each
shard shuffled by (seed, epoch, shard). Each optimizer micro-step takes the next world_size x
micro_batch samples of the stream and rank r keeps slice r, so every rank runs the same number of
steps, no sample is seen twice in an epoch, and the position is one integer (plus the epoch).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from pld_ds.data import schema, shards
from pld_ds.data.masking import DynamicMasking


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
    ) -> None:
        self.infos = shards.inspect_all(paths, seq_len)
        unmasked = next((info for info in self.infos if not info.static_masking), None)
        if unmasked is not None and masking is None:
            raise shards.ShardError(f"{unmasked.path}: a dynamic-masking shard (no masked_lm_* datasets) needs the "
                                    "vocabulary's [MASK] id: expected a vocab file named in manifest.json")
        self.masking = masking
        self.seq_len = self.infos[0].seq_len
        self.vocab_size = vocab_size
        self.micro_batch, self.rank, self.world_size, self.seed = micro_batch, rank, world_size, seed
        counts = np.array([info.num_samples for info in self.infos])
        self.global_batch = micro_batch * world_size
        self.batches_per_epoch = int(counts.sum()) // self.global_batch
        if self.batches_per_epoch == 0:
            raise shards.ShardError(f"{paths[0].parent}: {counts.sum()} samples, fewer than one global batch "
                                    f"of {self.global_batch} (micro batch {micro_batch} x {world_size} ranks)")
        self.epoch, self.batch_in_epoch = 0, 0
        self._cache: dict[int, dict[str, np.ndarray]] = {}

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
    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        rng = np.random.default_rng([self.seed, epoch])
        shard_order = rng.permutation(len(self.infos))
        starts = np.cumsum([0] + [self.infos[i].num_samples for i in shard_order])
        rows = [np.random.default_rng([self.seed, epoch, int(i)]).permutation(self.infos[i].num_samples)
                for i in shard_order]
        return shard_order, starts, rows

    def _shard(self, index: int) -> dict[str, np.ndarray]:
        if index not in self._cache:
            if len(self._cache) >= 2:  # a batch spans at most two shards
                self._cache.pop(next(iter(self._cache)))
            self._cache[index] = shards.read_shard(self.infos[index], self.vocab_size)
        return self._cache[index]

    def _collate(self, parts: list[dict[str, np.ndarray]], rng: np.random.Generator) -> dict[str, torch.Tensor]:
        cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        input_ids = torch.from_numpy(cat[schema.INPUT_IDS.name].astype(np.int64))
        labels = torch.full_like(input_ids, schema.IGNORE_INDEX)
        if schema.MASKED_LM_POSITIONS.name not in cat:
            masked, dense = self.masking(cat[schema.INPUT_IDS.name], cat[schema.INPUT_MASK.name], rng)
            input_ids, labels = torch.from_numpy(masked), torch.from_numpy(dense)
        else:
            positions = torch.from_numpy(cat[schema.MASKED_LM_POSITIONS.name].astype(np.int64))
            ids = torch.from_numpy(cat[schema.MASKED_LM_IDS.name].astype(np.int64))
            # Position 0 is [CLS] and never masked: NVIDIA pads unused prediction slots with 0.
            valid = positions > 0
            rows = torch.arange(len(positions)).unsqueeze(1).expand_as(positions)
            labels[rows[valid], positions[valid]] = ids[valid]
        return {
            "input_ids": input_ids,
            "token_type_ids": torch.from_numpy(cat[schema.SEGMENT_IDS.name].astype(np.int64)),
            "attention_mask": torch.from_numpy(cat[schema.INPUT_MASK.name].astype(np.int64)),
            "masked_lm_labels": labels,
            "next_sentence_labels": torch.from_numpy(cat[schema.NEXT_SENTENCE_LABELS.name].astype(np.int64)),
        }

    def _batch(
        self, order: tuple[np.ndarray, np.ndarray, list[np.ndarray]], batch: int, epoch: int
    ) -> dict[str, torch.Tensor]:
        shard_order, starts, rows = order
        first = batch * self.global_batch + self.rank * self.micro_batch
        stream = np.arange(first, first + self.micro_batch)
        where = np.searchsorted(starts, stream, side="right") - 1
        parts = []
        for pos in np.unique(where):
            picked = rows[pos][stream[where == pos] - starts[pos]]
            data = self._shard(int(shard_order[pos]))
            parts.append({k: v[picked] for k, v in data.items()})
        # Dynamic masking draws from (seed, epoch, batch, rank): a resumed run masks identically.
        return self._collate(parts, np.random.default_rng([self.seed, epoch, batch, self.rank]))

    # -- iteration ------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Endless: continues from the current position, epoch after epoch."""
        while True:
            order = self._epoch_order(self.epoch)
            while self.batch_in_epoch < self.batches_per_epoch:
                batch = self._batch(order, self.batch_in_epoch, self.epoch)
                self.batch_in_epoch += 1
                yield batch
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def one_pass(self) -> Iterator[dict[str, torch.Tensor]]:
        """Every full global batch of epoch 0 once, in order (for evaluation); leaves the position alone."""
        order = self._epoch_order(0)
        for batch in range(self.batches_per_epoch):
            yield self._batch(order, batch, 0)
