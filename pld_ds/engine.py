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
from deepspeed.runtime.config import DeepSpeedConfigError

from pld_ds import checkpoint, pld
from pld_ds.config import ConfigError, PLDConfig, split_ds_config
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


class NonFiniteLoss(UserError):
    pass


class PLDEngine:
    def __init__(
        self,
        model: torch.nn.Module,
        config: str | Path | dict[str, Any],
        *,
        seed: int = 0,
        output_dir: str | Path | None = None,
        num_layers: int | None = None,
        model_parameters: Any = None,
        **initialize_kwargs: Any,
    ) -> None:
        ds_config, self.pld, self.config_source = split_ds_config(config)
        if output_dir is not None:
            ds_config = _monitors_under(ds_config, Path(output_dir))
        self.ds_config = ds_config
        self.seed = seed
        self.num_layers = num_layers or getattr(getattr(model, "config", None), "num_layers", None)
        _default_launch_env()
        wandb_block = ds_config.get("wandb")
        if output_dir is not None and isinstance(wandb_block, dict) and wandb_block.get("enabled"):
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            os.environ.setdefault("WANDB_DIR", str(output_dir))  # read by wandb.init inside deepspeed.initialize
        if model_parameters is None:
            model_parameters = [p for p in model.parameters() if p.requires_grad]
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
            if getattr(e, "dp_world_size", None) == 1:
                e.enable_backward_allreduce = False
            e.zero_grad = self._zero_grad  # DeepSpeed's walks named_parameters() after every step
        self._zero3 = e.zero_optimization_stage() == 3 and self.pld.enabled
        if self._zero3 and not hasattr(e.optimizer, "grad_partitions_flat_buffer"):
            raise ConfigError(f"{self.config_source}: ZeRO stage 3 with progressive_layer_drop needs DeepSpeed's "
                              "ZeRO-3 gradient buffer to clear the gradients of dropped layers, and this DeepSpeed "
                              "has none; use ZeRO stage 1 or 2")
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
        return pld.theta(self.engine.global_steps, self.pld.theta, self.pld.gamma)

    def expected_depth(self) -> float | None:
        if self.num_layers is None:
            return None
        return pld.expected_depth(self.num_layers, self.get_pld_theta())

    def _inject_pld(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not (self.pld.enabled and module.training):
            return None
        kwargs = {**kwargs, "progressive_layer_drop": True, "pld_theta": self.get_pld_theta()}
        if self._passes_generator:
            kwargs["pld_generator"] = pld.gate_generator(self.seed, self.engine.global_steps, self._micro_step)
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

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        boundary = self.engine.is_gradient_accumulation_boundary()
        if boundary and self._plain_optimizer:
            # DeepSpeed's fp16/bf16/ZeRO optimizers report the norm. A tensor, so no sync here; read when logging.
            for p in self._params:
                if p.grad is None:  # a layer PLD dropped in every micro-batch: zero, as DeepSpeed's all-reduce made it
                    p.grad = torch.zeros_like(p)
            self._grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self._params]) if self._params else None
            if self._params and self._clip > 0:
                torch.nn.utils.clip_grads_with_norm_(self._params, self._clip, self._grad_norm)
        self.engine.step()
        if boundary and self._zero3:
            self._clear_zero3_gradients()
        self._micro_step = 0 if boundary else self._micro_step + 1

    def _zero_grad(self) -> None:
        for p in self._all_params:
            p.grad = None

    def _clear_zero3_gradients(self) -> None:
        """ZeRO-3 keeps every gradient partition in one flat buffer that a backward only overwrites for the
        parameters it reached, and steps the whole buffer. A layer that PLD dropped for a whole step would
        be stepped with the gradient of the last step it ran in (DeepSpeed 0.19.8; ZeRO 1 and 2 step it with a
        zero gradient). Zeroing the buffer after each step makes ZeRO-3 match them: one memset per step."""
        self.engine.optimizer.grad_partitions_flat_buffer.zero_()

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
            for name in ("loss", "mlm_loss", "nsp_loss"):
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
        if self._gates_total is None:
            return []
        rows = self._gates_total.tolist()
        lines = [f"PLD gates drawn over {int(rows[0][2])} micro-batches (layer: kept share / mean p_l):"]
        lines.append("  " + "  ".join(f"{k}: {kept / n:.3f}/{p / n:.3f}" for k, (kept, p, n) in enumerate(rows, 1)))
        return lines

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
                         "step": self.engine.global_steps, "theta": self.get_pld_theta()},
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
