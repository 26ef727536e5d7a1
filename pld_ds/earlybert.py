"""EarlyBERT (Chen et al., ACL 2021): find a slim sub-network early in training, then train only that.

Search. The model carries learnable slimming coefficients, initialised to 1 (BertConfig.slimming): one
per attention head, scaling that head's context, and one per feed-forward neuron, scaling its GELU
output. An L1 penalty lambda * sum |c| joins the training loss and the coefficients train with the
model's optimizer. Under PLD the penalty still covers every layer, also those dropped in a step
(penalty_weights says why: under Adam, pulling only on layers that ran biases the ticket). Every
`check_interval` optimizer steps the ticket's masks are built from the coefficients: in every layer the
`head_prune_ratio` of its heads with the smallest |c|, and over all layers together the
`neuron_prune_ratio` of the neurons with the smallest |c|, are pruned. The newest `window` masks are
kept; the ticket has emerged when the newest lies within `threshold` of each of the others. The
distance of two masks is the fraction of positions that differ, taken for the heads and for the neurons
separately, and the larger of the two counts: one fraction over all positions would let the neurons
(36,864 in BERT-base) drown the heads (144).

Draw. The pruned heads and neurons are removed from the weights (fewer rows in the fused QKV and fc1,
fewer columns in the output projection and fc2), so the compute saving is real; the coefficients are
folded into the output projection and fc2 and disappear. The slim model then trains without the
penalty, from the weights at the start of the search ("rewind", as the paper's code does) or from the
current ones ("continue"). PLD composes: its gates apply to the slim layers as to full ones.

The settings are a block of the run's DeepSpeed JSON, which pld_ds.config.split_ds_config keeps
from DeepSpeed:

    "earlybert": {"enabled": true, "lambda_heads": 1e-4, "lambda_neurons": 1e-4, "head_prune_ratio": 0.3333,
                  "neuron_prune_ratio": 0.4, "check_interval": 100, "window": 5, "threshold": 0.1,
                  "max_search_steps": 0, "weights": "rewind"}

ZeRO stages 0 to 2: every rank holds the full coefficients, so every rank builds the same masks
without communicating. ZeRO-3 partitions them and is refused.
"""

from __future__ import annotations

import dataclasses
import json
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from pld_ds import metrics
from pld_ds.config import ConfigError, RunConfig, _is_number, _show, read_json
from pld_ds.model import BertConfig, BertForPreTraining, BertForSequenceClassification

EARLYBERT_KEY = "earlybert"
WEIGHTS = ("rewind", "continue")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# (check, what was expected) per key of the block
_CHECKS: dict[str, tuple[Any, str]] = {
    "enabled": (lambda v: isinstance(v, bool), "true or false"),
    "lambda_heads": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "lambda_neurons": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "head_prune_ratio": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "neuron_prune_ratio": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "check_interval": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "window": (lambda v: _is_int(v) and v >= 2, "an integer >= 2"),
    "threshold": (lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "max_search_steps": (lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0: search until the ticket emerges)"),
    "weights": (lambda v: isinstance(v, str) and v in WEIGHTS, '"rewind" or "continue"'),
}


@dataclass(frozen=True)
class EarlyBertConfig:
    """The `earlybert` block. Defaults follow the paper's released scripts (4 of 12 heads per layer,
    40% of the neurons, lambda 1e-4, a window of 5 masks within 0.1)."""

    enabled: bool = False
    lambda_heads: float = 1e-4  # L1 weight on the head coefficients during the search
    lambda_neurons: float = 1e-4  # L1 weight on the neuron coefficients during the search
    head_prune_ratio: float = 1 / 3  # of each layer's heads
    neuron_prune_ratio: float = 0.4  # of all feed-forward neurons, across layers
    check_interval: int = 100  # optimizer steps between two masks
    window: int = 5  # masks compared: the newest against the window - 1 before it
    threshold: float = 0.1  # largest mask distance at which the ticket counts as emerged
    max_search_steps: int = 0  # draw the ticket here even if it has not emerged; 0: no limit
    weights: str = "rewind"  # the slim model starts from the search's first weights, or "continue"

    @classmethod
    def from_dict(cls, block: Any, source: str = "config") -> EarlyBertConfig:
        where = f"{source}: {EARLYBERT_KEY}"
        if not isinstance(block, dict):
            raise ConfigError(f'{where}: expected an object like {{"enabled": true, "neuron_prune_ratio": 0.4}}, '
                              f"got {type(block).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        problems = [f"{where}.{key}: unknown key (expected one of: {', '.join(sorted(known))})"
                    for key in sorted(set(block) - set(known))]
        values = {f.name: block.get(f.name, f.default) for f in dataclasses.fields(cls)}
        for name, (ok, expected) in _CHECKS.items():
            if not ok(values[name]):
                problems.append(f"{where}.{name}: expected {expected}, got {_show(values[name])}")
        if problems:
            raise ConfigError("; ".join(problems))
        for name in ("lambda_heads", "lambda_neurons", "head_prune_ratio", "neuron_prune_ratio", "threshold"):
            values[name] = float(values[name])
        return cls(**values)

    @classmethod
    def from_ds_config(cls, config: str | Path | dict[str, Any] | RunConfig) -> EarlyBertConfig:
        """The block of a DeepSpeed JSON (file, dict, or the RunConfig that read it); disabled when there is none."""
        if isinstance(config, RunConfig):
            return config.earlybert
        if isinstance(config, dict):
            source, ds_config = "DeepSpeed config", config
        else:
            source, ds_config = str(config), read_json(config, "DeepSpeed config")
        return cls.from_dict(ds_config[EARLYBERT_KEY], source) if EARLYBERT_KEY in ds_config else cls()


# -- the model's coefficients ---------------------------------------------------------------------


def _bert(model: nn.Module) -> nn.Module:
    """The model with the encoder, also through a PLDEngine or DeepSpeed engine (their .module)."""
    while not hasattr(model, "encoder") and hasattr(model, "module"):
        model = model.module
    if not hasattr(model, "encoder") or not hasattr(model, "config"):
        raise TypeError(f"expected a pld_ds BERT model (BertForPreTraining, BertForSequenceClassification), "
                        f"got {type(model).__name__}")
    return model


def _refuse_zero3(model: nn.Module) -> None:
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        raise ConfigError(f"{EARLYBERT_KEY}: ZeRO stage 3 partitions the weights the ticket is drawn from: "
                          "use ZeRO stage 0, 1 or 2")


def enable_slimming(model: nn.Module) -> nn.Module:
    """Give a model its slimming coefficients (ones), in place, unless it has them: e.g. a classifier
    just loaded with pretrained weights. Call before the optimizer is built."""
    bert = _bert(model)
    for layer in bert.encoder.layers:
        weight = layer.attn.qkv.weight
        if layer.attn.head_coef is None:
            layer.attn.head_coef = nn.Parameter(torch.ones(layer.attn.num_heads, device=weight.device))
        if layer.ffn.neuron_coef is None:
            layer.ffn.neuron_coef = nn.Parameter(torch.ones(layer.ffn.fc1.out_features, device=weight.device))
    bert.config = dataclasses.replace(bert.config, slimming=True)
    return model


def coefficients(model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(head coefficients, neuron coefficients), one tensor per layer, still attached to the graph."""
    layers = _bert(model).encoder.layers
    heads = [layer.attn.head_coef for layer in layers]
    neurons = [layer.ffn.neuron_coef for layer in layers]
    if any(c is None for c in heads + neurons):
        raise ValueError("the model has no slimming coefficients: build it with BertConfig(slimming=True) "
                         "or call pld_ds.earlybert.enable_slimming(model)")
    return heads, neurons


PENALTY_LAYERS = ("all", "ran", "ran_unscaled")


def penalty_weights(gates: Sequence[tuple[bool, float]] | None, layers: str = "all") -> list[float] | None:
    """Per layer, the factor on its L1 term in a forward that drew PLD `gates` ((kept, keep probability)
    per layer; None: every layer ran, every factor 1).

    "all" (the default): 1 for every layer, also for the layers PLD dropped. "ran": 1/p for a layer that
    ran and 0 for a dropped one (over the gates the expected pull is the full penalty). "ran_unscaled": 1
    where the layer ran, 0 where not. The default is "all" because the search trains the coefficients
    with Adam, whose step does not scale with the gradient: a coefficient that gets the L1 gradient only
    in the fraction p of the steps where its layer ran shrinks about sqrt(p) as fast (0.205 against 0.297
    in 300 steps at p = 0.5, 1/p or not), so the shallow layers, which run every step, lose their neurons
    first. Measured (bench/earlybert_pld_bias.py, docs/benchmarks.md): with "ran" or "ran_unscaled" the
    first layers lost 84-98% of their neurons and the last ones none, while "all" pruned each layer about
    as the search without PLD did."""
    if layers not in PENALTY_LAYERS:
        raise ValueError(f"layers must be one of {', '.join(PENALTY_LAYERS)}, got {layers!r}")
    if gates is None or layers == "all":
        return None
    if layers == "ran_unscaled":
        return [1.0 if kept else 0.0 for kept, _ in gates]
    return [1.0 / keep_prob if kept else 0.0 for kept, keep_prob in gates]


def l1_penalty(model: nn.Module, lambda_heads: float, lambda_neurons: float,
               layer_weights: Sequence[float] | None = None) -> torch.Tensor:
    """lambda_heads * sum |head coefficients| + lambda_neurons * sum |neuron coefficients|; with
    `layer_weights` (penalty_weights), layer l's terms times layer_weights[l] (a layer weighted 0 is left out
    of the graph, so it gets no gradient from the penalty)."""
    heads, neurons = coefficients(model)
    if layer_weights is None:
        return (lambda_heads * torch.cat([c.abs() for c in heads]).sum()
                + lambda_neurons * torch.cat([c.abs() for c in neurons]).sum())
    if len(layer_weights) != len(heads):
        raise ValueError(f"{len(layer_weights)} layer weights for a model of {len(heads)} layers")
    total = heads[0].new_zeros(())
    for weight, head, neuron in zip(layer_weights, heads, neurons, strict=True):
        if weight:
            total = total + weight * (lambda_heads * head.abs().sum() + lambda_neurons * neuron.abs().sum())
    return total


def add_penalty_to_loss(model: nn.Module, lambda_heads: float, lambda_neurons: float,
                        layers: str = "all") -> RemovableHandle:
    """A forward hook that adds the L1 penalty to `output.loss` in training mode (not in evaluation), so
    PLDEngine.train_batch and any loop that backpropagates `out.loss` optimise it unchanged. Under PLD each
    layer's terms are weighted as penalty_weights(output.gates, layers) says. The penalty is also
    put in `output.l1_penalty` (detached) where the output has that field, so it can be logged apart from
    the MLM and NSP losses."""
    bert = _bert(model)
    penalty_weights(None, layers)  # check the name now, not at the first forward

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        if module.training and getattr(output, "loss", None) is not None:
            weights = penalty_weights(getattr(output, "gates", None), layers)
            penalty = l1_penalty(module, lambda_heads, lambda_neurons, weights).to(output.loss.dtype)
            output.loss = output.loss + penalty
            if hasattr(output, "l1_penalty"):
                output.l1_penalty = penalty.detach()

    return bert.register_forward_hook(hook)


# -- masks and the early-bird test ----------------------------------------------------------------


def _fraction_differ(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    flat_a, flat_b = torch.cat(list(a)), torch.cat(list(b))
    if flat_a.shape != flat_b.shape:
        raise ValueError(f"masks of different sizes: {flat_a.numel()} and {flat_b.numel()} positions")
    # integer count over integer total: 2 of 20 is exactly 0.1, as a threshold of 0.1 expects
    return int((flat_a != flat_b).sum()) / flat_a.numel() if flat_a.numel() else 0.0


@dataclass(frozen=True, eq=False)
class TicketMasks:
    """Per layer, a bool tensor that is True where a head (a feed-forward neuron) is kept."""

    heads: tuple[torch.Tensor, ...]
    neurons: tuple[torch.Tensor, ...]

    @classmethod
    def full(cls, cfg: BertConfig) -> TicketMasks:
        """Everything kept."""
        return cls(tuple(torch.ones(cfg.heads_in(i), dtype=torch.bool) for i in range(cfg.num_layers)),
                   tuple(torch.ones(cfg.intermediate_in(i), dtype=torch.bool) for i in range(cfg.num_layers)))

    def kept_heads(self) -> tuple[int, ...]:
        return tuple(int(m.sum()) for m in self.heads)

    def kept_neurons(self) -> tuple[int, ...]:
        return tuple(int(m.sum()) for m in self.neurons)

    def distances(self, other: TicketMasks) -> tuple[float, float]:
        """Fractions of head positions and of neuron positions whose mask differs."""
        return _fraction_differ(self.heads, other.heads), _fraction_differ(self.neurons, other.neurons)

    def distance(self, other: TicketMasks) -> float:
        return max(self.distances(other))


def _keep_all_but_smallest(scores: torch.Tensor, count: int) -> torch.Tensor:
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    # stable: equal magnitudes (all coefficients start at 1) prune the lower index first, on every rank alike
    keep[torch.argsort(scores, stable=True)[:count]] = False
    return keep


def masks_from_coefficients(head_coefs: Sequence[torch.Tensor], neuron_coefs: Sequence[torch.Tensor],
                            head_prune_ratio: float, neuron_prune_ratio: float) -> TicketMasks:
    """Prune by |c|: round(ratio * n) heads of each layer's n, and round(ratio * N) of all N neurons.

    A layer keeps at least one head and one neuron (its largest |c|): BertConfig allows no empty layer.
    """
    heads = []
    for coef in head_coefs:
        magnitude = coef.detach().float().abs().cpu()
        heads.append(_keep_all_but_smallest(magnitude, min(round(magnitude.numel() * head_prune_ratio),
                                                           magnitude.numel() - 1)))
    magnitudes = [c.detach().float().abs().cpu() for c in neuron_coefs]
    flat = torch.cat(magnitudes)
    kept = _keep_all_but_smallest(flat, round(flat.numel() * neuron_prune_ratio))
    neurons = []
    for mask, magnitude in zip(kept.split([m.numel() for m in magnitudes]), magnitudes, strict=True):
        mask = mask.clone()
        if not mask.any():
            mask[magnitude.argmax()] = True
        neurons.append(mask)
    return TicketMasks(tuple(heads), tuple(neurons))


def masks_from_model(model: nn.Module, head_prune_ratio: float, neuron_prune_ratio: float) -> TicketMasks:
    heads, neurons = coefficients(model)
    return masks_from_coefficients(heads, neurons, head_prune_ratio, neuron_prune_ratio)


class EarlyBirdDetector:
    """Keeps the newest `window` masks; the ticket has emerged when the newest lies within `threshold`
    (TicketMasks.distance) of each of the window - 1 masks before it."""

    def __init__(self, window: int = 5, threshold: float = 0.1) -> None:
        if window < 2:
            raise ValueError(f"window must be >= 2, got {window}")
        self.window, self.threshold = window, threshold
        self.earlier: deque[TicketMasks] = deque(maxlen=window - 1)

    def update(self, masks: TicketMasks) -> tuple[list[tuple[float, float]], bool]:
        """Add the newest masks: ((head, neuron) distances to each earlier mask in the window, oldest first;
        emerged?)."""
        distances = [masks.distances(old) for old in self.earlier]
        emerged = len(distances) == self.window - 1 and all(max(d) <= self.threshold for d in distances)
        self.earlier.append(masks)
        return distances, emerged


# -- pruning ----------------------------------------------------------------------------------------


def _check_masks(cfg: BertConfig, masks: TicketMasks) -> None:
    if len(masks.heads) != cfg.num_layers or len(masks.neurons) != cfg.num_layers:
        raise ValueError(f"masks for {len(masks.heads)}/{len(masks.neurons)} layers, the model has {cfg.num_layers}")
    for i in range(cfg.num_layers):
        if masks.heads[i].numel() != cfg.heads_in(i) or masks.neurons[i].numel() != cfg.intermediate_in(i):
            raise ValueError(f"layer {i}: masks of {masks.heads[i].numel()} heads and {masks.neurons[i].numel()} "
                             f"neurons, the model has {cfg.heads_in(i)} and {cfg.intermediate_in(i)}")
        if not masks.heads[i].any() or not masks.neurons[i].any():
            raise ValueError(f"layer {i}: the masks keep no head or no neuron (a layer keeps at least one)")


def slim_config(cfg: BertConfig, masks: TicketMasks) -> BertConfig:
    """The shapes that remain: per-layer head and neuron counts (None where a count is full everywhere)."""
    heads, neurons = masks.kept_heads(), masks.kept_neurons()
    full_heads = all(h == cfg.num_heads for h in heads)
    full_neurons = all(n == cfg.intermediate_size for n in neurons)
    return dataclasses.replace(cfg, layer_heads=None if full_heads else heads,
                               layer_intermediate=None if full_neurons else neurons, slimming=False)


def _scale_columns(weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    if scale is None:
        return weight.clone()
    return (weight.float() * scale.float().to(weight.device)).to(weight.dtype)


def slim_state_dict(state: dict[str, torch.Tensor], cfg: BertConfig, masks: TicketMasks) -> dict[str, torch.Tensor]:
    """`state` (of a model of shape `cfg`) cut to the kept heads and neurons, coefficients folded in.

    Kept heads keep their rows of the fused QKV ([Q; K; V], each heads x head_dim) and their columns
    of the output projection, times their coefficient; kept neurons keep their fc1 rows and their fc2
    columns, times their coefficient. Everything else is copied as it is.
    """
    _check_masks(cfg, masks)
    head_dim = cfg.hidden_size // cfg.num_heads
    out = {name: tensor for name, tensor in state.items()
           if not name.endswith((".attn.head_coef", ".ffn.neuron_coef"))}
    for i in range(cfg.num_layers):
        p = f"encoder.layers.{i}."
        heads = masks.heads[i].nonzero().flatten()
        width = cfg.heads_in(i) * head_dim
        cols = (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()  # inside one of Q, K, V
        rows = torch.cat([part * width + cols for part in range(3)])
        coef = state.get(p + "attn.head_coef")
        scale = None if coef is None else coef.detach().cpu()[heads].repeat_interleave(head_dim)
        for suffix in ("weight", "bias"):
            qkv = state[p + "attn.qkv." + suffix]
            out[p + "attn.qkv." + suffix] = qkv[rows.to(qkv.device)].clone()
        proj = state[p + "attn.out.weight"]
        out[p + "attn.out.weight"] = _scale_columns(proj[:, cols.to(proj.device)], scale)

        neurons = masks.neurons[i].nonzero().flatten()
        coef = state.get(p + "ffn.neuron_coef")
        scale = None if coef is None else coef.detach().cpu()[neurons]
        for suffix in ("weight", "bias"):
            fc1 = state[p + "ffn.fc1." + suffix]
            out[p + "ffn.fc1." + suffix] = fc1[neurons.to(fc1.device)].clone()
        fc2 = state[p + "ffn.fc2.weight"]
        out[p + "ffn.fc2.weight"] = _scale_columns(fc2[:, neurons.to(fc2.device)], scale)
    return out


def _new_like(model: nn.Module, cfg: BertConfig) -> nn.Module:
    # Built on the side of the global RNG: drawing a ticket does not shift the run's random stream.
    with torch.random.fork_rng(devices=[]):
        if isinstance(model, BertForPreTraining):
            return BertForPreTraining(cfg)
        if isinstance(model, BertForSequenceClassification):
            return BertForSequenceClassification(cfg, model.num_labels)
    raise TypeError(f"cannot prune a {type(model).__name__}")


def prune(model: nn.Module, masks: TicketMasks, source_state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """A new model of the same class with only the kept heads and neurons (fp32, on the CPU), its weights
    taken from `source_state` (a state dict of `model`, e.g. from the start of the search) or else from
    `model` as it is now. With every coefficient folded in, it computes what `model` computes with the
    pruned heads' and neurons' coefficients set to 0."""
    bert = _bert(model)
    state = bert.state_dict() if source_state is None else source_state
    slim = _new_like(bert, slim_config(bert.config, masks))
    slim.load_state_dict(slim_state_dict(state, bert.config, masks))
    return slim


# -- cost of a shape ------------------------------------------------------------------------------


def parameter_count(cfg: BertConfig) -> int:
    """Parameters of BertForPreTraining(cfg), tied embeddings once (counted on the meta device)."""
    with torch.device("meta"), torch.random.fork_rng(devices=[]):
        return sum(p.numel() for p in BertForPreTraining(cfg).parameters())


def encoder_flops_per_sequence(cfg: BertConfig, seq_len: int, keep_probs: Sequence[float] | None = None) -> float:
    """metrics.encoder_flops_per_sequence: layer by layer, each with its own widths and PLD keep probability."""
    return metrics.encoder_flops_per_sequence(cfg, seq_len, keep_probs)


def training_flops_per_sequence(cfg: BertConfig, seq_len: int, masked_per_seq: float,
                                keep_probs: Sequence[float] | None = None) -> float:
    return metrics.training_flops_per_sequence(cfg, seq_len, masked_per_seq, keep_probs)


@dataclass(frozen=True)
class TicketReport:
    """What the ticket keeps and what it saves (parameters; training FLOPs per sequence at seq_len)."""

    emergence_step: int | None  # None: drawn at max_search_steps before it emerged
    drawn_at: int
    weights: str
    seq_len: int
    heads: tuple[int, ...]  # per layer, before
    kept_heads: tuple[int, ...]
    neurons: tuple[int, ...]
    kept_neurons: tuple[int, ...]
    params_full: int
    params_slim: int
    flops_full: float
    flops_slim: float

    @property
    def param_reduction(self) -> float:
        return 1.0 - self.params_slim / self.params_full

    @property
    def flop_reduction(self) -> float:
        return 1.0 - self.flops_slim / self.flops_full

    def lines(self) -> list[str]:
        when = (f"emerged at step {self.emergence_step}" if self.emergence_step is not None
                else f"did not emerge by step {self.drawn_at}")
        lines = [f"earlybert: ticket {when}, drawn at step {self.drawn_at}, slim model starts from the "
                 f"{'weights at search start (rewind)' if self.weights == 'rewind' else 'current weights'}"]
        for i, (h, kh, n, kn) in enumerate(zip(self.heads, self.kept_heads, self.neurons, self.kept_neurons,
                                                strict=True)):
            lines.append(f"earlybert: layer {i}: {kh}/{h} heads, {kn}/{n} neurons")
        lines.append(f"earlybert: parameters {self.params_full / 1e6:.2f}M -> {self.params_slim / 1e6:.2f}M "
                     f"(-{100 * self.param_reduction:.1f}%), training FLOPs per sequence at seq {self.seq_len} "
                     f"{self.flops_full / 1e9:.2f}G -> {self.flops_slim / 1e9:.2f}G "
                     f"(-{100 * self.flop_reduction:.1f}%)")
        return lines

    def scalars(self) -> dict[str, float]:
        scalars = {"earlybert/param_reduction": self.param_reduction, "earlybert/flop_reduction": self.flop_reduction,
                   "earlybert/kept_heads": float(sum(self.kept_heads)),
                   "earlybert/kept_neurons": float(sum(self.kept_neurons))}
        if self.emergence_step is not None:
            scalars["earlybert/emergence_step"] = float(self.emergence_step)
        return scalars


def ticket_report(full: BertConfig, slim: BertConfig, *, emergence_step: int | None, drawn_at: int,
                  weights: str, seq_len: int = 128) -> TicketReport:
    full = dataclasses.replace(full, slimming=False)  # the coefficients are search scaffolding, not the model
    masked = max(1, round(0.15 * seq_len))
    per_layer = range(full.num_layers)
    return TicketReport(
        emergence_step=emergence_step, drawn_at=drawn_at, weights=weights, seq_len=seq_len,
        heads=tuple(full.heads_in(i) for i in per_layer), kept_heads=tuple(slim.heads_in(i) for i in per_layer),
        neurons=tuple(full.intermediate_in(i) for i in per_layer),
        kept_neurons=tuple(slim.intermediate_in(i) for i in per_layer),
        params_full=parameter_count(full), params_slim=parameter_count(slim),
        flops_full=training_flops_per_sequence(full, seq_len, masked),
        flops_slim=training_flops_per_sequence(slim, seq_len, masked))


# -- the search, for a training loop --------------------------------------------------------------


@dataclass(frozen=True)
class MaskCheck:
    """One look at the masks: the newest against each earlier one in the window (oldest first)."""

    step: int
    kept_heads: tuple[int, ...]
    kept_neurons: tuple[int, ...]
    head_distances: tuple[float, ...]
    neuron_distances: tuple[float, ...]
    emerged: bool

    @property
    def distance(self) -> float | None:
        """The largest distance to an earlier mask (the value held against the threshold)."""
        pairs = zip(self.head_distances, self.neuron_distances, strict=True)
        return max((max(pair) for pair in pairs), default=None)

    def scalars(self) -> dict[str, float]:
        if self.distance is None:
            return {}
        return {"earlybert/mask_distance": self.distance, "earlybert/head_mask_distance": max(self.head_distances),
                "earlybert/neuron_mask_distance": max(self.neuron_distances)}

    def line(self) -> str:
        shown = "  ".join(f"{max(h, n):.3f}" for h, n in zip(self.head_distances, self.neuron_distances, strict=True))
        return (f"earlybert: step {self.step}  mask distance to the previous {len(self.head_distances)}: "
                f"{shown or '-'}  kept heads {sum(self.kept_heads)} neurons {sum(self.kept_neurons)}"
                + ("  -> ticket emerged" if self.emerged else ""))


class TicketSearch:
    """The search phase of a training loop.

        search = TicketSearch(model, cfg)           # before the optimizer / PLDEngine is built
        ...each optimizer step:  if search.observe(step, model): slim = search.draw(model)

    Gives the model its coefficients if it has none, remembers its weights for "rewind", and (unless
    penalty_in_loss is False, for loops that compute the loss outside the model: add `penalty(model, out.gates)`
    yourself) makes the model's training loss carry the L1 penalty until the draw.
    """

    def __init__(self, model: nn.Module, cfg: EarlyBertConfig, *, penalty_in_loss: bool = True,
                 penalty_layers: str = "all") -> None:
        bert = enable_slimming(_bert(model))
        _refuse_zero3(bert)
        self.cfg = cfg
        self.full_config: BertConfig = bert.config
        self.detector = EarlyBirdDetector(cfg.window, cfg.threshold)
        self.start_state = ({k: v.detach().to("cpu", copy=True) for k, v in bert.state_dict().items()}
                            if cfg.weights == "rewind" else None)
        self.checks: list[MaskCheck] = []
        self.emergence_step: int | None = None
        self.report: TicketReport | None = None
        self._emerged_masks: TicketMasks | None = None
        self.last_step = 0
        self.penalty_layers = penalty_layers
        self._handle = (add_penalty_to_loss(bert, cfg.lambda_heads, cfg.lambda_neurons, penalty_layers)
                        if penalty_in_loss else None)

    def penalty(self, model: nn.Module, gates: Sequence[tuple[bool, float]] | None = None) -> torch.Tensor:
        """The L1 penalty for a forward that drew PLD `gates` (its output's `gates`; None: every layer ran)."""
        return l1_penalty(model, self.cfg.lambda_heads, self.cfg.lambda_neurons,
                          penalty_weights(gates, self.penalty_layers))

    def masks(self, model: nn.Module) -> TicketMasks:
        return masks_from_model(model, self.cfg.head_prune_ratio, self.cfg.neuron_prune_ratio)

    def observe(self, step: int, model: nn.Module) -> bool:
        """After optimizer step `step`: check the masks if the step is due; True once the search is over
        (the ticket emerged, or max_search_steps is reached)."""
        self.last_step = step
        if step % self.cfg.check_interval == 0 and self.emergence_step is None:
            _refuse_zero3(_bert(model))
            masks = self.masks(model)
            distances, emerged = self.detector.update(masks)
            self.checks.append(MaskCheck(step, masks.kept_heads(), masks.kept_neurons(),
                                         tuple(h for h, _ in distances), tuple(n for _, n in distances), emerged))
            if emerged:
                self.emergence_step, self._emerged_masks = step, masks
        return self.emergence_step is not None or 0 < self.cfg.max_search_steps <= step

    def check_at(self, step: int) -> MaskCheck | None:
        """The check made at `step`, if there was one (for logging)."""
        return self.checks[-1] if self.checks and self.checks[-1].step == step else None

    def draw(self, model: nn.Module, seq_len: int = 128) -> nn.Module:
        """The slim model (fp32, CPU): the emerged ticket's masks, or the current ones if it has not
        emerged; the weights of the search's start ("rewind") or the current ones ("continue").
        Removes the penalty from `model`'s loss; fills `report` (FLOPs counted at `seq_len`)."""
        bert = _bert(model)
        _refuse_zero3(bert)
        masks = self._emerged_masks if self._emerged_masks is not None else self.masks(bert)
        slim = prune(bert, masks, self.start_state)
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.report = ticket_report(self.full_config, slim.config, emergence_step=self.emergence_step,
                                    drawn_at=self.last_step, weights=self.cfg.weights, seq_len=seq_len)
        return slim


# -- search, then slim: the component pld-pretrain's loop calls ----------------------------------------

TICKET_FILE = "ticket.json"  # the slim model's BertConfig, once the ticket is drawn
RECORD_FILE = "earlybert.json"  # the search's outcome: steps, emergence, what was kept
RUN_CONFIG_FILE = "run_config.json"  # the run's resolved settings; the draw puts the slim model in it


def start_phase(cfg: EarlyBertConfig, model_cfg: BertConfig, output: Path, resuming: bool
                ) -> tuple[BertConfig, int, bool]:
    """(the model a run starts with, the step on the run's axis where its engine's step 0 lies, whether it
    searches). A resumed run whose ticket was drawn continues the slim model from the step the search ended;
    otherwise an EarlyBERT run searches from the start (the search keeps no checkpoints) on a model with
    slimming coefficients."""
    from pld_ds.config import model_config

    if not cfg.enabled:
        return model_cfg, 0, False
    if resuming and (output / TICKET_FILE).is_file():
        record = read_json(output / RECORD_FILE, "EarlyBERT record")
        return model_config(str(output / TICKET_FILE)), int(record["search_steps"]), False
    return dataclasses.replace(model_cfg, slimming=True), 0, True


class SearchThenSlim:
    """EarlyBERT in a training loop, called after every optimizer step. While the search runs it observes
    the coefficients, writes each mask check (scalars, a console line); once the search is over it draws the
    ticket, records it under the run's output folder (ticket.json, earlybert.json, the slim model in
    run_config.json), releases the search's engine and returns the slim model's engine from ``build_engine``
    with the step it starts at. Without a search (EarlyBERT off, or resumed in the slim phase) it does nothing.

    ``resolved``: the run's settings as written to run_config.json (and into checkpoints); its "model" becomes
    the slim model's. ``log``: prints a line once (rank 0); ``writes``: whether this rank writes the files."""

    def __init__(self, search: TicketSearch | None, *, output: Path, resolved: dict[str, Any], seq_len: int,
                 build_engine: Callable[[nn.Module], Any], compile_backend: str | None = None,
                 log: Callable[[str], None] = print, writes: bool = True) -> None:
        self.search, self.output, self.resolved, self.seq_len = search, Path(output), resolved, seq_len
        self.build_engine, self.compile_backend, self.log, self.writes = build_engine, compile_backend, log, writes

    @property
    def searching(self) -> bool:
        return self.search is not None

    def after_step(self, step: int, engine: Any) -> tuple[Any, int] | None:
        """After optimizer step ``step`` (on the run's axis): None, or (the slim model's engine, ``step``) once
        the ticket is drawn; the engine passed in is then released."""
        if self.search is None:
            return None
        over = self.search.observe(step, engine.module)
        if (check := self.search.check_at(step)) is not None:
            engine.write_scalars(check.scalars(), step)
            self.log(check.line())
        if not over:
            return None
        return self._draw(step, engine), step

    def _draw(self, step: int, engine: Any) -> Any:
        from pld_ds.checkpoint import write_text_atomic

        search, self.search = self.search, None
        slim = search.draw(engine.module, seq_len=self.seq_len)
        report = search.report
        for line in report.lines():
            self.log(line)
        engine.write_scalars(report.scalars(), step)
        self.resolved["model"] = dataclasses.asdict(slim.config)
        if self.writes:
            write_text_atomic(self.output / TICKET_FILE, json.dumps(dataclasses.asdict(slim.config), indent=2))
            record = {"search_steps": step, "emergence_step": report.emergence_step, "weights": report.weights,
                      "kept_heads": list(report.kept_heads), "kept_neurons": list(report.kept_neurons),
                      "param_reduction": report.param_reduction, "flop_reduction": report.flop_reduction}
            write_text_atomic(self.output / RECORD_FILE, json.dumps(record, indent=2))
            write_text_atomic(self.output / RUN_CONFIG_FILE, json.dumps(self.resolved, indent=2))
        engine.destroy()
        if self.compile_backend:
            slim.compile_layers(backend=self.compile_backend)
        return self.build_engine(slim)
