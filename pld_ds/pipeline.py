"""Pipeline parallelism for BertForPreTraining: K stages x D data-parallel replicas, with PLD on every stage.

The model is cut into K stages of consecutive layers (stage 0 holds the embeddings, stage K-1 the final
LayerNorm and the heads), balanced by estimated compute. Each rank holds one stage; the D ranks of a stage
form its data-parallel group (DeepSpeed's engine, ZeRO 0 or 1, runs inside it). Activations go forward and
error gradients backward with torch.distributed point-to-point messages.

Two schedules, one code path: at optimizer step t, stage k runs the forward of batch t (forward passes stay
in order) and the backward of batch t - s_k, where s_k is its staleness.

* ``sync``: s_k = 0. GPipe with a flush every optimizer step: the same loss at every step as one process.
* ``ouroboros``: s_k = d (K-1-k) (d = 1: Decoupled Parallel Backprop's rule, used by Ouroboros). Stage k uses
  the error gradient that stage k+1 produced one step earlier, so no stage waits for a later stage's backward
  and there is no flush; each stage steps as soon as its own backward is done. The weights moved since the
  forward, so a stale stage keeps its input (and dropout RNG state and PLD gates) and recomputes the forward
  with its current weights before the backward: the gradient DDG's analysis is about, and memory for K-1-k
  inputs instead of K-1-k copies of the stage's weights and optimizer-free activations (docs/pipeline.md).

PLD: every stage draws all L gates from pld.gate_generator(seed, step, micro-step) and keeps its slice, so the
stages agree with no message; a dropped layer runs no kernel.

The word embedding is tied to the MLM decoder. Stage 0 and stage K-1 each hold a copy and exchange their
gradient contributions every step, so both copies take the same update and stay equal: in the same step for
the sync schedule, one step late (no lock between the first and last stage) for Ouroboros.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from pld_ds import checkpoint as ckpt_io
from pld_ds import pld
from pld_ds.config import ConfigError, PipelineConfig, RunConfig, pipeline_config, split_ds_config
from pld_ds.data.schema import IGNORE_INDEX
from pld_ds.model import BertConfig, BertForPreTraining, PretrainingOutput

# -- partition --------------------------------------------------------------------------------------


def unit_costs(cfg: BertConfig, method: str, seq_len: int = 128, masked_fraction: float = 0.15) -> list[float]:
    """Cost of [embeddings, layer 0, ..., layer L-1, heads] for balancing: forward FLOPs per sequence
    ("compute"/"best"), parameters ("parameters"), or one per layer ("uniform")."""
    h, s, v = cfg.hidden_size, seq_len, cfg.vocab_size
    layers = []
    for i in range(cfg.num_layers):
        width = cfg.heads_in(i) * (h // cfg.num_heads)
        inter = cfg.intermediate_in(i)
        if method == "parameters":
            layers.append(float(h * 3 * width + width * h + 2 * h * inter + 4 * h))
        elif method == "uniform":
            layers.append(1.0)
        else:  # QKV, output projection, feed-forward; attention scores and context
            layers.append(2.0 * s * (3 * h * width + width * h + 2 * h * inter) + 4.0 * s * s * width)
    if method == "parameters":
        embeddings = float((v + cfg.max_position_embeddings + cfg.type_vocab_size) * h)
        heads = float(h * h + v * h + (h * h if getattr(cfg, "nsp", True) else 0))  # the decoder copy lives here too
    elif method == "uniform":
        embeddings = heads = 0.0
    else:
        embeddings = 10.0 * s * h
        masked = masked_fraction * s
        heads = 2.0 * masked * (h * h + h * v) + 2.0 * (h * h + 2 * h)
    return [embeddings, *layers, heads]


def partition_layers(costs: list[float], stages: int) -> list[range]:
    """Contiguous layer ranges, at least one layer per stage, minimising the most expensive stage; stage 0 also
    pays costs[0] (embeddings) and the last stage costs[-1] (heads)."""
    layer_costs = costs[1:-1]
    n = len(layer_costs)
    if not 1 <= stages <= n:
        raise ValueError(f"cannot cut {n} layers into {stages} stages")
    prefix = [0.0]
    for c in layer_costs:
        prefix.append(prefix[-1] + c)

    def stage_cost(k: int, start: int, end: int) -> float:
        extra = (costs[0] if k == 0 else 0.0) + (costs[-1] if k == stages - 1 else 0.0)
        return prefix[end] - prefix[start] + extra

    inf = float("inf")
    # best[k][i]: the smallest maximum over stages 0..k holding layers [0, i); cut[k][i]: where stage k starts.
    best = [[inf] * (n + 1) for _ in range(stages)]
    cut = [[0] * (n + 1) for _ in range(stages)]
    for i in range(1, n + 1):
        best[0][i] = stage_cost(0, 0, i)
    for k in range(1, stages):
        for i in range(k + 1, n + 1):
            for j in range(k, i):
                value = max(best[k - 1][j], stage_cost(k, j, i))
                if value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    bounds, end = [], n
    for k in range(stages - 1, 0, -1):
        start = cut[k][end]
        bounds.append(range(start, end))
        end = start
    bounds.append(range(0, end))
    return bounds[::-1]


class Stage(nn.Module):
    """A slice of a BertForPreTraining: the same module objects, so a stage is not a second copy of the model."""

    def __init__(self, model: BertForPreTraining, index: int, num_stages: int, layers: range,
                 checkpoint_interval: int = 0) -> None:
        super().__init__()
        self.config = model.config
        self.index, self.num_stages, self.layer_ids = index, num_stages, list(layers)
        self.first, self.last = index == 0, index == num_stages - 1
        self.embeddings = model.embeddings if self.first else None
        self.layers = nn.ModuleList(model.encoder.layers[i] for i in layers)
        self.final_norm = model.encoder.final_norm if self.last else None
        self.heads = model.heads if self.last else None
        self.checkpoint_interval = checkpoint_interval or (1 if model.config.activation_checkpointing else 0)

    def tied_weight(self) -> nn.Parameter | None:
        """This stage's copy of the word embedding / MLM decoder weight (first and last stage only)."""
        if self.first:
            return self.embeddings.word.weight
        if self.last:
            return self.heads.decoder.weight
        return None

    def model_names(self) -> dict[str, str]:
        """Parameter name in this stage -> name in BertForPreTraining (for merging the stages of a checkpoint)."""
        names = {}
        for name, _ in self.named_parameters():
            if name.startswith("layers."):
                j, rest = name.split(".", 2)[1:]
                names[name] = f"encoder.layers.{self.layer_ids[int(j)]}.{rest}"
            elif name.startswith("final_norm."):
                names[name] = "encoder." + name
            else:
                names[name] = name
        return names

    def forward(self, hidden: torch.Tensor | None, batch: dict[str, torch.Tensor],
                gates: list[tuple[bool, float]] | None) -> torch.Tensor | PretrainingOutput:
        """Stage 0 embeds batch's ids (hidden is None); a last stage returns the losses, others the hidden states."""
        mask = batch.get("attention_mask")
        attn_mask = None if mask is None else mask.bool()[:, None, None, :]
        if self.first:
            ids = batch["input_ids"]
            types = batch.get("token_type_ids")
            hidden = self.embeddings(ids, torch.zeros_like(ids) if types is None else types)
        mine = [(True, 1.0)] * len(self.layers) if gates is None else [gates[i] for i in self.layer_ids]
        kept = [(layer, p) for layer, (keep, p) in zip(self.layers, mine, strict=True) if keep]  # dropped: no kernel
        chunk = self.checkpoint_interval if self.training else 0
        if chunk:
            for start in range(0, len(kept), chunk):
                hidden = checkpoint(self._run, hidden, attn_mask, kept[start:start + chunk], use_reentrant=False)
        else:
            hidden = self._run(hidden, attn_mask, kept)
        if not self.last:
            return hidden
        return self._heads(self.final_norm(hidden), batch, len(kept))

    @staticmethod
    def _run(hidden: torch.Tensor, attn_mask: torch.Tensor | None, kept: list[tuple[nn.Module, float]]) -> torch.Tensor:
        for layer, keep_prob in kept:
            hidden = layer(hidden, attn_mask, keep_prob)
        return hidden

    def _heads(self, hidden: torch.Tensor, batch: dict[str, torch.Tensor], layers_run: int) -> PretrainingOutput:
        """What BertForPreTraining.forward does after its encoder."""
        nsp = getattr(self.config, "nsp", True)
        out = PretrainingOutput(nsp_logits=self.heads.nsp_logits(hidden) if nsp else None, layers_run=layers_run)
        labels = batch.get("masked_lm_labels")
        if labels is None:
            out.mlm_logits = self.heads.mlm_logits(hidden)
        else:
            selected = labels != IGNORE_INDEX
            out.mlm_logits = self.heads.mlm_logits(hidden[selected])
            out.mlm_loss = torch.nn.functional.cross_entropy(out.mlm_logits.float(), labels[selected])
            out.loss = out.mlm_loss
        nsp_labels = batch.get("next_sentence_labels")
        if nsp_labels is not None and out.nsp_logits is not None:
            out.nsp_loss = torch.nn.functional.cross_entropy(out.nsp_logits.float(), nsp_labels.view(-1).long())
            out.loss = out.nsp_loss if out.loss is None else out.loss + out.nsp_loss
        return out


# -- process groups ---------------------------------------------------------------------------------


class StageGrid:
    """Rank layout and groups. Global rank 0 holds the last stage (the loss lives there, and rank 0 logs):
    stage k of data-parallel replica d is rank (K-1-k) * D + d, so a stage's D ranks are neighbours (one node).
    Passed to deepspeed.initialize as its `mpu`: DeepSpeed then sees one model per stage, data parallel over
    the stage's group."""

    def __init__(self, stages: int) -> None:
        world, rank = dist.get_world_size(), dist.get_rank()
        self.stages, self.dp = stages, world // stages
        self.stage, self.dp_rank = stages - 1 - rank // self.dp, rank % self.dp
        self.rank = rank
        # Every rank creates every group, in the same order (torch.distributed's rule).
        for k in range(stages):
            group = dist.new_group([self.rank_of(k, d) for d in range(self.dp)])
            if k == self.stage:
                self.dp_group = group
        for d in range(self.dp):
            group = dist.new_group(sorted(self.rank_of(k, d) for k in range(stages)))
            if d == self.dp_rank:
                self.pipe_group = group
        for r in range(world):
            group = dist.new_group([r])
            if r == rank:
                self.self_group = group

    def rank_of(self, stage: int, dp_rank: int | None = None) -> int:
        return (self.stages - 1 - stage) * self.dp + (self.dp_rank if dp_rank is None else dp_rank)

    # DeepSpeed's mpu interface
    def get_data_parallel_group(self) -> Any:
        return self.dp_group

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dp

    def get_data_parallel_group_ranks(self) -> list[int]:
        return [self.rank_of(self.stage, d) for d in range(self.dp)]

    def get_model_parallel_group(self) -> Any:
        return self.self_group

    def get_model_parallel_rank(self) -> int:
        return 0

    def get_model_parallel_world_size(self) -> int:
        return 1


# -- the engine -------------------------------------------------------------------------------------


def _inside_window(step: int) -> range:
    return range(max(0, step - 64), step)


class PipelineEngine:
    """The interface pld_ds.pretrain uses (train_batch, eval forward, save/load, scalars), on one pipeline stage."""

    def __init__(self, model: BertForPreTraining, config: str | Path | dict[str, Any], *, seed: int = 0,
                 output_dir: str | Path | None = None, pld_step_offset: int = 0, **initialize_kwargs: Any) -> None:
        """pld_step_offset: optimizer steps the weights had before this engine (theta and gates use
        global_steps + offset), as PLDEngine."""
        import deepspeed
        from deepspeed.runtime.config import DeepSpeedConfigError

        from pld_ds.engine import _default_launch_env, _monitors_under, _wandb_on_own_axes

        ds_config, self.pld, self.config_source = split_ds_config(config, pipeline_engine=True)
        self.pipe, _ = pipeline_config(config)
        source = self.config_source
        if output_dir is not None:
            ds_config = _monitors_under(ds_config, Path(output_dir))
        self.ds_config = ds_config
        for block in ("fp16", "bf16"):
            if isinstance(ds_config.get(block), dict) and ds_config[block].get("enabled"):
                raise ConfigError(f"{source}: {block}.enabled: not supported with a pipeline (expected fp32 or the "
                                  "torch_autocast block): DeepSpeed's fp16/bf16 optimizers expect its own backward, "
                                  "and a stage runs its backward from a received gradient")
        zero = ds_config.get("zero_optimization", {})
        zero_stage = zero.get("stage", 0) if isinstance(zero, dict) else 0
        _default_launch_env()
        if not dist.is_initialized():
            deepspeed.init_distributed()
        self.pipe.check_fit(dist.get_world_size(), model.config.num_layers, zero_stage, source)
        self.seed, self.pld_step_offset = seed, pld_step_offset
        self.num_layers = model.config.num_layers
        self._theta_used: float | None = None
        self._gates_total: torch.Tensor | None = None  # per layer: kept, sum of p, draws (since start)
        self.grid = StageGrid(self.pipe.stages)
        self.stage_index = self.grid.stage
        costs = unit_costs(model.config, self.pipe.partition)
        self.bounds = partition_layers(costs, self.num_stages)
        stage = Stage(model, self.stage_index, self.num_stages, self.bounds[self.stage_index],
                      self.pipe.activation_checkpoint_interval)
        stage_config = {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "tag_validation": "Ignore"}}
        params = [p for p in stage.parameters() if p.requires_grad]
        try:
            self.engine, _, _, _ = deepspeed.initialize(model=stage, model_parameters=params, config=stage_config,
                                                        mpu=self.grid, **initialize_kwargs)
        except (DeepSpeedConfigError, AssertionError, ValueError, TypeError) as err:
            first = str(err).strip().splitlines()
            raise ConfigError(f"{source}: DeepSpeed rejected the config: "
                              f"{' '.join(first[:3]) if first else type(err).__name__}") from err
        e = self.engine
        self.module: Stage = e.module
        _wandb_on_own_axes(e.monitor)
        ckpt_io.use_safe_loads(e)
        self._params = [p for p in self.module.parameters() if p.requires_grad]
        self._tied = self.module.tied_weight() if self.num_stages > 1 else None
        self._zero = bool(e.zero_optimization())
        self._plain = not (self._zero or getattr(e, "torch_autocast_z0_gradscaler", None) is not None)
        self._clip = 0.0
        if self._plain:  # we clip: over the whole pipeline in the sync schedule, per stage when gradients are stale
            self._clip, e._config.gradient_clipping = e.gradient_clipping(), 0.0
            e.zero_grad = self._zero_grad
        e.enable_backward_allreduce = False  # the data-parallel reduction runs once per step, from train_batch
        self._grad_norm: torch.Tensor | None = None
        self.nonfinite_skipped, self._nonfinite_run = 0, 0
        # Delayed-backward state: stage inputs kept for recomputation, error gradients received ahead of use,
        # the tied weight's gradient contributions of the previous step.
        self._stash: dict[int, list[dict[str, Any]]] = {}
        self._inbox_delta: dict[int, list[torch.Tensor]] = {}
        self._tied_own: dict[int, torch.Tensor] = {}
        self._tied_other: dict[int, torch.Tensor] = {}
        self._sends: list[tuple[int, Any, torch.Tensor]] = []
        self._idle, self._wall = 0.0, 0.0
        self.last_gates: list[list[tuple[bool, float]] | None] = []

    # -- the interface the training loop uses ---------------------------------------------------
    @property
    def global_steps(self) -> int:
        return self.engine.global_steps

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.engine.gradient_accumulation_steps()

    @property
    def micro_batch_size(self) -> int:
        return self.engine.train_micro_batch_size_per_gpu()

    @property
    def data_parallel(self) -> tuple[int, int]:
        """(rank, size) for the data loader: every stage of a replica reads the same batches."""
        return self.grid.dp_rank, self.grid.dp

    @property
    def num_stages(self) -> int:
        """K: the ranks that hold the stages of one replica (and count its samples once)."""
        return self.pipe.stages

    def get_pld_theta(self) -> float:
        """theta of the next step."""
        step = self.global_steps + self.pld_step_offset
        return pld.theta(step, self.pld.theta, self.pld.gamma) if self.pld.enabled else 1.0

    def theta_used(self) -> float:
        """theta the last training step ran with (theta of the next step before the first)."""
        return self.get_pld_theta() if self._theta_used is None else self._theta_used

    def keep_summary(self) -> list[str]:
        """The gates drawn over this engine's life: per layer, how often it was kept against the mean p_l."""
        return pld.keep_summary(self._gates_total)

    def expected_depth(self) -> float:
        return pld.expected_depth(self.num_layers, self.get_pld_theta())

    def staleness(self, step: int | None = None) -> int:
        return self.pipe.stage_staleness(self.stage_index, self.global_steps if step is None else step)

    def train(self, mode: bool = True) -> PipelineEngine:
        self.module.train(mode)
        return self

    def eval(self) -> PipelineEngine:
        """Evaluation mode; messages already sent for later training steps are received first, so the evaluation
        forwards cannot take them for their own."""
        if self.module.training:
            self.collect_in_flight()
        return self.train(False)

    # -- schedule helpers ---------------------------------------------------------------------------
    def _backward_batch(self, stage: int, step: int) -> int | None:
        """The batch whose backward `stage` runs at `step` (None while its delayed gradients are not there yet;
        batches before the end of the warm-up were done synchronously)."""
        s = self.pipe.stage_staleness(stage, step)
        if s == 0:
            return step
        batch = step - s
        return batch if batch >= self.pipe.warmup_steps else None

    def _tied_delayed(self, step: int) -> bool:
        return (self.pipe.schedule == "ouroboros" and self.pipe.staleness > 0 and step >= self.pipe.warmup_steps)

    def _send(self, tensor: torch.Tensor, stage: int) -> None:
        tensor = tensor.detach().float().contiguous()
        self._sends.append((self.global_steps, dist.isend(tensor, self.grid.rank_of(stage)), tensor))

    def _recv(self, shape: tuple[int, ...], stage: int) -> torch.Tensor:
        buffer = torch.empty(shape, dtype=torch.float32, device=self.device)
        start = time.perf_counter()
        dist.recv(buffer, self.grid.rank_of(stage))
        self._idle += time.perf_counter() - start
        return buffer

    def _finish_sends(self, older_than: int) -> None:
        """Wait for sends issued before step `older_than` (one step of slack keeps Ouroboros lock-free)."""
        keep = []
        for step, work, tensor in self._sends:
            if step < older_than:
                work.wait()
            else:
                keep.append((step, work, tensor))
        self._sends = keep

    def _recv_delta(self, batch: int, micro: int, shape: tuple[int, ...]) -> torch.Tensor:
        queued = self._inbox_delta.get(batch)
        if queued:
            delta = queued.pop(0)
            if not queued:
                del self._inbox_delta[batch]
            return delta
        return self._recv(shape, self.stage_index + 1)

    def _rng_state(self) -> dict[str, torch.Tensor]:
        state = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    @contextlib.contextmanager
    def _replay_rng(self, state: dict[str, torch.Tensor]) -> Iterator[None]:
        """The dropout masks of the original forward, without disturbing the global stream."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(state["cpu"])
            if "cuda" in state:
                torch.cuda.set_rng_state(state["cuda"], self.device)
            yield

    def _autocast(self) -> Any:
        from deepspeed.runtime.torch_autocast import autocast_if_enabled

        return autocast_if_enabled(self.engine)

    # -- one optimizer step -------------------------------------------------------------------------
    def train_batch(self, batches: Iterator[dict[str, torch.Tensor]], max_nonfinite: int = 0
                    ) -> dict[str, torch.Tensor]:
        """Forward of this step's gradient_accumulation_steps micro-batches, backward of the batch this stage's
        staleness allows, one optimizer step. Mean losses on the last stage (still on device), {} elsewhere."""
        wall = time.perf_counter()
        self.train()
        step, micro_batches = self.global_steps, self.gradient_accumulation_steps
        first, last, k = self.module.first, self.module.last, self.stage_index
        stale = self.staleness(step)
        theta_now = self.get_pld_theta()
        if last and self._tied is not None and self._tied_delayed(step) and self._tied_delayed(step - 1):
            if step - 1 not in self._tied_other:  # sent by stage 0 at the end of its previous step
                self._tied_other[step - 1] = self._recv(tuple(self._tied.shape), 0)
        self.last_gates = []
        live: list[tuple[torch.Tensor | None, Any]] = []
        for micro in range(micro_batches):
            batch = {key: value.to(self.device, non_blocking=True) for key, value in next(batches).items()}
            gates = None
            if self.pld.enabled:
                generator = pld.gate_generator(self.seed, step + self.pld_step_offset, micro)
                gates = pld.sample_gates(self.num_layers, theta_now, generator)
                drawn = torch.tensor([[float(kept), p, 1.0] for kept, p in gates], dtype=torch.float64)
                self._gates_total = drawn if self._gates_total is None else self._gates_total + drawn
            self.last_gates.append(gates)
            hidden = None if first else self._recv((*batch["input_ids"].shape, self.module.config.hidden_size), k - 1)
            if stale == 0:
                if hidden is not None:
                    hidden.requires_grad_(True)
                with self._autocast():
                    out = self.module(hidden, batch, gates)
                live.append((hidden, out))
            else:
                entry = {"hidden": hidden, "batch": batch, "gates": gates, "rng": self._rng_state()}
                self._stash.setdefault(step, []).append(entry)
                with torch.no_grad(), self._autocast():
                    out = self.module(hidden, batch, gates)
            if not last:
                self._send(out, k + 1)
        totals = self._backward(step, stale, live, max_nonfinite) if self._backward_batch(k, step) is not None else {}
        self._optimizer_step(step)
        self._finish_sends(older_than=step)
        self._theta_used = theta_now
        self._wall += time.perf_counter() - wall
        return totals

    def _backward(self, step: int, stale: int, live: list, max_nonfinite: int) -> dict[str, torch.Tensor]:
        first, last, k = self.module.first, self.module.last, self.stage_index
        micro_batches = self.gradient_accumulation_steps
        totals: dict[str, torch.Tensor] = {}
        batch_index = step - stale
        stash = self._stash.pop(batch_index, None) if stale else None
        for micro in range(micro_batches):
            if stale == 0:
                hidden, out = live[micro]
            else:
                entry = stash[micro]
                hidden = entry["hidden"]
                if hidden is not None:
                    hidden = hidden.detach().requires_grad_(True)
                with self._replay_rng(entry["rng"]), self._autocast():
                    out = self.module(hidden, entry["batch"], entry["gates"])
            if last:
                if max_nonfinite and not bool(torch.isfinite(out.loss.detach()).all()):
                    self._count_nonfinite(max_nonfinite)
                    if hidden is not None:
                        self._send(torch.zeros_like(hidden), k - 1)
                    continue
                self._nonfinite_run = 0
                (out.loss / micro_batches).backward()
                for name in ("loss", "mlm_loss", "nsp_loss"):
                    value = getattr(out, name, None)
                    if value is not None:
                        totals[name] = totals.get(name, 0.0) + value.detach().float() / micro_batches
            else:
                delta = self._recv_delta(batch_index, micro, tuple(out.shape))
                torch.autograd.backward(out, delta.to(out.dtype))
            if not first:
                self._send(hidden.grad if hidden.grad is not None else torch.zeros_like(hidden), k - 1)
        return totals

    def _count_nonfinite(self, patience: int) -> None:
        from pld_ds.engine import NonFiniteLoss

        self.nonfinite_skipped += 1
        self._nonfinite_run += 1
        if self._nonfinite_run > patience:
            raise NonFiniteLoss(f"loss was NaN or inf in {self._nonfinite_run} micro-batches in a row at step "
                                f"{self.global_steps} ({self.nonfinite_skipped} skipped in all): stopping; lower the "
                                "learning rate or resume from an earlier checkpoint")

    def _optimizer_step(self, step: int) -> None:
        e = self.engine
        if not self._zero:  # a parameter with no gradient (a layer PLD dropped, a stage still waiting for its
            for p in self._params:  # delayed gradient) steps with a zero one, as PLDEngine's ranks do
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        if self._tied is not None:
            self._exchange_tied(step)
        e.set_gradient_accumulation_boundary(True)
        if self.grid.dp > 1:
            e.allreduce_gradients()
        if self._plain:
            self._clip_gradients(step)
        e.step()
        e.set_gradient_accumulation_boundary(False)

    def _exchange_tied(self, step: int) -> None:
        """Both copies of the tied weight get the embedding's plus the decoder's contribution, summed in the same
        order, so they take the same update: this step's (sync) or the previous step's (Ouroboros)."""
        p, first = self._tied, self.module.first
        own = p.grad if p.grad is not None else torch.zeros_like(p)
        peer = self.num_stages - 1 if first else 0
        if not self._tied_delayed(step):
            self._send(own, peer)
            other = self._recv(tuple(p.shape), peer)
            p.grad = own + other if first else other + own
            return
        self._send(own, peer)
        self._tied_own[step] = own.detach().clone()
        previous = step - 1
        if self._tied_delayed(previous):
            if first and previous not in self._tied_other:
                self._tied_other[previous] = self._recv(tuple(p.shape), peer)
            mine, other = self._tied_own.pop(previous), self._tied_other.pop(previous)
            p.grad = mine + other if first else other + mine
        else:
            p.grad = torch.zeros_like(p)

    def _clip_gradients(self, step: int) -> None:
        """Sync: one batch's gradient across the pipeline, clipped by its global norm as one process would.
        Stale gradients belong to different batches on different stages: each stage clips by its own norm, and
        the tied weight by its own (the same on both of its holders, so the copies stay equal)."""
        if all(self.pipe.stage_staleness(k, step) == 0 for k in range(self.num_stages)):
            counted = [p.grad for p in self._params if not (self.module.last and p is self._tied)]
            sumsq = torch.nn.utils.get_total_norm(counted).float().reshape(1) ** 2
            dist.all_reduce(sumsq, group=self.grid.pipe_group)
            self._grad_norm = sumsq.sqrt()[0]
            if self._clip > 0:
                torch.nn.utils.clip_grads_with_norm_(self._params, self._clip, self._grad_norm)
            return
        own = [p for p in self._params if p is not self._tied]
        self._grad_norm = torch.nn.utils.get_total_norm([p.grad for p in own])
        if self._clip > 0:
            torch.nn.utils.clip_grads_with_norm_(own, self._clip, self._grad_norm)
            if self._tied is not None:
                torch.nn.utils.clip_grad_norm_([self._tied], self._clip, foreach=True)

    def _zero_grad(self) -> None:
        for p in self._params:
            p.grad = None

    # -- evaluation -----------------------------------------------------------------------------------
    def __call__(self, **batch: torch.Tensor) -> PretrainingOutput:
        """Forward of every layer (evaluation). Every stage of the replica returns the last stage's losses, NSP
        logits and MLM predictions (as one-hot scores: what `argmax` needs, without sending vocabulary-wide logits)."""
        if self.module.training:
            raise RuntimeError("PipelineEngine(...) runs evaluation forwards; train with train_batch")
        first, last, k = self.module.first, self.module.last, self.stage_index
        hidden = None if first else self._recv((*batch["input_ids"].shape, self.module.config.hidden_size), k - 1)
        with torch.no_grad(), self._autocast():
            out = self.module(hidden, batch, None)
        if not last:  # the next stage is inside this same call: a blocking send cannot wait on anything else
            dist.send(out.float().contiguous(), self.grid.rank_of(k + 1))
        labels = batch.get("masked_lm_labels")
        masked = 0 if labels is None else int((labels != IGNORE_INDEX).sum())
        nsp = getattr(self.module.config, "nsp", True)
        size = 1 + masked + (2 * batch["input_ids"].shape[0] if nsp else 0)
        if last:
            loss = out.mlm_loss if out.mlm_loss is not None else torch.zeros((), device=self.device)
            parts = [loss.reshape(1).float()]
            if masked:
                parts.append(out.mlm_logits.argmax(-1).float())
            if nsp:
                parts.append(out.nsp_logits.float().flatten())
            packed = torch.cat(parts)
        else:
            packed = torch.empty(size, device=self.device)
        if self.num_stages > 1:
            dist.broadcast(packed, self.grid.rank_of(self.num_stages - 1), group=self.grid.pipe_group)
        if last:
            return out
        predictions = packed[1:1 + masked].long()
        scores = torch.zeros(masked, self.module.config.vocab_size, dtype=torch.uint8, device=self.device)
        scores[torch.arange(masked, device=self.device), predictions] = 1
        return PretrainingOutput(mlm_loss=packed[0], mlm_logits=scores,
                                 nsp_logits=packed[1 + masked:].view(-1, 2) if nsp else None)

    # -- monitoring -----------------------------------------------------------------------------------
    def get_lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def pld_scalars(self) -> dict[str, float]:
        """theta and the expected depth of the step just taken."""
        theta_used = self.theta_used()
        return {"train/pld_theta": theta_used, "train/expected_depth": pld.expected_depth(self.num_layers, theta_used)}

    def optimizer_scalars(self) -> dict[str, float]:
        """Gradient norm (global in the sync schedule, the last stage's with stale gradients), and per stage its
        staleness and idle (bubble) fraction since the last call. Every rank calls this (one small all-gather)."""
        scalars = {}
        norm = self._grad_norm if self._plain else self.engine.get_global_grad_norm()
        if norm is not None:
            scalars["train/grad_norm"] = float(norm)
        mine = torch.tensor([float(self.stage_index), float(self.staleness()),
                             self._idle / self._wall if self._wall else 0.0], dtype=torch.float64,
                            device=self.device)  # NCCL gathers device tensors only
        self._idle = self._wall = 0.0
        gathered = [torch.zeros_like(mine) for _ in range(self.num_stages)]
        dist.all_gather(gathered, mine, group=self.grid.pipe_group)
        for row in gathered:
            stage, stale, idle = row.tolist()
            scalars[f"pipeline/staleness_stage{int(stage)}"] = stale
            scalars[f"pipeline/idle_fraction_stage{int(stage)}"] = idle
        return scalars

    def write_scalars(self, scalars: dict[str, float], step: int | None = None) -> None:
        if self.engine.monitor.enabled:
            step = self.global_steps if step is None else step
            self.engine.monitor.write_events([(tag, float(value), step) for tag, value in scalars.items()])

    # -- checkpoints ----------------------------------------------------------------------------------
    def _stage_tag(self) -> str:
        return f"stage{self.stage_index:02d}"

    def _pending_file(self, folder: Path) -> Path:
        return folder / self._stage_tag() / f"pipeline_pending_dp{self.grid.dp_rank:03d}.pt"

    def collect_in_flight(self) -> None:
        """Receive the messages already sent to this stage for later steps (error gradients a delayed backward
        will use, the tied weight's contribution of the last step) into this engine's state: before evaluating,
        saving (the checkpoint holds them) or shutting down. Every rank calls it at the same step."""
        step, k = self.global_steps, self.stage_index
        if not self.module.last:
            sent = {self._backward_batch(k + 1, t) for t in _inside_window(step)} - {None}
            used = {self._backward_batch(k, t) for t in _inside_window(step)} - {None}
            for batch in sorted(sent - used - set(self._inbox_delta)):
                shapes = [tuple(e["hidden"].shape) if e["hidden"] is not None else
                          (*e["batch"]["input_ids"].shape, self.module.config.hidden_size)
                          for e in self._stash[batch]]
                self._inbox_delta[batch] = [self._recv(shape, k + 1) for shape in shapes]
        previous = step - 1
        if self._tied is not None and self._tied_delayed(previous) and previous not in self._tied_other:
            peer = self.num_stages - 1 if self.module.first else 0
            self._tied_other[previous] = self._recv(tuple(self._tied.shape), peer)
        self._finish_sends(older_than=step + 1)

    def _pending_state(self) -> dict[str, Any]:
        def entry(e: dict[str, Any]) -> dict[str, Any]:
            gates = e["gates"]
            return {"hidden": e["hidden"], "batch": e["batch"], "rng": e["rng"],
                    "gates": None if gates is None else [[bool(kept), float(p)] for kept, p in gates]}

        return {"stash": {int(b): [entry(e) for e in entries] for b, entries in self._stash.items()},
                "inbox_delta": {int(b): list(v) for b, v in self._inbox_delta.items()},
                "tied_own": dict(self._tied_own), "tied_other": dict(self._tied_other)}

    def _restore_pending(self, state: dict[str, Any]) -> None:
        def entry(e: dict[str, Any]) -> dict[str, Any]:
            gates = e["gates"]
            return {**e, "gates": None if gates is None else [(bool(kept), float(p)) for kept, p in gates]}

        self._stash = {int(b): [entry(e) for e in entries] for b, entries in state["stash"].items()}
        self._inbox_delta = {int(b): list(v) for b, v in state["inbox_delta"].items()}
        self._tied_own = {int(t): v for t, v in state["tied_own"].items()}
        self._tied_other = {int(t): v for t, v in state["tied_other"].items()}

    def save_checkpoint(self, save_dir: str | Path, client_state: dict[str, Any] | None = None, *,
                        tag: str | None = None, save_latest: bool = True) -> str:
        """Every stage writes its part under SAVE_DIR/TAG/stageKK: DeepSpeed's weights and optimizer (one writer per
        stage, ZeRO partitions per rank) and, per rank, what its delayed backward still needs (stored inputs,
        received error gradients, tied-weight contributions): no drain, the run continues exactly."""
        tag = tag or f"global_step{self.global_steps}"
        folder = Path(save_dir) / tag
        self.collect_in_flight()
        (folder / self._stage_tag()).mkdir(parents=True, exist_ok=True)
        state = {"pld": {"enabled": self.pld.enabled, "theta_bar": self.pld.theta, "gamma": self.pld.gamma,
                         "step": self.global_steps, "step_offset": self.pld_step_offset,
                         "theta": self.get_pld_theta()},
                 "pipeline": {"stage": self.stage_index, "stages": self.num_stages,
                              "layers": list(self.module.layer_ids),
                              "schedule": self.pipe.schedule, "staleness": self.pipe.staleness,
                              "warmup_steps": self.pipe.warmup_steps, "names": self.module.model_names()},
                 "seed": self.seed, **(client_state or {})}
        self.engine.save_checkpoint(str(folder), tag=self._stage_tag(), client_state=state, save_latest=False)
        torch.save(self._pending_state(), self._pending_file(folder))
        if save_latest and dist.get_rank() == 0:
            ckpt_io.write_text_atomic(Path(save_dir) / ckpt_io.LATEST, tag)
        dist.barrier()
        return tag

    def load_checkpoint(self, load_dir: str | Path, tag: str | None = None) -> dict[str, Any] | None:
        """Client state of this stage's part of the checkpoint (the newest one when tag is None), or None."""
        tag = tag or ckpt_io.newest(Path(load_dir))
        if tag is None:
            return None
        folder = Path(load_dir) / tag
        if not (folder / self._stage_tag()).is_dir():
            saved = sorted(p.name for p in folder.glob("stage*")) if folder.is_dir() else []
            raise ckpt_io.CheckpointError(f"{folder}: no {self._stage_tag()} part (found {', '.join(saved) or 'none'};"
                                          f" expected a checkpoint of a {self.num_stages}-stage pipeline)")
        path, client = self.engine.load_checkpoint(str(folder), tag=self._stage_tag())
        if path is None:
            return None
        saved = client.get("pipeline", {})
        if saved.get("layers") != list(self.module.layer_ids):
            raise ckpt_io.CheckpointError(f"{folder}: stage {self.stage_index} holds layers {saved.get('layers')} "
                                          f"there and {list(self.module.layer_ids)} here (expected the same partition)")
        pending = self._pending_file(folder)
        if pending.is_file():
            self._restore_pending(ckpt_io.safe_load(pending, map_location=self.device))
        return client


def make_engine(model: BertForPreTraining, config: str | Path | dict[str, Any] | RunConfig, *, seed: int = 0,
                output_dir: str | Path | None = None, **kwargs: Any) -> Any:
    """PipelineEngine when the config's `pipeline` block has more than one stage, else PLDEngine."""
    config = RunConfig.read(config)  # read and validated once; the engine takes the typed object on
    source = config.source
    if config.pipeline.stages <= 1:
        from pld_ds.engine import PLDEngine

        return PLDEngine(model, config, seed=seed, output_dir=output_dir, **kwargs)
    if config.earlybert.enabled:
        raise ConfigError(f"{source}: earlybert.enabled: the EarlyBERT search is not supported with a pipeline "
                          "(expected pipeline.stages 1): the ticket is drawn over every layer at once")
    if getattr(model.encoder, "compiled", False):
        raise ConfigError(f"{source}: pipeline.stages: --compile is not supported with a pipeline (expected "
                          "stages 1, or no --compile)")
    return PipelineEngine(model, config, seed=seed, output_dir=output_dir, **kwargs)


__all__ = ["PipelineConfig", "PipelineEngine", "Stage", "StageGrid", "make_engine", "partition_layers", "unit_costs"]
