"""Training FLOPs, throughput and the run's console line."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from pld_ds.data.schema import IGNORE_INDEX
from pld_ds.model import BertConfig

# Dense bf16/fp16 tensor-core peaks (TFLOP/s) by device name, for MFU.
PEAK_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0, "V100": 125.0, "L40S": 362.0}


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def peak_tflops(name: str) -> float | None:
    """The dense 16-bit tensor-core peak of a device by its name; None when unknown (CPUs)."""
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def layer_flops_per_sequence(cfg: BertConfig, seq_len: int, layer: int) -> float:
    """Training FLOPs of one encoder layer for one sequence: 3 x (8 s h a + 4 s h I + 4 s^2 a).

    Forward is 2 FLOPs per multiply-add; backward twice the forward. a = heads x head size and I the
    feed-forward width of this layer (a = h and I = 4h in BERT: the usual 24 s h^2 + 4 s^2 h); QKV and
    output projection 8 s h a, feed-forward 4 s h I, scores and context 4 s^2 a.
    """
    h, s = cfg.hidden_size, seq_len
    a = cfg.heads_in(layer) * (h // cfg.num_heads)
    return 3 * (8 * s * h * a + 4 * s * h * cfg.intermediate_in(layer) + 4 * s * s * a)


def encoder_flops_per_sequence(cfg: BertConfig, seq_len: int, layers: float | Sequence[float] | None = None
                               ) -> float:
    """Training FLOPs of the encoder for one sequence, layer by layer (slim EarlyBERT layers included).

    ``layers``: None (every layer), each layer's PLD keep probability (a sequence), or a number of
    layers (the expected depth under PLD; exact when every layer has the same width).
    """
    per_layer = [layer_flops_per_sequence(cfg, seq_len, i) for i in range(cfg.num_layers)]
    if layers is None:
        return sum(per_layer)
    if isinstance(layers, (int, float)):
        return layers * sum(per_layer) / cfg.num_layers
    return sum(p * flops for p, flops in zip(layers, per_layer, strict=True))


def head_flops_per_sequence(cfg: BertConfig, masked_per_seq: float) -> float:
    """MLM head at the masked positions only (transform + tied decoder), training (x3)."""
    h = cfg.hidden_size
    return 3 * 2 * masked_per_seq * (h * h + h * cfg.vocab_size)


def training_flops_per_sequence(
    cfg: BertConfig, seq_len: int, masked_per_seq: float, layers: float | Sequence[float] | None = None
) -> float:
    return encoder_flops_per_sequence(cfg, seq_len, layers) + head_flops_per_sequence(cfg, masked_per_seq)


def batch_flops(cfg: BertConfig, batch: Mapping[str, torch.Tensor], layers: float | Sequence[float] | None = None
                ) -> float:
    """Training FLOPs of one micro-batch as it was computed: its rows at the length it was cut to (so
    --bin-by-length batches count their own length, not the shard's) and its labelled positions."""
    rows, seq_len = batch["input_ids"].shape
    masked = int((batch["masked_lm_labels"] != IGNORE_INDEX).sum()) if "masked_lm_labels" in batch else 0
    return rows * encoder_flops_per_sequence(cfg, seq_len, layers) + head_flops_per_sequence(cfg, masked)


class CountedBatches:
    """Wraps the training batches and keeps each micro-batch's shape and labels until `drain()`, so the meter
    counts what the engine computed (every micro-batch of the accumulation window, at its own length)."""

    def __init__(self, batches: Iterator[dict[str, torch.Tensor]]) -> None:
        self._batches = batches
        self._seen: list[dict[str, torch.Tensor]] = []

    def __iter__(self) -> CountedBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        batch = next(self._batches)
        self._seen.append({k: batch[k] for k in ("input_ids", "masked_lm_labels") if k in batch})
        return batch

    def drain(self) -> list[dict[str, torch.Tensor]]:
        seen, self._seen = self._seen, []
        return seen


@dataclass(frozen=True)
class Rates:
    """Throughput over one interval between log lines: every rate on a log line is this one."""

    steps: int
    seconds: float
    samples: float  # all ranks
    flops: float  # all ranks

    @property
    def samples_per_sec(self) -> float:
        return self.samples / self.seconds

    @property
    def tflops(self) -> float:
        return self.flops / self.seconds / 1e12

    @property
    def sec_per_step(self) -> float:
        return self.seconds / max(self.steps, 1)


class Meter:
    """Samples and training FLOPs of the steps since the last report, and the wall time they took.

    `count` after every step with the micro-batches it computed and the keep probabilities it ran with;
    `report` at a log step: the rates over the interval since the previous report (or since the meter
    started, at the first step this process runs: a resumed run counts only its own steps)."""

    def __init__(self, step: int) -> None:
        self._time, self._step = time.perf_counter(), step
        self._samples, self._flops = 0, 0.0

    def count(self, cfg: BertConfig, batches: Sequence[Mapping[str, torch.Tensor]],
              layers: float | Sequence[float] | None = None) -> None:
        for batch in batches:
            self._samples += int(batch["input_ids"].shape[0])
            self._flops += batch_flops(cfg, batch, layers)

    def report(self, step: int, all_ranks: Callable[[list[float]], list[float]] = lambda v: v) -> Rates:
        """``all_ranks`` sums [samples, flops] over the data-parallel ranks (each counted its own rows)."""
        now = time.perf_counter()
        samples, flops = all_ranks([float(self._samples), self._flops])
        rates = Rates(steps=step - self._step, seconds=max(now - self._time, 1e-9), samples=samples, flops=flops)
        self._time, self._step, self._samples, self._flops = now, step, 0, 0.0
        return rates
