"""PreLN BERT for pretraining, with Progressive Layer Dropping as a forward argument.

PreLN: every sublayer normalises its input (x + f(LN(x))) and the encoder ends with a LayerNorm,
which keeps training stable when layers are dropped. `layer_norm="post"` gives the original BERT
layout instead (PostLN: LN(x + f(x)) after each residual add, no final LayerNorm), the baseline of
the PLD paper. Plain PyTorch: nothing here knows DeepSpeed.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pld_ds import pld
from pld_ds.data.schema import IGNORE_INDEX


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30528  # BERT's 30522 padded to a multiple of 64 for tensor cores
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    activation_checkpointing: bool = False
    # Run the encoder on the real tokens only, attention through nested (jagged) tensors: the same outputs
    # at every real position as the padded path, with no compute spent on padding. False: padded SDPA.
    unpadded: bool = False
    # EarlyBERT (pld_ds.earlybert). A slim model keeps layer_heads[l] heads (of head size
    # hidden_size / num_heads) and layer_intermediate[l] feed-forward neurons in layer l; None: all of them.
    layer_heads: tuple[int, ...] | None = None
    layer_intermediate: tuple[int, ...] | None = None
    # Learnable slimming coefficients, initialised to 1: one per attention head, one per FFN neuron.
    slimming: bool = False
    # "pre": LayerNorm on each sublayer's input and a final LayerNorm (PreLN, stable under PLD);
    # "post": LayerNorm after each residual add, none at the end (PostLN, the original BERT).
    layer_norm: str = "pre"
    # Next-sentence prediction head (pooler + classifier). False: MLM only (RoBERTa), no NSP cost.
    nsp: bool = True

    def __post_init__(self) -> None:
        problems = []
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                problems.append(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                problems.append(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if not self.layer_norm_eps > 0:
            problems.append(f"layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")
        if not self.initializer_range >= 0:
            problems.append(f"initializer_range must be >= 0, got {self.initializer_range!r}")
        if self.layer_norm not in ("pre", "post"):
            problems.append(f"layer_norm must be \"pre\" or \"post\", got {self.layer_norm!r}")
        if not problems and self.hidden_size % self.num_heads:
            problems.append(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if not problems:
            problems += self._check_layer_widths()
        if problems:
            raise ValueError("; ".join(problems))

    def _check_layer_widths(self) -> list[str]:
        """layer_heads / layer_intermediate: one count per layer, from 1 (a layer keeps at least one head
        and one neuron) to the full width; JSON lists become tuples so the config stays hashable."""
        problems = []
        for name, full in (("layer_heads", self.num_heads), ("layer_intermediate", self.intermediate_size)):
            widths = getattr(self, name)
            if widths is None:
                continue
            if not isinstance(widths, (list, tuple)):
                problems.append(f"{name} must be a list of {self.num_layers} integers, got {widths!r}")
                continue
            object.__setattr__(self, name, tuple(widths))
            if len(widths) != self.num_layers:
                problems.append(f"{name} must have one entry per layer ({self.num_layers}), got {len(widths)}")
            bad = [w for w in widths if not isinstance(w, int) or isinstance(w, bool) or not 1 <= w <= full]
            if bad:
                problems.append(f"{name} entries must be integers in [1, {full}], got {bad[0]!r}")
        return problems

    def heads_in(self, layer: int) -> int:
        """Attention heads of 0-based `layer`."""
        return self.num_heads if self.layer_heads is None else self.layer_heads[layer]

    def intermediate_in(self, layer: int) -> int:
        """Feed-forward width of 0-based `layer`."""
        return self.intermediate_size if self.layer_intermediate is None else self.layer_intermediate[layer]


@dataclass
class PretrainingOutput:
    loss: torch.Tensor | None = None
    mlm_loss: torch.Tensor | None = None
    nsp_loss: torch.Tensor | None = None
    # Logits at the masked positions only (M x vocab) when labels are given, else B x S x vocab.
    mlm_logits: torch.Tensor | None = None
    nsp_logits: torch.Tensor | None = None
    # Number of layers that ran (all of them outside PLD training).
    layers_run: int = 0
    # The PLD gates this forward drew, (kept, keep probability) per layer; None: every layer ran unscaled.
    gates: list[tuple[bool, float]] | None = None
    # A regulariser that `loss` includes and mlm_loss + nsp_loss do not (EarlyBERT's L1 term), for logging.
    l1_penalty: torch.Tensor | None = None


class Embeddings(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word(input_ids) + self.position(positions) + self.token_type(token_type_ids)
        return self.dropout(self.norm(x))


@dataclass(frozen=True, eq=False)
class Packing:
    """Where the real tokens of a padded B x S batch lie. The unpadded path runs the encoder on them alone,
    one row per token, sequence after sequence, so every linear layer skips the padding too."""

    index: torch.Tensor  # flat positions b * S + s of the real tokens, in order
    offsets: torch.Tensor  # B + 1 entries: the first packed row of each sequence, then the number of rows
    max_len: int  # the longest sequence
    shape: tuple[int, int]  # (B, S)

    @classmethod
    def from_mask(cls, attention_mask: torch.Tensor) -> Packing:
        """attention_mask: B x S, nonzero where a token is real."""
        real = attention_mask.bool()
        lengths = real.sum(1)
        if not bool(lengths.all()):
            raise ValueError("unpadded attention: a row of attention_mask has no real token "
                             f"(lengths {lengths.tolist()}); every sequence needs at least one")
        offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
        return cls(real.flatten().nonzero().squeeze(1), offsets, int(lengths.max()), tuple(real.shape))

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """B x S x H -> T x H, the real tokens only."""
        return x.flatten(0, 1).index_select(0, self.index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """T x H -> B x S x H, zeros at the padding."""
        out = x.new_zeros(self.shape[0] * self.shape[1], x.shape[-1]).index_copy(0, self.index, x)
        return out.view(*self.shape, x.shape[-1])


class SelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig, index: int = 0) -> None:
        super().__init__()
        self.num_heads = cfg.heads_in(index)
        self.head_dim = cfg.hidden_size // cfg.num_heads
        width = self.num_heads * self.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, 3 * width)  # one GEMM for Q, K and V
        self.out = nn.Linear(width, cfg.hidden_size)
        self.attention_dropout = cfg.attention_dropout
        self.dropout = nn.Dropout(cfg.hidden_dropout)
        self.head_coef = nn.Parameter(torch.ones(self.num_heads)) if cfg.slimming else None

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | Packing | None) -> torch.Tensor:
        if isinstance(attn_mask, Packing):
            return self.dropout(self.out(self._unpadded_context(x, attn_mask)))
        batch, seq, _ = x.shape
        q, k, v = self.qkv(x).view(batch, seq, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        context = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attention_dropout if self.training else 0.0
        )
        if self.head_coef is not None:  # EarlyBERT: each head's context times its coefficient
            context = context * self.head_coef.to(context.dtype)[:, None, None]
        context = context.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim)
        return self.dropout(self.out(context))

    def _unpadded_context(self, x: torch.Tensor, packing: Packing) -> torch.Tensor:
        """x: T x H packed tokens; each sequence attends to its own tokens (SDPA on jagged nested tensors:
        varlen FlashAttention / memory-efficient kernels on a GPU, the math kernel per sequence on a CPU)."""
        tokens = x.shape[0]
        qkv = self.qkv(x).view(tokens, 3, self.num_heads, self.head_dim)
        q, k, v = (torch.nested.nested_tensor_from_jagged(part.contiguous(), packing.offsets,
                                                          max_seqlen=packing.max_len).transpose(1, 2)
                   for part in qkv.unbind(1))
        context = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attention_dropout if self.training else 0.0)
        context = context.transpose(1, 2).values()  # T x heads x head_dim
        if self.head_coef is not None:
            context = context * self.head_coef.to(context.dtype)[:, None]
        return context.reshape(tokens, self.num_heads * self.head_dim)


class FeedForward(nn.Module):
    def __init__(self, cfg: BertConfig, index: int = 0) -> None:
        super().__init__()
        width = cfg.intermediate_in(index)
        self.fc1 = nn.Linear(cfg.hidden_size, width)
        self.fc2 = nn.Linear(width, cfg.hidden_size)
        self.dropout = nn.Dropout(cfg.hidden_dropout)
        self.neuron_coef = nn.Parameter(torch.ones(width)) if cfg.slimming else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.gelu(self.fc1(x))
        if self.neuron_coef is not None:  # EarlyBERT: each neuron's activation times its coefficient
            hidden = hidden * self.neuron_coef.to(hidden.dtype)
        return self.dropout(self.fc2(hidden))


class Layer(nn.Module):
    """x + f(LN(x)) (PreLN) or LN(x + f(x)) (PostLN) for attention then feed-forward; a kept PLD layer
    scales f's output by 1/p. attn_norm and ffn_norm are the LayerNorms of the two sublayers in either layout."""

    def __init__(self, cfg: BertConfig, index: int = 0) -> None:
        super().__init__()
        self.post_ln = cfg.layer_norm == "post"
        self.attn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = SelfAttention(cfg, index)
        self.ffn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.ffn = FeedForward(cfg, index)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | Packing | None, keep_prob: float = 1.0,
                inv_keep_prob: torch.Tensor | None = None) -> torch.Tensor:
        """inv_keep_prob: 1/keep_prob as a 0-dim tensor on x's device, which replaces keep_prob. A compiled
        layer is given that: one graph serves every value of theta, with no guard on it and no host scalar."""
        if self.post_ln:
            x = self.attn_norm(self._residual(x, self.attn(x, attn_mask), keep_prob, inv_keep_prob))
            return self.ffn_norm(self._residual(x, self.ffn(x), keep_prob, inv_keep_prob))
        attn = self.attn(self.attn_norm(x), attn_mask)
        x = self._residual(x, attn, keep_prob, inv_keep_prob)
        ffn = self.ffn(self.ffn_norm(x))
        return self._residual(x, ffn, keep_prob, inv_keep_prob)

    @staticmethod
    def _residual(x: torch.Tensor, out: torch.Tensor, keep_prob: float, inv: torch.Tensor | None) -> torch.Tensor:
        if inv is not None:
            return x + out * inv
        return x + out if keep_prob == 1.0 else torch.add(x, out, alpha=1.0 / keep_prob)


class Encoder(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Layer(cfg, i) for i in range(cfg.num_layers))
        # PostLN layers end normalised already: no final LayerNorm (and none in the state dict).
        self.final_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps) if cfg.layer_norm == "pre" \
            else nn.Identity()
        self.activation_checkpointing = cfg.activation_checkpointing
        self.unpadded = cfg.unpadded
        self.compiled = False  # set by BertForPreTraining.compile_layers

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None, gates: list[tuple[bool, float]] | None = None
    ) -> tuple[torch.Tensor, int]:
        inv: list[torch.Tensor | None] = [None] * len(self.layers)
        if gates is None:
            gates = [(True, 1.0)] * len(self.layers)
        elif self.compiled:
            # Compiled layers take 1/p as a device tensor: one small copy per forward, and one graph for PLD
            # training whatever theta is.
            inv = list(torch.tensor([1.0 / p for _, p in gates]).to(x.device, non_blocking=True).unbind())
        packing = None
        if self.unpadded and attn_mask is not None:
            packing = Packing.from_mask(attn_mask[:, 0, 0, :])
            x, attn_mask = packing.pack(x), packing
        layers_run = 0
        for layer, (kept, keep_prob), inv_p in zip(self.layers, gates, inv, strict=True):
            if not kept:
                continue  # identity: no kernel runs, no gradient reaches this layer
            if self.activation_checkpointing and self.training:
                # The non-reentrant checkpoint cannot save the nested tensors of the unpadded attention
                x = checkpoint(layer, x, attn_mask, keep_prob, inv_p, use_reentrant=packing is not None)
            else:
                x = layer(x, attn_mask, keep_prob, inv_p)
            layers_run += 1
        x = self.final_norm(x)
        return (x if packing is None else packing.unpack(x)), layers_run


class PretrainingHeads(nn.Module):
    def __init__(self, cfg: BertConfig, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        self.transform = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.transform_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size)
        self.decoder.weight = word_embeddings.weight  # tied, as in BERT
        if cfg.nsp:
            self.pooler = nn.Linear(cfg.hidden_size, cfg.hidden_size)
            self.nsp = nn.Linear(cfg.hidden_size, 2)

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform_norm(F.gelu(self.transform(hidden))))

    def nsp_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.nsp(torch.tanh(self.pooler(hidden[:, 0])))


class BertForPreTraining(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.heads = PretrainingHeads(cfg, self.embeddings.word)
        self.apply(self._init_weights)
        # PreLN: residual projections get a smaller init so the residual stream's variance does not grow
        # with depth (GPT-2's scaled init). PostLN normalises after every add: BERT's plain init.
        residual_std = cfg.initializer_range / math.sqrt(2 * cfg.num_layers)
        for layer in self.encoder.layers if cfg.layer_norm == "pre" else ():
            nn.init.normal_(layer.attn.out.weight, std=residual_std)
            nn.init.normal_(layer.ffn.fc2.weight, std=residual_std)

    def compile_layers(self, **compile_kwargs: Any) -> BertForPreTraining:
        """torch.compile each encoder layer on its own: the Python loop that skips dropped layers stays
        eager. The layers share their graphs: one for PLD training (1/p a tensor input), one for training
        without PLD, one for evaluation."""
        for layer in self.encoder.layers:
            layer.compile(**compile_kwargs)
        self.encoder.compiled = True
        return self

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        masked_lm_labels: torch.Tensor | None = None,
        next_sentence_labels: torch.Tensor | None = None,
        *,
        progressive_layer_drop: bool = False,
        pld_theta: float = 1.0,
        pld_generator: torch.Generator | None = None,
    ) -> PretrainingOutput:
        """Masked LM and next-sentence losses for a batch.

        attention_mask: B x S, nonzero where a token is real. masked_lm_labels: B x S token ids,
        IGNORE_INDEX where there is no target; the decoder runs only at the labelled positions.
        progressive_layer_drop / pld_theta: the keyword arguments DeepSpeed's engine injects in
        training; pld_generator makes the gates reproducible (see pld.gate_generator).
        """
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        attn_mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        gates = None
        if progressive_layer_drop and self.training:
            if self.config.layer_norm == "post":
                warnings.warn("Progressive Layer Dropping on a PostLN model: the PLD paper found this unstable "
                              "(it pairs PLD with PreLN); expect divergence at PLD's learning rates", stacklevel=2)
            gates = pld.sample_gates(self.config.num_layers, pld_theta, pld_generator)
        hidden, layers_run = self.encoder(self.embeddings(input_ids, token_type_ids), attn_mask, gates)

        nsp_logits = self.heads.nsp_logits(hidden) if self.config.nsp else None
        out = PretrainingOutput(nsp_logits=nsp_logits, layers_run=layers_run, gates=gates)
        if masked_lm_labels is None:
            out.mlm_logits = self.heads.mlm_logits(hidden)
        else:
            selected = masked_lm_labels != IGNORE_INDEX
            out.mlm_logits = self.heads.mlm_logits(hidden[selected])
            out.mlm_loss = F.cross_entropy(out.mlm_logits.float(), masked_lm_labels[selected])
            out.loss = out.mlm_loss
        if next_sentence_labels is not None and nsp_logits is not None:  # MLM-only models ignore NSP labels
            out.nsp_loss = F.cross_entropy(out.nsp_logits.float(), next_sentence_labels.view(-1).long())
            out.loss = out.nsp_loss if out.loss is None else out.loss + out.nsp_loss
        return out


# -- fine-tuning --------------------------------------------------------------------------------


@dataclass
class ClassifierOutput:
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # B x num_labels (B x 1 for regression)


class BertForSequenceClassification(nn.Module):
    """The pretraining model's embeddings and encoder with BERT's pooler and a new linear classifier.

    Every layer runs (no PLD). num_labels == 1 is regression (mean squared error), as in GLUE's STS-B.
    """

    def __init__(self, cfg: BertConfig, num_labels: int) -> None:
        super().__init__()
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        self.config = cfg
        self.num_labels = num_labels
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.pooler = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.dropout = nn.Dropout(cfg.hidden_dropout)
        self.classifier = nn.Linear(cfg.hidden_size, num_labels)
        # The same initialisation as the pretraining model (it reads only self.config).
        self.apply(lambda module: BertForPreTraining._init_weights(self, module))  # type: ignore[arg-type]

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> ClassifierOutput:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        attn_mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        hidden, _ = self.encoder(self.embeddings(input_ids, token_type_ids), attn_mask)
        pooled = torch.tanh(self.pooler(hidden[:, 0]))
        out = ClassifierOutput(logits=self.classifier(self.dropout(pooled)))
        if labels is not None:
            logits = out.logits.float()
            if self.num_labels == 1:
                out.loss = F.mse_loss(logits.squeeze(-1), labels.float())
            else:
                out.loss = F.cross_entropy(logits, labels.long())
        return out


def load_pretraining_weights(model: BertForSequenceClassification, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Copy a BertForPreTraining state dict (embeddings, encoder, pooler) into a classifier.

    The MLM and NSP heads are left out; returns the names that stay newly initialised (the classifier's, and
    the pooler's when the model was pretrained without NSP).
    Raises KeyError or RuntimeError when the state dict does not fit the model.
    """
    mapped = {}
    for name, tensor in state_dict.items():
        if name.startswith(("embeddings.", "encoder.")):
            mapped[name] = tensor
        elif name.startswith("heads.pooler."):
            mapped["pooler." + name.removeprefix("heads.pooler.")] = tensor
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    # An MLM-only model (nsp false) has no pooler: the classifier's pooler then starts fresh too.
    fresh = ("classifier.",) if any(n.startswith("pooler.") for n in mapped) else ("classifier.", "pooler.")
    absent = [name for name in missing if not name.startswith(fresh)]
    for problem, names in (("lacks", absent), ("has unknown", unexpected)):
        if names:
            raise KeyError(f"pretraining state dict {problem} {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}")
    return missing
