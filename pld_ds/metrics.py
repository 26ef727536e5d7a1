"""Training FLOPs, throughput and the run's console line."""

from __future__ import annotations

import time

import torch

from pld_ds.model import BertConfig

# Dense bf16/fp16 tensor-core peaks (TFLOP/s) by device name, for MFU.
PEAK_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0, "V100": 125.0, "L40S": 362.0}


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def peak_tflops(name: str) -> float | None:
    """The dense 16-bit tensor-core peak of a device by its name; None when unknown (CPUs)."""
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def encoder_flops_per_sequence(cfg: BertConfig, seq_len: int, layers: float | None = None) -> float:
    """Training FLOPs of the encoder for one sequence: 3 x L x (24 s h^2 + 4 s^2 h).

    Forward is 2 FLOPs per multiply-add; backward twice the forward. `layers` may be fractional
    (the expected depth under PLD).
    """
    layers = cfg.num_layers if layers is None else layers
    h, s = cfg.hidden_size, seq_len
    # QKV + output projection 8 s h^2, feed-forward 4 s h I (= 16 s h^2 when I = 4h), scores and
    # context 4 s^2 h: the 24 s h^2 + 4 s^2 h of the usual formula for BERT's shapes.
    per_layer = 8 * s * h * h + 4 * s * h * cfg.intermediate_size + 4 * s * s * h
    return 3 * layers * per_layer


def head_flops_per_sequence(cfg: BertConfig, masked_per_seq: float) -> float:
    """MLM head at the masked positions only (transform + tied decoder), training (x3)."""
    h = cfg.hidden_size
    return 3 * 2 * masked_per_seq * (h * h + h * cfg.vocab_size)


def training_flops_per_sequence(
    cfg: BertConfig, seq_len: int, masked_per_seq: float, layers: float | None = None
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
