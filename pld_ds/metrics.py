"""Training FLOPs, throughput and the run's console line."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

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


class Throughput:
    """Samples per second between two calls of `tick`, from the wall clock."""

    def __init__(self, samples: int = 0) -> None:
        self._time = time.perf_counter()
        self._samples = samples

    def tick(self, samples: int) -> float:
        now = time.perf_counter()
        rate = (samples - self._samples) / max(now - self._time, 1e-9)
        self._time, self._samples = now, samples
        return rate
