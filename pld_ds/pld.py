"""Progressive Layer Dropping: the schedule and the gates, as pure functions.

theta(t) = (1 - theta_bar) * exp(-gamma * t) + theta_bar over optimizer steps t, and layer l of L
(1-based) is kept with probability p_l = 1 - (l / L) * (1 - theta). Gates come from a
torch.Generator seeded by (seed, step, micro_step): every data-parallel rank draws the same gates
without communicating, and the probability a gate was sampled with is the one its layer rescales by.
"""

from __future__ import annotations

import math

import torch

_MASK64 = (1 << 64) - 1


def theta(step: int, theta_bar: float, gamma: float) -> float:
    """Expected fraction of the deepest layer kept after `step` optimizer steps."""
    return (1.0 - theta_bar) * math.exp(-gamma * step) + theta_bar


def keep_prob(layer: int, num_layers: int, theta_now: float) -> float:
    """Probability of keeping 1-based `layer` of `num_layers` at the current theta."""
    if not 1 <= layer <= num_layers:
        raise ValueError(f"layer must be in [1, {num_layers}], got {layer}")
    return 1.0 - (layer / num_layers) * (1.0 - theta_now)


def keep_probs(num_layers: int, theta_now: float) -> list[float]:
    return [keep_prob(layer, num_layers, theta_now) for layer in range(1, num_layers + 1)]


def expected_depth(num_layers: int, theta_now: float) -> float:
    """Expected number of layers run: sum of p_l = L - (1 - theta) (L + 1) / 2."""
    return num_layers - (1.0 - theta_now) * (num_layers + 1) / 2.0


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def gate_seed(seed: int, step: int, micro_step: int) -> int:
    """A well-mixed 63-bit seed for (seed, step, micro_step); equal inputs give equal seeds everywhere."""
    mixed = _splitmix64(seed & _MASK64)
    mixed = _splitmix64(mixed ^ (step & _MASK64))
    mixed = _splitmix64(mixed ^ (micro_step & _MASK64))
    return mixed >> 1


def gate_generator(seed: int, step: int, micro_step: int) -> torch.Generator:
    """CPU generator for one micro-batch's gates (CPU so drawing them never syncs an accelerator)."""
    return torch.Generator(device="cpu").manual_seed(gate_seed(seed, step, micro_step))


def sample_gates(
    num_layers: int, theta_now: float, generator: torch.Generator | None = None
) -> list[tuple[bool, float]]:
    """(kept, p_l) for each layer; a kept layer must rescale by exactly the p_l it was drawn with."""
    draws = torch.rand(num_layers, generator=generator, dtype=torch.float64).tolist()
    probs = keep_probs(num_layers, theta_now)
    return [(u < p, p) for u, p in zip(draws, probs, strict=True)]


def keep_summary(totals: torch.Tensor | None) -> list[str]:
    """Lines comparing, per layer, the share of draws that kept it with its mean p_l.

    ``totals`` holds one row per layer: (times kept, sum of p_l, draws); None when nothing was drawn."""
    if totals is None:
        return []
    rows = totals.tolist()
    lines = [f"PLD gates drawn over {int(rows[0][2])} micro-batches (layer: kept share / mean p_l):"]
    lines.append("  " + "  ".join(f"{k}: {kept / n:.3f}/{p / n:.3f}" for k, (kept, p, n) in enumerate(rows, 1)))
    return lines
