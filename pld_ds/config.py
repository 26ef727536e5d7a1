"""Typed settings: the PLD block taken out of a DeepSpeed JSON, and model presets.

DeepSpeed's own keys stay in the JSON and go to deepspeed.initialize untouched; values derived from
them are read back from the engine, never copied here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import reprlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pld_ds.errors import UserError
from pld_ds.model import BertConfig

PLD_KEY = "progressive_layer_drop"


class ConfigError(UserError):
    pass


def _is_number(value: Any) -> bool:
    """A finite int or float; true/false are not numbers here."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer beyond the float range: no use as a rate or probability
        return False


_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxstring = _SHORT_REPR.maxlong = _SHORT_REPR.maxother = 40


def _show(value: Any) -> str:
    """repr() cut to a readable length: a 4000-digit number or a long string must not flood the error line."""
    return _SHORT_REPR.repr(value)


@dataclass(frozen=True)
class PLDConfig:
    """The `progressive_layer_drop` block: {"enabled": true, "theta": 0.5, "gamma": 0.001}."""

    enabled: bool = False
    theta: float = 1.0  # theta-bar: the limit of theta(t), the keep probability of the last layer
    gamma: float = 0.001  # decay rate of theta per optimizer step

    @classmethod
    def from_dict(cls, block: Any, source: str = "config") -> PLDConfig:
        where = f"{source}: {PLD_KEY}"
        if not isinstance(block, dict):
            raise ConfigError(f"{where}: expected an object like "
                              '{"enabled": true, "theta": 0.5, "gamma": 0.001}, got ' + type(block).__name__)
        problems = []
        known = {f.name for f in dataclasses.fields(cls)}
        for key in sorted(set(block) - known):
            problems.append(f"{where}.{key}: unknown key (expected one of: {', '.join(sorted(known))})")
        enabled = block.get("enabled", cls.enabled)
        theta = block.get("theta", cls.theta)
        gamma = block.get("gamma", cls.gamma)
        if not isinstance(enabled, bool):
            problems.append(f"{where}.enabled: expected true or false, got {_show(enabled)}")
        if not _is_number(theta) or not 0.0 < theta <= 1.0:
            problems.append(f"{where}.theta: expected a number in (0, 1], got {_show(theta)}")
        if not _is_number(gamma) or gamma < 0.0:
            problems.append(f"{where}.gamma: expected a number >= 0, got {_show(gamma)}")
        if problems:
            raise ConfigError("; ".join(problems))
        return cls(enabled=enabled, theta=float(theta), gamma=float(gamma))


def read_json(path: str | Path, what: str = "JSON file") -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such {what}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: cannot read {what}: is a directory (expected a JSON file)") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: cannot read {what}: byte {err.start} is not UTF-8 (expected JSON text)") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read {what}: {err.strerror or err}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid JSON: nested too deeply") from None
    except ValueError as err:  # Python's limit on the digits of an integer
        raise ConfigError(f"{path}: invalid JSON: {str(err).split(';')[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    return data


def split_ds_config(config: str | Path | dict[str, Any] | RunConfig, *, pipeline_engine: bool = False
                    ) -> tuple[dict[str, Any], PLDConfig, str]:
    """(DeepSpeed config without our blocks, the PLD settings, a name for messages).

    A `pipeline` block is validated and taken out too (pipeline_config reads it); one with more than one stage
    is an error unless the caller is the pipeline engine: DeepSpeed would ignore it and train data parallel.
    """
    if isinstance(config, RunConfig):  # read and validated already
        _refuse_stages(config.pipeline, config.source, pipeline_engine)
        return dict(config.ds_config), config.pld, config.source
    source, ds_config = _read_ds_config(config)
    ds_config, pld, _ = _take_our_blocks(ds_config, source, pipeline_engine)
    return ds_config, pld, source


def _read_ds_config(config: str | Path | dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(a name for messages, a copy of the config's top level)."""
    if isinstance(config, dict):
        return "DeepSpeed config", dict(config)
    return str(config), read_json(config, "DeepSpeed config")


def _take_our_blocks(ds_config: dict[str, Any], source: str, pipeline_engine: bool
                     ) -> tuple[dict[str, Any], PLDConfig, PipelineConfig]:
    """Pops progressive_layer_drop (validated), earlybert (RunConfig validates it) and pipeline (validated)."""
    # Only a missing block means "PLD off": "progressive_layer_drop": null is an error like any non-object.
    pld = PLDConfig.from_dict(ds_config.pop(PLD_KEY), source) if PLD_KEY in ds_config else PLDConfig()
    ds_config.pop("earlybert", None)  # ours too: pld_ds.earlybert.EarlyBertConfig reads it
    pipe = PipelineConfig()
    if PIPELINE_KEY in ds_config:
        pipe = PipelineConfig.from_dict(ds_config.pop(PIPELINE_KEY), source)
        _refuse_stages(pipe, source, pipeline_engine)
    return ds_config, pld, pipe


def _refuse_stages(pipe: PipelineConfig, source: str, pipeline_engine: bool) -> None:
    if pipe.stages > 1 and not pipeline_engine:
        raise ConfigError(f"{source}: {PIPELINE_KEY}.stages: {pipe.stages} stages need the pipeline engine "
                          "(pld-pretrain, or pld_ds.pipeline.make_engine); this command trains data parallel "
                          "only: remove the block or set stages to 1")


@dataclass(frozen=True)
class RunConfig:
    """A run's DeepSpeed JSON, read and validated once: DeepSpeed's own keys (``ds_config``, handed to
    deepspeed.initialize untouched) and our blocks, each typed. split_ds_config, pipeline_config,
    EarlyBertConfig.from_ds_config and so the engines and make_engine take it wherever they take a path or dict."""

    source: str  # a name for messages: the file, or "DeepSpeed config" for a dict
    ds_config: dict[str, Any]  # without our blocks; split_ds_config hands out copies
    pld: PLDConfig
    pipeline: PipelineConfig
    earlybert: Any  # pld_ds.earlybert.EarlyBertConfig (that module builds on this one, so not imported here)

    @classmethod
    def read(cls, config: str | Path | dict[str, Any] | RunConfig) -> RunConfig:
        if isinstance(config, RunConfig):
            return config
        from pld_ds.earlybert import EARLYBERT_KEY, EarlyBertConfig

        source, ds_config = _read_ds_config(config)
        has_earlybert, earlybert = EARLYBERT_KEY in ds_config, ds_config.get(EARLYBERT_KEY)
        ds_config, pld, pipe = _take_our_blocks(ds_config, source, pipeline_engine=True)
        eb = EarlyBertConfig.from_dict(earlybert, source) if has_earlybert else EarlyBertConfig()
        return cls(source=source, ds_config=ds_config, pld=pld, pipeline=pipe, earlybert=eb)


PIPELINE_KEY = "pipeline"
PIPELINE_SCHEDULES = ("sync", "ouroboros")
# DeepSpeed's partition methods "parameters" and "uniform", and ours: "compute" (estimated FLOPs; "best", the
# default DeepSpeed's config reports, means the same here).
PIPELINE_PARTITIONS = ("compute", "best", "parameters", "uniform")


@dataclass(frozen=True)
class PipelineConfig:
    """The `pipeline` block. DeepSpeed's keys keep their meaning: stages (K; "auto" is 1 here, there is no
    PipelineModule to ask), partition, activation_checkpoint_interval. Ours: schedule (sync: a flush every
    optimizer step; ouroboros: delayed gradients, no flush), warmup_steps (ouroboros runs the sync schedule for
    its first N steps), staleness ("ddg": module k of K is K-k steps stale, Decoupled Parallel Backprop's
    rule; or an integer d, d steps per stage boundary; 0 is the sync schedule)."""

    stages: int = 1
    partition: str = "compute"
    activation_checkpoint_interval: int = 0
    schedule: str = "sync"
    warmup_steps: int = 0
    staleness: int = 0  # steps of delay per stage boundary: stage k (0-based) of K is staleness * (K-1-k) stale

    @classmethod
    def from_dict(cls, block: Any, source: str = "config") -> PipelineConfig:
        where = f"{source}: {PIPELINE_KEY}"
        if not isinstance(block, dict):
            raise ConfigError(f'{where}: expected an object like {{"stages": 2, "schedule": "sync"}}, '
                              f"got {type(block).__name__}")
        problems = []
        known = {f.name for f in dataclasses.fields(cls)}
        for key in sorted(set(block) - known):
            problems.append(f"{where}.{key}: unknown key (expected one of: {', '.join(sorted(known))})")
        stages = block.get("stages", cls.stages)
        stages = 1 if stages == "auto" else stages
        if not _is_int(stages) or stages < 1:
            problems.append(f'{where}.stages: expected a positive integer or "auto", got {_show(stages)}')
        partition = block.get("partition", cls.partition)
        if partition not in PIPELINE_PARTITIONS:
            problems.append(f"{where}.partition: expected one of {', '.join(PIPELINE_PARTITIONS)}, "
                            f"got {_show(partition)}")
        interval = block.get("activation_checkpoint_interval", cls.activation_checkpoint_interval)
        if not _is_int(interval) or interval < 0:
            problems.append(f"{where}.activation_checkpoint_interval: expected an integer >= 0, got {_show(interval)}")
        schedule = block.get("schedule", cls.schedule)
        if schedule not in PIPELINE_SCHEDULES:
            problems.append(f"{where}.schedule: expected one of {', '.join(PIPELINE_SCHEDULES)}, got {_show(schedule)}")
        warmup = block.get("warmup_steps", cls.warmup_steps)
        if not _is_int(warmup) or warmup < 0:
            problems.append(f"{where}.warmup_steps: expected an integer >= 0, got {_show(warmup)}")
        staleness = block.get("staleness", "ddg" if schedule == "ouroboros" else 0)
        staleness = 1 if staleness == "ddg" else staleness
        if not _is_int(staleness) or staleness < 0:
            problems.append(f'{where}.staleness: expected "ddg" or an integer >= 0, got {_show(staleness)}')
        elif schedule == "sync" and staleness:
            problems.append(f"{where}.staleness: the sync schedule has no stale gradients (got {staleness}); "
                            'use "schedule": "ouroboros"')
        if problems:
            raise ConfigError("; ".join(problems))
        return cls(stages=stages, partition=partition, activation_checkpoint_interval=interval, schedule=schedule,
                   warmup_steps=warmup, staleness=staleness)

    def stage_staleness(self, stage: int, step: int) -> int:
        """Optimizer steps between the forward of a batch and its backward on 0-based `stage` at `step`."""
        if self.schedule != "ouroboros" or step < self.warmup_steps:
            return 0
        return self.staleness * (self.stages - 1 - stage)

    def check_fit(self, world_size: int, num_layers: int, zero_stage: int, source: str = "config") -> None:
        """What only the launch knows: K divides the world size, K <= layers, and no ZeRO-3."""
        where = f"{source}: {PIPELINE_KEY}.stages"
        if world_size % self.stages:
            raise ConfigError(f"{where}: {self.stages} stages do not divide the world size {world_size} "
                              f"(expected a divisor of {world_size}: the ranks are stages x data-parallel replicas)")
        if self.stages > num_layers:
            raise ConfigError(f"{where}: {self.stages} stages for a model of {num_layers} layers (expected at most "
                              f"{num_layers}: each stage holds at least one layer)")
        if zero_stage >= 2:
            raise ConfigError(f"{source}: zero_optimization.stage: ZeRO stage {zero_stage} with a pipeline is not "
                              "supported (expected 0 or 1): ZeRO-2 reduces gradients during each backward and ZeRO-3 "
                              "gathers partitioned weights in every forward, both per data-parallel group of the whole "
                              "model, while a stage runs its own backward passes at its own times")


def pipeline_config(config: str | Path | dict[str, Any] | RunConfig) -> tuple[PipelineConfig, str]:
    """The `pipeline` block of a DeepSpeed config (defaults when absent: one stage), and a name for messages."""
    if isinstance(config, RunConfig):
        return config.pipeline, config.source
    source, ds_config = (("DeepSpeed config", config) if isinstance(config, dict)
                         else (str(config), read_json(config, "DeepSpeed config")))
    block = ds_config.get(PIPELINE_KEY)
    return (PipelineConfig() if block is None and PIPELINE_KEY not in ds_config
            else PipelineConfig.from_dict(block, source)), source


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


MODEL_PRESETS: dict[str, dict[str, int | float]] = {
    # For tests and smoke runs: seconds on a CPU.
    "tiny": dict(hidden_size=64, num_layers=4, num_heads=2, intermediate_size=128, max_position_embeddings=128),
    # Small enough to learn on two CPU cores in minutes (the quickstart). No dropout: runs of minutes on a few MB of
    # text are far from overfitting, and dropout only slows them down.
    "micro": dict(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512, max_position_embeddings=128,
                  hidden_dropout=0.0, attention_dropout=0.0),
    # Deep and narrow, so that PLD has layers to drop, at sequence length 128: the CPU recipes (narrow12 in the
    # quickstart, deep12 in the longer recipe of docs/fidelity.md).
    "narrow12": dict(hidden_size=128, num_layers=12, num_heads=2, intermediate_size=512, max_position_embeddings=128),
    "deep12": dict(hidden_size=256, num_layers=12, num_heads=4, intermediate_size=1024, max_position_embeddings=128),
    # Google's BERT miniatures (Turc et al. 2019) and the two paper sizes.
    "mini": dict(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024),
    "small": dict(hidden_size=512, num_layers=4, num_heads=8, intermediate_size=2048),
    "base": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),
    "large": dict(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096),
}


def model_config(name_or_file: str, **overrides: Any) -> BertConfig:
    """A preset name (tiny, mini, small, base, large) or a JSON file of BertConfig fields."""
    if name_or_file in MODEL_PRESETS:
        fields, source = dict(MODEL_PRESETS[name_or_file]), f"model preset {name_or_file}"
    elif name_or_file.endswith(".json"):
        fields, source = read_json(name_or_file, "model file"), name_or_file
    else:
        raise ConfigError(f"--model: expected one of {', '.join(MODEL_PRESETS)} or a .json file, "
                          f"got {name_or_file!r}")
    known = {f.name for f in dataclasses.fields(BertConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown key {unknown[0]} "
                          f"(expected BertConfig fields: {', '.join(sorted(known))})")
    fields.update({k: v for k, v in overrides.items() if v is not None})
    _check_field_types(fields, source)
    try:
        return BertConfig(**fields)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{source}: {err}") from None


def _check_field_types(fields: dict[str, Any], source: str) -> None:
    """JSON values against BertConfig's field types (true is not an integer, "0.1" is not a number);
    BertConfig itself checks the ranges."""
    defaults = {f.name: f.default for f in dataclasses.fields(BertConfig)}
    for key, value in fields.items():
        kind = type(defaults.get(key))
        if kind is bool:
            ok, expected = isinstance(value, bool), "true or false"
        elif kind is int:
            ok, expected = isinstance(value, int) and not isinstance(value, bool), "an integer"
        elif kind is float:
            ok, expected = _is_number(value), "a finite number"
        else:  # not a field: BertConfig(**fields) reports it
            continue
        if not ok:
            raise ConfigError(f"{source}: {key}: expected {expected}, got {_show(value)}")


def padded_vocab_size(vocab_size: int, multiple: int = 64) -> int:
    """Embedding rows for a vocabulary, rounded up so the decoder GEMM stays tensor-core aligned."""
    return multiple * math.ceil(vocab_size / multiple)


def compile_backend(name: str) -> str:
    """argparse type of --compile: a torch.compile backend that this torch knows."""
    import argparse

    import torch._dynamo

    if name not in torch._dynamo.list_backends(exclude_tags=()):
        raise argparse.ArgumentTypeError(f"unknown torch.compile backend {name!r}; expected one of "
                                         f"{', '.join(torch._dynamo.list_backends())} (or a debug backend)")
    return name
