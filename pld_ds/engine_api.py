"""The engine interface of the training loop: what pld_ds.pretrain asks of an engine, and all it asks.

Two engines implement it: pld_ds.engine.PLDEngine (data parallel and ZeRO through deepspeed.initialize) and
pld_ds.pipeline.PipelineEngine (K stages of one BertForPreTraining, sync or Ouroboros schedule); make_engine
picks one from the config. This module imports neither (nor DeepSpeed), so the loop can name the interface
without starting anything.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from pld_ds.config import PLDConfig


@runtime_checkable
class TrainingEngine(Protocol):
    module: nn.Module  # the model, or the stage of it this rank holds; .config is the whole model's BertConfig
    pld: PLDConfig
    ds_config: dict[str, Any]  # what DeepSpeed was given, as resolved (monitors under the run's output)
    pld_step_offset: int  # steps on theta's curve before this engine (phase 2); a resume restores it
    nonfinite_skipped: int  # micro-batches skipped for a NaN/inf loss so far

    @property
    def global_steps(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def micro_batch_size(self) -> int: ...

    @property
    def data_parallel(self) -> tuple[int, int]:
        """(rank, size) for the data loader: the ranks that read different batches."""
        ...

    @property
    def num_stages(self) -> int:
        """Ranks that hold parts of one replica (and count its samples once): 1 without a pipeline."""
        ...

    def train_batch(self, batches: Iterator[dict[str, torch.Tensor]], max_nonfinite: int = 0
                    ) -> dict[str, torch.Tensor]:
        """One optimizer step; the mean losses of its micro-batches."""
        ...

    def __call__(self, **batch: torch.Tensor) -> Any:
        """An evaluation forward of every layer (after eval())."""
        ...

    def train(self, mode: bool = True) -> TrainingEngine: ...

    def eval(self) -> TrainingEngine: ...

    def theta_used(self) -> float: ...

    def get_lr(self) -> float: ...

    def pld_scalars(self) -> dict[str, float]: ...

    def optimizer_scalars(self) -> dict[str, float]: ...

    def keep_summary(self) -> list[str]: ...

    def write_scalars(self, scalars: dict[str, float], step: int | None = None) -> None: ...

    def save_checkpoint(self, save_dir: str | Path, client_state: dict[str, Any] | None = None, *,
                        tag: str | None = None, save_latest: bool = True) -> str: ...

    def load_checkpoint(self, load_dir: str | Path, tag: str | None = None) -> dict[str, Any] | None: ...


__all__ = ["TrainingEngine"]
