"""PLDEngine: DeepSpeed's engine plus the Progressive Layer Dropping that DeepSpeed 0.19.8 removed.

It takes the `progressive_layer_drop` block out of the user's DeepSpeed config (DeepSpeed now rejects
it), hands the rest to deepspeed.initialize unchanged, and in training injects
`progressive_layer_drop=True, pld_theta=theta` into the model's forward, as DeepSpeed once did.
theta is a pure function of the optimizer step, so it moves only at gradient-accumulation
boundaries and a resumed run (DeepSpeed restores the step) continues the same curve.
"""

from __future__ import annotations

import inspect
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.config import DeepSpeedConfigError

from pld_ds import checkpoint, pld
from pld_ds.config import ConfigError, PLDConfig, RunConfig, split_ds_config
from pld_ds.errors import UserError

try:
    from pydantic import ValidationError
except ImportError:  # pragma: no cover - deepspeed depends on pydantic
    ValidationError = ValueError  # type: ignore[misc,assignment]


def _default_launch_env() -> None:
    """A process started without a launcher is rank 0 of 1 (else DeepSpeed tries MPI discovery)."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    defaults = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    for key, value in defaults.items():
        os.environ.setdefault(key, value)


def _monitors_under(ds_config: dict[str, Any], output_dir: Path) -> dict[str, Any]:
    """Monitors with no output_path of their own write under the run's output folder."""
    ds_config = dict(ds_config)
    for key, sub in (("tensorboard", "tensorboard"), ("csv_monitor", "csv")):
        block = ds_config.get(key)
        if isinstance(block, dict) and block.get("enabled") and not block.get("output_path"):
            ds_config[key] = {**block, "output_path": str(output_dir / sub)}
    return ds_config


def _wandb_on_own_axes(monitor: Any) -> None:
    """DeepSpeed logs Train/Samples/* to wandb with the sample count as wandb's step, we log with the
    optimizer step, and wandb drops every record whose step is below the last one: ours would vanish.
    So each series is logged against its own x-axis metric (define_metric) and wandb's step just counts."""
    wb = getattr(monitor, "wandb_monitor", None)
    if wb is None or not wb.enabled:
        return
    import wandb

    for axis in ("optimizer_step", "samples"):
        wandb.define_metric(axis)
    for pattern in ("train/*", "eval/*"):
        wandb.define_metric(pattern, step_metric="optimizer_step")
    wandb.define_metric("Train/Samples/*", step_metric="samples")

    def write_events(events: list[tuple[str, float, int]]) -> None:
        for tag, value, step in events:
            wandb.log({tag: value, "samples" if tag.startswith("Train/Samples/") else "optimizer_step": step})

    wb.write_events = write_events


_ZERO3_GRAD_PARTITIONS = "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition"  # name-mangled


class _StaleGradients:
    """Gives a layer PLD dropped the zero gradient ZeRO-0 gives it, under every ZeRO stage and offload.

    DeepSpeed 0.19.8's ZeRO optimizers keep gradient buffers that persist across steps and that a backward
    writes only for the parameters it reached: ZeRO-3's flat partition buffer; with offload_optimizer
    (stages 1, 2, 3) the CPU fp32 gradient the optimizer steps, and for stages 1 and 2 the CPU copies that
    carry a parameter's sum over the micro-batches of an accumulation window. Without help, a layer dropped
    for a whole step is stepped with the gradient of the last step it ran in, a layer that ran in the first
    micro-batch of a window only adds a stale gradient, and with offload a layer that ran in an earlier
    micro-batch but not the last loses its gradient (the boundary copies only what the last backward
    reached). So after every step the buffers are zeroed, and before the step the offloaded gradient of a
    parameter the window reached but its last backward did not is copied as DeepSpeed copies the others
    (its own deferred-boundary routine, which also records the parameter's norm for clipping). ZeRO 1 and
    2 without offload need nothing: they rebuild their gradient from the parameters every step.
    """

    def __init__(self, optimizer: Any, stage: int, offload: bool) -> None:
        self.opt, self.stage, self.offload = optimizer, stage, offload

    @classmethod
    def of(cls, engine: Any, source: str) -> _StaleGradients | None:
        stage, offload = engine.zero_optimization_stage(), bool(engine.zero_cpu_offload())
        if stage == 0 or (stage < 3 and not offload):
            return None
        need = ["grad_partitions_flat_buffer"] if stage == 3 else []
        if offload:
            need += (["fp32_partitioned_groups_flat", "_offload_boundary_param_ids", "norm_for_param_grads",
                      "_offload_grad_partition_at_boundary", "fp16_groups", _ZERO3_GRAD_PARTITIONS] if stage == 3 else
                     ["single_partition_of_fp32_groups", "accumulated_grads_in_cpu", "_offload_accumulated_param_ids",
                      "norm_for_param_grads", "params_in_partition", "_restore_cpu_offload_grad_to_gpu",
                      "set_norm_for_param_grad_in_gpu", "update_offload_overflow_tracker_for_param_grad",
                      "async_inplace_copy_grad_to_fp32_buffer_from_gpu", "_use_compact_grad_partition_buffer"])
        missing = [name for name in need if not hasattr(engine.optimizer, name)]
        if missing:
            where = f"ZeRO stage {stage}" + (" with offload_optimizer" if offload else "")
            raise ConfigError(f"{source}: progressive_layer_drop under {where} needs to clear DeepSpeed's gradient "
                              f"buffers for dropped layers, and this DeepSpeed has no {missing[0]} (written for "
                              "DeepSpeed 0.19.8); use ZeRO stage 1 or 2 without offload_optimizer")
        return cls(engine.optimizer, stage, offload)

    def before_step(self) -> None:
        if not self.offload:
            return
        opt, norms, accelerator = self.opt, self.opt.norm_for_param_grads, get_accelerator()
        if self.stage == 3:
            partitions = getattr(opt, _ZERO3_GRAD_PARTITIONS)
            for group in opt.fp16_groups:
                for param in group:
                    if param.ds_id in opt._offload_boundary_param_ids and opt.get_param_id(param) not in norms:
                        grad = partitions[param.ds_id]  # moved to the device as DeepSpeed's finalize does
                        grad = grad if accelerator.on_accelerator(grad) else grad.to(accelerator.current_device_name())
                        opt._offload_grad_partition_at_boundary(param, grad, {}, {})
            return
        for group_idx, group in enumerate(opt.params_in_partition):
            for param in group:
                param_id = opt.get_param_id(param)
                if param_id not in opt._offload_accumulated_param_ids or param_id in norms:
                    continue
                if opt._use_compact_grad_partition_buffer(group_idx):
                    opt.copy_grads_in_partition(param, group_idx)
                    continue
                opt._restore_cpu_offload_grad_to_gpu(param)
                opt.set_norm_for_param_grad_in_gpu(param)
                opt.update_offload_overflow_tracker_for_param_grad(param)
                opt.async_inplace_copy_grad_to_fp32_buffer_from_gpu(param)

    def after_step(self) -> None:
        opt = self.opt
        if self.stage == 3:
            opt.grad_partitions_flat_buffer.zero_()
            if self.offload:
                for flat in opt.fp32_partitioned_groups_flat:
                    if flat.grad is not None:
                        flat.grad.zero_()
            return
        for flat in opt.single_partition_of_fp32_groups:
            if flat.grad is not None:
                flat.grad.zero_()
        for buffer in opt.accumulated_grads_in_cpu.values():
            buffer.zero_()


def _refuse_unsupported(ds_config: dict[str, Any], pld_config: PLDConfig, source: str, trainable: int) -> None:
    """Configurations the engine cannot train correctly, refused before DeepSpeed starts (those that depend on
    values DeepSpeed derives, such as the accumulation from train_batch_size, again once it started)."""
    if ds_config.get("managed_gradient_accumulation", True) is not True:
        raise ConfigError(f"{source}: managed_gradient_accumulation: PLDEngine runs each accumulation window itself "
                          "(gradient_accumulation_steps micro-batches, then one optimizer step) and needs DeepSpeed to "
                          "manage the window; remove the key or set it to true")
    zero = ds_config.get("zero_optimization")
    offload = zero.get("offload_optimizer") if isinstance(zero, dict) else None
    if pld_config.enabled and isinstance(offload, dict) and str(offload.get("device", "")).lower() == "nvme":
        raise ConfigError(f"{source}: zero_optimization.offload_optimizer.device: nvme with progressive_layer_drop "
                          "would step dropped layers with stale gradients (their NVMe gradient copies cannot be "
                          "cleared); use device cpu or none")
    gas = ds_config.get("gradient_accumulation_steps", 1)
    if isinstance(zero, dict) and isinstance(gas, int):
        to_cpu = isinstance(offload, dict) and str(offload.get("device")).lower() == "cpu"
        _refuse_offload_buckets(zero.get("stage", 0), to_cpu, gas, zero.get("reduce_bucket_size", 500_000_000),
                                trainable, source)
    if (pld_config.enabled and isinstance(zero, dict) and zero.get("stage") == 1 and zero.get("overlap_comm") is True
            and isinstance(gas, int) and gas > 1):
        raise ConfigError(_ZERO1_OVERLAP.format(source=source))


# DeepSpeed 0.19.8's ZeRO-1 with overlap_comm reduces, at the end of a window, only the gradients its last
# backward reached: a layer that ran in an earlier micro-batch but not the last keeps its local, un-reduced
# gradient (measured on two ranks: weights 5e-4 from ZeRO-0's after three steps). ZeRO-1's default is off.
_ZERO1_OVERLAP = ("{source}: zero_optimization.overlap_comm: true with ZeRO stage 1, gradient accumulation and "
                  "progressive_layer_drop loses the gradient of a layer that ran in an earlier micro-batch of a window "
                  "but not in the last; set overlap_comm to false (ZeRO-1's default) or use ZeRO stage 2")


def _refuse_offload_buckets(stage: int, offload: bool, gas: int, bucket: Any, trainable: int, source: str) -> None:
    """DeepSpeed 0.19.8's ZeRO-2 and ZeRO-3 with offload_optimizer and gradient accumulation accumulate wrong
    gradients when a backward fills more than one reduce bucket, PLD or not: with every layer run, the first
    step's gradient norm was 2.83 instead of 3.39 (bucket 150,000 of a 157,542-parameter model; right with
    160,000). Measured on CPU, fp32 and bf16; refused until a DeepSpeed release is shown to fix it."""
    if stage in (2, 3) and offload and gas > 1 and isinstance(bucket, (int, float)) and bucket < trainable:
        raise ConfigError(f"{source}: zero_optimization.reduce_bucket_size: {int(bucket):,} is below the model's "
                          f"{trainable:,} trainable parameters, and with offload_optimizer and gradient accumulation "
                          f"DeepSpeed 0.19.8's ZeRO-{stage} then accumulates wrong gradients; set reduce_bucket_size "
                          f"to at least {trainable}, or gradient_accumulation_steps to 1, or remove offload_optimizer")


class NonFiniteLoss(UserError):
    pass


class PLDEngine:
    def __init__(
        self,
        model: torch.nn.Module,
        config: str | Path | dict[str, Any] | RunConfig,
        *,
        seed: int = 0,
        output_dir: str | Path | None = None,
        num_layers: int | None = None,
        model_parameters: Any = None,
        pld_step_offset: int = 0,
        **initialize_kwargs: Any,
    ) -> None:
        """``pld_step_offset``: optimizer steps the weights were trained for before this engine (phase 2 of a
        two-phase run continuing theta's curve); theta and the gates use global_steps + offset."""
        ds_config, self.pld, self.config_source = split_ds_config(config)
        if output_dir is not None:
            ds_config = _monitors_under(ds_config, Path(output_dir))
        self.ds_config = ds_config
        self.seed = seed
        self.pld_step_offset = pld_step_offset  # a resumed run restores it from the checkpoint
        self.num_layers = num_layers or getattr(getattr(model, "config", None), "num_layers", None)
        _default_launch_env()
        wandb_block = ds_config.get("wandb")
        if output_dir is not None and isinstance(wandb_block, dict) and wandb_block.get("enabled"):
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            os.environ.setdefault("WANDB_DIR", str(output_dir))  # read by wandb.init inside deepspeed.initialize
        if model_parameters is None:
            model_parameters = [p for p in model.parameters() if p.requires_grad]
        trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
        _refuse_unsupported(ds_config, self.pld, self.config_source, trainable)
        try:
            self.engine, self.optimizer, _, self.lr_scheduler = deepspeed.initialize(
                model=model, model_parameters=model_parameters, config=ds_config, **initialize_kwargs)
        # DeepSpeed reports config problems as any of these; torch's optimizers raise ValueError for
        # bad hyper-parameters (negative lr) and TypeError for unknown ones.
        except (DeepSpeedConfigError, ValidationError, AssertionError, ValueError, TypeError) as err:
            first = str(err).strip().splitlines()
            raise ConfigError(f"{self.config_source}: DeepSpeed rejected the config: "
                              f"{' '.join(first[:3]) if first else type(err).__name__}") from err
        self.module = self.engine.module
        ds = self.engine
        if (self.pld.enabled and ds.zero_optimization_stage() == 1 and ds.zero_overlap_comm()
                and ds.gradient_accumulation_steps() > 1):  # accumulation derived from train_batch_size
            raise ConfigError(_ZERO1_OVERLAP.format(source=self.config_source))
        _refuse_offload_buckets(ds.zero_optimization_stage(), ds.zero_cpu_offload(), ds.gradient_accumulation_steps(),
                                ds.zero_reduce_bucket_size(), trainable, self.config_source)
        _wandb_on_own_axes(self.engine.monitor)
        checkpoint.use_safe_loads(self.engine)
        self._passes_generator = "pld_generator" in inspect.signature(self.module.forward).parameters
        self._micro_step = 0  # micro-batch index inside the current accumulation window
        self.nonfinite_skipped, self._nonfinite_run = 0, 0
        e = self.engine
        self._all_params = list(self.module.parameters())
        self._params = [p for p in self._all_params if p.requires_grad]
        # A plain torch optimizer (fp32 or bf16 autocast, no ZeRO): DeepSpeed clips one parameter at a time
        # and keeps no norm. We clip with torch's foreach kernels instead, from the norm we log, and a
        # single rank skips DeepSpeed's all-reduce of the gradients (flatten, no-op reduce, unflatten).
        self._plain_optimizer = not (e.fp16_enabled() or e.bfloat16_enabled() or e.zero_optimization()
                                   or getattr(e, "torch_autocast_z0_gradscaler", None) is not None)
        self._clip = 0.0
        if self._plain_optimizer:
            self._clip, e._config.gradient_clipping = e.gradient_clipping(), 0.0
            # Clip in the optimizer's own pre-step hook: whatever decides that a step happens, it is clipped
            # and its norm is logged (a boundary test of our own could disagree with DeepSpeed's).
            e.optimizer.register_step_pre_hook(self._clip_before_step)
            if getattr(e, "dp_world_size", None) == 1:
                e.enable_backward_allreduce = False
            e.zero_grad = self._zero_grad  # DeepSpeed's walks named_parameters() after every step
        self._stale = _StaleGradients.of(e, self.config_source) if self.pld.enabled else None
        self._grad_norm: torch.Tensor | None = None
        self._theta_used: float | None = None  # theta of the last training forward: what the last step used
        # Gates the model reports having drawn (out.gates): per layer [kept, sum of p_l, draws], since the last
        # pld_scalars() and over this engine's life.
        self._gates_window: torch.Tensor | None = None
        self._gates_total: torch.Tensor | None = None
        self.module.register_forward_pre_hook(self._inject_pld, with_kwargs=True)

    # -- PLD ------------------------------------------------------------------------------------
    @property
    def global_steps(self) -> int:
        return self.engine.global_steps

    def get_pld_theta(self) -> float:
        if not self.pld.enabled:
            return 1.0
        return pld.theta(self.pld_step, self.pld.theta, self.pld.gamma)

    @property
    def pld_step(self) -> int:
        """The step on theta's curve: this engine's optimizer steps plus those of an earlier phase it continues."""
        return self.engine.global_steps + self.pld_step_offset

    def expected_depth(self) -> float | None:
        if self.num_layers is None:
            return None
        return pld.expected_depth(self.num_layers, self.get_pld_theta())

    def _inject_pld(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not (self.pld.enabled and module.training):
            return None
        self._theta_used = self.get_pld_theta()
        kwargs = {**kwargs, "progressive_layer_drop": True, "pld_theta": self._theta_used}
        if self._passes_generator:
            kwargs["pld_generator"] = pld.gate_generator(self.seed, self.pld_step, self._micro_step)
        return args, kwargs

    # -- training -------------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.engine(*args, **kwargs)

    def train(self, mode: bool = True) -> PLDEngine:
        self.engine.train(mode)
        return self

    def eval(self) -> PLDEngine:
        return self.train(False)

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
        """(rank, size) for the data loader: every rank reads its own batches."""
        dist = torch.distributed
        return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)

    @property
    def num_stages(self) -> int:
        """Ranks per model replica: one (PipelineEngine has more)."""
        return 1

    def destroy(self) -> None:
        """Release DeepSpeed's engine (its hooks and buffers), e.g. before EarlyBERT's slim model replaces it."""
        self.engine.destroy()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        if self._stale is not None and self.engine.is_gradient_accumulation_boundary():
            self._stale.before_step()
        steps = self.engine.global_steps
        self.engine.step()
        stepped = self.engine.global_steps != steps
        if stepped and self._stale is not None:
            self._stale.after_step()
        self._micro_step = 0 if stepped else self._micro_step + 1

    def _clip_before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Before every step of a plain torch optimizer: gradient norm (a tensor, so no sync here; read when
        logging) and clipping with foreach kernels. DeepSpeed's fp16/bf16/ZeRO optimizers do both themselves."""
        for p in self._params:
            if p.grad is None:  # a layer PLD dropped in every micro-batch: zero, as DeepSpeed's all-reduce made it
                p.grad = torch.zeros_like(p)
        self._grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self._params]) if self._params else None
        if self._params and self._clip > 0:
            torch.nn.utils.clip_grads_with_norm_(self._params, self._clip, self._grad_norm)

    def _zero_grad(self) -> None:
        for p in self._all_params:
            p.grad = None

    def train_batch(self, batches: Iterator[dict[str, torch.Tensor]], max_nonfinite: int = 0
                    ) -> dict[str, torch.Tensor]:
        """One optimizer step over gradient_accumulation_steps micro-batches; mean losses, still on device.

        ``max_nonfinite`` > 0: a micro-batch whose loss is NaN or inf on any rank is skipped on every rank
        (no backward, no step: the accumulation window takes the next batch instead) and counted in
        ``nonfinite_skipped``; more than ``max_nonfinite`` in a row raise NonFiniteLoss. (fp16 overflow
        is DeepSpeed's loss scaler's business: it skips those steps itself.)
        """
        self.train()
        totals: dict[str, torch.Tensor] = {}
        steps, done = self.gradient_accumulation_steps, 0
        while done < steps:
            batch = {k: v.to(self.device, non_blocking=True) for k, v in next(batches).items()}
            out = self(**batch)
            if max_nonfinite and not self._finite_everywhere(out.loss):
                self.nonfinite_skipped += 1
                self._nonfinite_run += 1
                if self._nonfinite_run > max_nonfinite:
                    raise NonFiniteLoss(f"loss was NaN or inf in {self._nonfinite_run} micro-batches in a row at "
                                        f"step {self.global_steps} ({self.nonfinite_skipped} skipped in all): "
                                        "stopping; lower the learning rate or resume from an earlier checkpoint")
                continue
            self._nonfinite_run = 0
            self._count_gates(getattr(out, "gates", None))
            self.backward(out.loss)
            self.step()
            done += 1
            for name in ("loss", "mlm_loss", "nsp_loss", "l1_penalty"):
                value = getattr(out, name, None)
                if value is not None:
                    totals[name] = totals.get(name, 0.0) + value.detach().float() / steps
        return totals

    def _finite_everywhere(self, loss: torch.Tensor) -> bool:
        finite = torch.isfinite(loss.detach()).all().to(torch.int32).reshape(1)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        return bool(finite.item())

    # -- monitoring -----------------------------------------------------------------------------
    def get_lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def optimizer_scalars(self) -> dict[str, float]:
        """Gradient norm of the last step (DeepSpeed computes it when gradient_clipping is set) and, with fp16,
        the dynamic loss scale."""
        scalars = {}
        norm = self._grad_norm if self._plain_optimizer else self.engine.get_global_grad_norm()
        if norm is not None:
            scalars["train/grad_norm"] = float(norm)
        if self.engine.fp16_enabled():
            scale = getattr(self.engine.optimizer, "cur_scale", None) or getattr(self.engine.optimizer, "loss_scale",
                                                                                None)
            if scale is not None:
                scalars["train/loss_scale"] = float(scale)
        return scalars

    def theta_used(self) -> float:
        """theta the last training step ran with: theta(global_steps - 1) once a step is done (theta moves at
        the step's end, so get_pld_theta() is already the next step's); theta(0) before the first."""
        return self.get_pld_theta() if self._theta_used is None else self._theta_used

    def _count_gates(self, gates: list[tuple[bool, float]] | None) -> None:
        if not gates:
            return
        drawn = torch.tensor([[float(kept), float(p), 1.0] for kept, p in gates], dtype=torch.float64)
        for name in ("_gates_window", "_gates_total"):
            counts = getattr(self, name)
            setattr(self, name, drawn if counts is None else counts + drawn)

    def pld_scalars(self) -> dict[str, float]:
        """theta and the expected depth of the step just taken, for the row of step global_steps; and, when the
        model reports its gates, per layer k (1-based) the share of micro-batches that kept it since the last
        call (train/keep_rate/layer_k) beside the mean keep probability p_l they were drawn with
        (train/keep_prob/layer_k)."""
        theta_used = self.theta_used()
        scalars = {"train/pld_theta": theta_used}
        if self.num_layers is not None:
            scalars["train/expected_depth"] = pld.expected_depth(self.num_layers, theta_used)
        if self._gates_window is not None:
            for k, (kept, p_sum, draws) in enumerate(self._gates_window.tolist(), start=1):
                scalars[f"train/keep_rate/layer_{k}"] = kept / draws
                scalars[f"train/keep_prob/layer_{k}"] = p_sum / draws
            self._gates_window = None
        return scalars

    def keep_summary(self) -> list[str]:
        """The gates drawn over this engine's life: per layer, how often it was kept against the mean p_l."""
        return pld.keep_summary(self._gates_total)

    def write_scalars(self, scalars: dict[str, float], step: int | None = None) -> None:
        """To every monitor enabled in the config (tensorboard, csv_monitor, wandb, comet); rank 0 only."""
        if self.engine.monitor.enabled:
            step = self.engine.global_steps if step is None else step
            self.engine.monitor.write_events([(tag, float(value), step) for tag, value in scalars.items()])

    # -- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self, save_dir: str | Path, client_state: dict[str, Any] | None = None, *,
                        tag: str | None = None, save_latest: bool = True) -> str:
        """DeepSpeed's checkpoint plus the PLD state; pld_ds.checkpoint.Checkpointer makes it crash-safe."""
        tag = tag or f"global_step{self.engine.global_steps}"
        state = {"pld": {"enabled": self.pld.enabled, "theta_bar": self.pld.theta, "gamma": self.pld.gamma,
                         "step": self.engine.global_steps, "step_offset": self.pld_step_offset,
                         "theta": self.get_pld_theta()},
                 "seed": self.seed, **(client_state or {})}
        self.engine.save_checkpoint(str(save_dir), tag=tag, client_state=state, save_latest=save_latest)
        return tag

    def load_checkpoint(self, load_dir: str | Path, tag: str | None = None) -> dict[str, Any] | None:
        """Client state of the checkpoint (the newest one when tag is None), or None if there is none."""
        path, client_state = self.engine.load_checkpoint(str(load_dir), tag=tag)
        if path is None:
            return None
        return client_state


__all__ = ["PLDConfig", "PLDEngine"]
