"""Export a pld_ds checkpoint as a Hugging Face model folder (RoBERTa-PreLayerNorm).

    pld-export runs/base-pld exported/base-pld            (also: python -m pld_ds.export ...)

CHECKPOINT is a run folder (holding checkpoints/latest), a checkpoints folder (holding `latest`) or
one global_stepN folder. ZeRO-1/2/3 checkpoints are merged into full fp32 weights. The output holds
config.json, model.safetensors, vocab.txt and tokenizer files, so that
`AutoModelForMaskedLM.from_pretrained(OUTPUT)` and `AutoTokenizer.from_pretrained(OUTPUT)` work.

transformers' RobertaPreLayerNorm is our architecture: LayerNorm after the embeddings, PreLN layers, a
final LayerNorm, an MLM head (dense, exact GELU, LayerNorm, decoder tied to the word embeddings) and a
classification head shaped like BERT's pooler (dense, tanh, linear). Our pooler goes to
pooler.safetensors, not model.safetensors, so that loading the masked-LM model reports no unexpected
weights; `load_pooler` (and pld-finetune --hf) puts it into a sequence classifier. Two differences are
bridged here: RoBERTa numbers positions from pad_token_id + 1, so our position table is written shifted
by that offset (pad tokens look up row pad_token_id, whose output nobody reads); and the query/key/value
projections are split out of our fused one. The NSP classifier has no counterpart and is left out.
EarlyBERT models export too: slimming coefficients are folded into the following projections and slim
layers are zero-padded to the full width (exact, but the pruned compute comes back).

Nothing is unpickled beyond tensors, plain containers, numpy arrays (older client states hold numpy's
RNG state) and four plain DeepSpeed record types in ZeRO optimizer files: every torch.load here runs
with weights_only=True, and the weights are written as safetensors.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pld_ds import checkpoint
from pld_ds.config import ConfigError, model_config, padded_vocab_size, read_json
from pld_ds.data.schema import MANIFEST_NAME
from pld_ds.errors import ArgumentParser, UserError, one_line_errors
from pld_ds.model import BertConfig, BertForPreTraining

SPECIAL_TOKENS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                  "mask_token": "[MASK]"}
HF_ARCHITECTURE = "RobertaPreLayerNormForMaskedLM"
HF_MODEL_TYPE = "roberta-prelayernorm"
HF_PREFIX = "roberta_prelayernorm."
# A PostLN model (layer_norm "post") is the original BERT: transformers' BertForPreTraining, NSP head included.
BERT_ARCHITECTURE = "BertForPreTraining"
RUN_CONFIG = "run_config.json"
POOLER_FILE = "pooler.safetensors"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_STEP_DIR = re.compile(r"global_step(\d+)")
_OPTIM_FILE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")


# -- reading checkpoints safely -------------------------------------------------------------------


def safe_load(path: Path, deepspeed_records: bool = False) -> Any:
    """pld_ds.checkpoint.safe_load (weights_only=True), memory-mapped."""
    return checkpoint.safe_load(path, mmap=True)


def _newest_step_folder(folder: Path) -> Path | None:
    steps = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _STEP_DIR.fullmatch(p.name))]
    return max(steps)[1] if steps else None


def find_step_dir(path: str | Path) -> Path:
    """The global_stepN folder for a run folder, a checkpoints folder (via `latest`, else its newest
    global_stepN folder) or the folder itself."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: no such checkpoint folder")
    for folder in (path, path / "checkpoints"):
        latest = folder / "latest"
        if latest.is_file():
            tag = latest.read_text(encoding="utf-8").strip()
            # The tag names a sub-folder: nothing else (no path) may come out of the file.
            if not tag or Path(tag).name != tag or tag in (".", ".."):
                raise UserError(f"{latest}: expected the name of a checkpoint folder, got {tag!r}")
            if not (folder / tag).is_dir():
                raise UserError(f"{latest}: names {tag}, but {folder / tag} does not exist")
            return folder / tag
    if list(path.glob("*model_states.pt")) or list(path.glob("stage[0-9][0-9]/*model_states.pt")):
        return path
    for folder in (path, path / "checkpoints"):
        newest = _newest_step_folder(folder) if folder.is_dir() else None
        if newest is not None:
            return newest
    raise UserError(f"{path}: not a checkpoint: expected a run folder with checkpoints/latest, a folder with "
                    "a `latest` file, or a global_stepN folder with mp_rank_00_model_states.pt")


def _model_states_file(step_dir: Path) -> Path:
    if list(step_dir.glob("*mp_rank_01_model_states.pt")):
        raise UserError(f"{step_dir}: tensor- or pipeline-parallel checkpoints are not supported")
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if (step_dir / name).is_file():
            return step_dir / name
    raise UserError(f"{step_dir}: no mp_rank_00_model_states.pt (expected a DeepSpeed checkpoint folder)")


def _optim_files(step_dir: Path) -> list[Path]:
    """ZeRO optimizer partitions, in rank order (each holds its rank's slice of the fp32 weights)."""
    ranked = []
    for path in step_dir.glob("*_optim_states.pt"):
        match = _OPTIM_FILE.search(path.name)
        if match is None or int(match.group(2)) != 0:
            raise UserError(f"{path}: unexpected optimizer file (only data-parallel ZeRO checkpoints are supported)")
        ranked.append((int(match.group(1)), path))
    ranked.sort()
    if [rank for rank, _ in ranked] != list(range(len(ranked))):
        raise UserError(f"{step_dir}: optimizer files of ranks {[r for r, _ in ranked]}: some rank's file is missing")
    return [path for _, path in ranked]


def _merge_zero12(flat: list[list[torch.Tensor]], shapes: list[dict[str, Any]], paddings: list[list[int]] | None,
                  world: int, where: Path) -> dict[str, torch.Tensor]:
    """ZeRO-1/2: each parameter group is one flat vector split evenly across ranks, parameters laid end
    to end (with optional per-parameter alignment padding) and the whole padded to 2 * world."""
    out = {}
    for group, group_shapes in enumerate(shapes):
        vector = torch.cat([rank_groups[group] for rank_groups in flat])
        pads = paddings[group] if paddings else [0] * len(group_shapes)
        offset = 0
        for (name, shape), pad in zip(group_shapes.items(), pads, strict=True):
            numel = math.prod(shape)
            if offset + numel > vector.numel():
                raise UserError(f"{where}: ZeRO partitions hold {vector.numel()} values, too few for {name}")
            out[name] = vector[offset:offset + numel].view(tuple(shape)).float().clone()
            offset += numel + pad
        align = 2 * world
        if math.ceil(offset / align) != math.ceil(vector.numel() / align):
            raise UserError(f"{where}: ZeRO partitions hold {vector.numel()} values, the parameters {offset}")
    return out


def _merge_zero3(flat: list[list[torch.Tensor]], shapes: list[dict[str, Any]], world: int,
                 where: Path) -> dict[str, torch.Tensor]:
    """ZeRO-3: every parameter is split on its own, ceil(numel / world) values per rank, zero-padded."""
    per_rank = [torch.cat(groups) for groups in flat]
    out, offset = {}, 0
    for group_shapes in shapes:
        for name, shape in group_shapes.items():
            numel = math.prod(shape)
            part = math.ceil(numel / world)
            full = torch.cat([vector[offset:offset + part] for vector in per_rank])[:numel]
            if full.numel() != numel:
                raise UserError(f"{where}: ZeRO-3 partitions end before {name}")
            out[name] = full.view(tuple(shape)).float().clone()
            offset += part
    if offset != per_rank[0].numel():
        raise UserError(f"{where}: ZeRO-3 partitions hold {per_rank[0].numel()} values per rank, "
                        f"the parameters {offset}")
    return out


def _zero_weights(states: dict[str, Any], optim_files: list[Path], where: Path) -> tuple[dict[str, torch.Tensor], int]:
    """fp32 master weights from ZeRO optimizer partitions, and the ZeRO stage."""
    optims = []
    for path in optim_files:
        loaded = safe_load(path, deepspeed_records=True)
        if not isinstance(loaded, dict) or not isinstance(loaded.get("optimizer_state_dict"), dict):
            raise UserError(f"{path}: no optimizer_state_dict (expected a DeepSpeed ZeRO optimizer file)")
        optims.append(loaded["optimizer_state_dict"])
    first = optims[0]
    stage = int(first.get("zero_stage", 0))
    world = first.get("partition_count", len(optims))
    world = max(world) if isinstance(world, list) else int(world)
    if world != len(optims):
        raise UserError(f"{where}: {len(optims)} optimizer files for a data-parallel world of {world}")
    shapes = states.get("param_shapes")
    if not isinstance(shapes, list) or not shapes:
        raise UserError(f"{where}: the model states file has no param_shapes (expected a ZeRO checkpoint)")
    if states.get("frozen_param_shapes"):
        raise UserError(f"{where}: checkpoints with frozen parameters are not supported")
    key = "fp32_flat_groups" if stage == 3 else "single_partition_of_fp32_groups"
    if any(key not in optim for optim in optims):
        raise UserError(f"{where}: optimizer files lack {key} (ZeRO stage {stage})")
    flat = [optim[key] for optim in optims]
    if stage == 3:
        weights = _merge_zero3(flat, shapes, world, where)
    else:
        weights = _merge_zero12(flat, shapes, first.get("param_alignment_paddings"), world, where)
    for name, source in (states.get("shared_params") or {}).items():  # tied weights are stored once
        weights[name] = weights[source]
    module = states.get("module") or {}
    for name in states.get("buffer_names") or []:
        weights[name] = module[name].float() if module[name].is_floating_point() else module[name].clone()
    return weights, stage


def _parameter_names(cfg: BertConfig) -> list[str]:
    """Names of the parameters in the order DeepSpeed's optimizer holds them (tied ones once)."""
    with torch.device("meta"):
        return [name for name, _ in BertForPreTraining(cfg).named_parameters()]


def _module_weights(states: dict[str, Any], cfg: BertConfig) -> dict[str, torch.Tensor]:
    """Weights of a checkpoint without ZeRO partitions: the module's, or the fp32 master copies of a
    bf16/fp16 optimizer (the module's are rounded to 16 bits)."""
    module = states["module"]
    weights = {name: tensor.float().clone() for name, tensor in module.items()}
    optimizer = states.get("optimizer")
    groups = optimizer.get("fp32_groups") if isinstance(optimizer, dict) else None
    low_precision = any(t.dtype in (torch.bfloat16, torch.float16) for t in module.values())
    if groups and low_precision:
        masters = [t for group in groups for t in group]
        names = _parameter_names(cfg)
        fits = len(masters) == len(names) and all(
            tuple(m.shape) == tuple(module[n].shape) for m, n in zip(masters, names, strict=True))
        if fits:
            weights.update({name: master.float().clone() for name, master in zip(names, masters, strict=True)})
            weights["heads.decoder.weight"] = weights["embeddings.word.weight"]
        else:
            warnings.warn("the optimizer's fp32 master weights do not line up with the model's parameters: "
                          f"exporting the {next(iter(module.values())).dtype} module weights", stacklevel=2)
    return weights


def merge_pipeline_stages(step_dir: Path, stage_dirs: list[Path]) -> dict[str, torch.Tensor]:
    """One state dict from the stages of a pipeline checkpoint (pld_ds.pipeline): each stage's module weights
    under BertForPreTraining's names, which the stage saved beside them. The tied word embedding is in the
    first and the last stage, equal; the first stage's copy is kept."""
    weights: dict[str, torch.Tensor] = {}
    expected = None
    for folder in stage_dirs:
        states = safe_load(_model_states_file(folder))
        pipe = states.get("pipeline") if isinstance(states, dict) else None
        if not isinstance(pipe, dict) or not isinstance(pipe.get("names"), dict):
            raise UserError(f"{folder}: no pipeline.names in the model states (expected a pld_ds pipeline checkpoint)")
        expected = pipe.get("stages")
        for name, tensor in states["module"].items():
            full = pipe["names"].get(name, name)
            weights.setdefault(full, tensor.float().clone())
    if expected != len(stage_dirs):
        raise UserError(f"{step_dir}: {len(stage_dirs)} stage folders for a {expected}-stage pipeline checkpoint")
    return weights


@dataclass(frozen=True)
class Checkpoint:
    """A pld_ds checkpoint read into memory: fp32 weights under BertForPreTraining's names."""

    state_dict: dict[str, torch.Tensor]
    config: BertConfig
    step_dir: Path
    run_config: dict[str, Any] = field(default_factory=dict)
    run_config_path: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)  # global step, ZeRO stage, PLD state, DeepSpeed version


def _find_run_config(step_dir: Path) -> Path | None:
    for folder in (step_dir.parent.parent, step_dir.parent, step_dir):
        if (folder / RUN_CONFIG).is_file():
            return folder / RUN_CONFIG
    return None


def _config_from_run(path: Path, run_config: dict[str, Any]) -> BertConfig:
    fields = run_config.get("model")
    known = {f.name for f in dataclasses.fields(BertConfig)}
    if not isinstance(fields, dict):
        raise ConfigError(f"{path}: model: expected an object of BertConfig fields")
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(f"{path}: model.{unknown[0]}: unknown key (expected BertConfig fields)")
    try:
        return BertConfig(**fields)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{path}: model: {err}") from None


def _strip_compile_prefix(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name.replace("_orig_mod.", ""): tensor for name, tensor in weights.items()}


def load_checkpoint(path: str | Path, model: str | None = None) -> Checkpoint:
    """Read a checkpoint (run folder, checkpoints folder or global_stepN folder) into fp32 weights.

    The model's shape comes from the run's run_config.json, or from `model` (a preset name or a JSON
    file of BertConfig fields, with the vocabulary size taken from the weights) when given.
    """
    step_dir = find_step_dir(path)
    run_config_path = _find_run_config(step_dir)
    if model is None and run_config_path is None:
        raise UserError(f"{step_dir}: no {RUN_CONFIG} in the run folder: pass --model (preset or JSON) "
                        "with the shape the checkpoint was trained with")
    run_config = read_json(run_config_path, "run config") if run_config_path else {}
    stage_dirs = sorted(p for p in step_dir.glob("stage[0-9][0-9]") if p.is_dir())  # a pipeline's parts
    states = safe_load(_model_states_file(stage_dirs[-1] if stage_dirs else step_dir))
    if not isinstance(states, dict) or not isinstance(states.get("module"), dict):
        raise UserError(f"{step_dir}: the model states file has no module state dict")
    optim_files = [] if stage_dirs else _optim_files(step_dir)
    weights, stage = _zero_weights(states, optim_files, step_dir) if optim_files else (None, 0)
    if stage_dirs:
        weights = merge_pipeline_stages(step_dir, stage_dirs)
    if model is None:
        cfg = _config_from_run(run_config_path, run_config)
    else:  # ZeRO-3 leaves the module's tensors empty: the merged weights know the vocabulary size
        word = (states["module"] if weights is None else weights).get("embeddings.word.weight")
        cfg = model_config(model, vocab_size=None if word is None else word.shape[0])
    if weights is None:
        weights = _module_weights(states, cfg)
    weights = _strip_compile_prefix(weights)
    _check_fits(weights, cfg, step_dir, run_config_path if model is None else model)
    info = {"global_step": states.get("global_steps"), "zero_stage": stage, "ds_version": states.get("ds_version"),
            "pld": states.get("pld"), "seed": states.get("seed")}
    return Checkpoint(weights, cfg, step_dir, run_config, run_config_path, info)


def _check_fits(weights: dict[str, torch.Tensor], cfg: BertConfig, step_dir: Path, shape_source: Any) -> None:
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in BertForPreTraining(cfg).state_dict().items()}
    problems = [f"missing {n}" for n in expected if n not in weights]
    problems += [f"unexpected {n}" for n in weights if n not in expected]
    problems += [f"{n} has shape {tuple(weights[n].shape)}, the model {s}"
                 for n, s in expected.items() if n in weights and tuple(weights[n].shape) != s]
    if problems:
        raise UserError(f"{step_dir}: the weights do not fit the model of {shape_source}: {'; '.join(problems[:3])}"
                        f"{' ...' if len(problems) > 3 else ''}")


# -- vocabulary -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Vocab:
    path: Path
    tokens: list[str]
    lowercase: bool

    def id(self, token: str) -> int:
        return self.tokens.index(token)


def read_vocab_tokens(path: Path) -> list[str]:
    try:
        tokens = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read the vocabulary: {err}") from None
    missing = [t for t in SPECIAL_TOKENS.values() if t not in tokens]
    if missing:
        raise UserError(f"{path}: no {', '.join(missing)} token (expected a BERT WordPiece vocab.txt)")
    return tokens


def looks_lowercase(tokens: list[str]) -> bool:
    """A vocabulary without upper-case letters outside its [SPECIAL] tokens was built from lowered text."""
    return not any(ch.isupper() for t in tokens if not (t.startswith("[") and t.endswith("]")) for ch in t)


def _data_folders(run_config: dict[str, Any], run_config_path: Path | None) -> Iterator[Path]:
    """Where the run's --data folder may be: as written, or relative to a folder above the run."""
    data = (run_config.get("args") or {}).get("data")
    if not isinstance(data, str) or not data:
        return
    data_path = Path(data)
    yield data_path
    if not data_path.is_absolute() and run_config_path is not None:
        for parent in run_config_path.resolve().parents:
            yield parent / data_path


def find_vocab(checkpoint: Checkpoint, vocab: str | Path | None = None, lowercase: bool | None = None) -> Vocab:
    """The vocabulary the checkpoint was trained with: `vocab` when given, else the one named by the
    manifest of the run's --data folder. Lower-casing: `lowercase`, else the manifest's, else guessed."""
    manifest_lowercase = None
    path = Path(vocab) if vocab is not None else None
    if path is None:
        for folder in _data_folders(checkpoint.run_config, checkpoint.run_config_path):
            manifest = folder / MANIFEST_NAME
            entry = read_json(manifest, "manifest").get("vocab") if manifest.is_file() else None
            name = entry.get("file") if isinstance(entry, dict) else None
            candidate = folder / (name if isinstance(name, str) else "vocab.txt")
            if candidate.is_file():
                path = candidate
                if isinstance(entry, dict) and isinstance(entry.get("lowercase"), bool):
                    manifest_lowercase = entry["lowercase"]
                break
    if path is None:
        raise UserError(f"{checkpoint.step_dir}: cannot find the vocabulary of the run's data folder: "
                        "pass --vocab FILE (the vocab.txt the shards were made with)")
    tokens = read_vocab_tokens(path)
    if len(tokens) > checkpoint.config.vocab_size:
        raise UserError(f"{path}: {len(tokens)} tokens, more than the model's "
                        f"{checkpoint.config.vocab_size} embeddings")
    if checkpoint.config.vocab_size > padded_vocab_size(len(tokens)):  # beyond the rounding up for alignment
        print(f"pld-export: warning: {path}: {len(tokens)} tokens for the model's {checkpoint.config.vocab_size} "
              f"embedding rows: rows {len(tokens)} on were never trained (--vocab-size above the shards' "
              "vocabulary?); the export keeps them, and the tokenizer never produces their ids", file=sys.stderr)
    if lowercase is None:
        lowercase = manifest_lowercase if manifest_lowercase is not None else looks_lowercase(tokens)
    return Vocab(path, tokens, lowercase)


# -- to Hugging Face ------------------------------------------------------------------------------


def position_offset(pad_token_id: int) -> int:
    """RoBERTa gives the token at index i (0-based, no padding before it) position pad_token_id + 1 + i."""
    return pad_token_id + 1


def full_width_layer(weights: dict[str, torch.Tensor], prefix: str, cfg: BertConfig) -> dict[str, torch.Tensor]:
    """One layer's projections at the config's full width, for transformers' uniform layers.

    EarlyBERT's slimming coefficients scale a head's context or a neuron's activation, so they fold
    exactly into the columns of the projection that follows. A slim layer (fewer heads or neurons)
    is padded with zero heads and neurons: a zero head attends uniformly to zero values and a zero
    neuron's GELU is 0, and their output columns are zero, so neither changes the layer's output.
    """
    head_dim = cfg.hidden_size // cfg.num_heads
    qkv_w, qkv_b = weights[prefix + "attn.qkv.weight"], weights[prefix + "attn.qkv.bias"]
    out_w, fc1_w = weights[prefix + "attn.out.weight"], weights[prefix + "ffn.fc1.weight"]
    fc1_b, fc2_w = weights[prefix + "ffn.fc1.bias"], weights[prefix + "ffn.fc2.weight"]
    head_coef, neuron_coef = weights.get(prefix + "attn.head_coef"), weights.get(prefix + "ffn.neuron_coef")
    if head_coef is not None:
        out_w = out_w * head_coef.to(out_w.dtype).repeat_interleave(head_dim)[None, :]
    if neuron_coef is not None:
        fc2_w = fc2_w * neuron_coef.to(fc2_w.dtype)[None, :]
    width, full = qkv_w.shape[0] // 3, cfg.num_heads * head_dim

    def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
        return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])]) if t.shape[0] < rows else t

    qkv_w = torch.cat([pad_rows(part, full) for part in qkv_w.split(width)])
    qkv_b = torch.cat([pad_rows(part, full) for part in qkv_b.split(width)])
    return {"attn.qkv.weight": qkv_w, "attn.qkv.bias": qkv_b, "attn.out.weight": pad_rows(out_w.T, full).T,
            "ffn.fc1.weight": pad_rows(fc1_w, cfg.intermediate_size),
            "ffn.fc1.bias": pad_rows(fc1_b, cfg.intermediate_size),
            "ffn.fc2.weight": pad_rows(fc2_w.T, cfg.intermediate_size).T}


def layer_linears(weights: dict[str, torch.Tensor], layer: dict[str, torch.Tensor], ours: str, theirs: str
                  ) -> dict[str, torch.Tensor]:
    """One encoder layer's linear maps under transformers' names (BERT and its PreLN variants alike). Our fused
    projection's rows are [query; key; value], each heads x head_dim like transformers'; `layer` holds the
    full-width (unpruned) tensors, `weights` the biases that pruning never narrows."""
    hf = {}
    for suffix in ("weight", "bias"):
        q, k, v = layer[f"attn.qkv.{suffix}"].chunk(3, dim=0)
        for proj, tensor in (("query", q), ("key", k), ("value", v)):
            hf[f"{theirs}attention.self.{proj}.{suffix}"] = tensor
    hf[theirs + "attention.output.dense.weight"] = layer["attn.out.weight"]
    hf[theirs + "attention.output.dense.bias"] = weights[ours + "attn.out.bias"]
    hf[theirs + "intermediate.dense.weight"] = layer["ffn.fc1.weight"]
    hf[theirs + "intermediate.dense.bias"] = layer["ffn.fc1.bias"]
    hf[theirs + "output.dense.weight"] = layer["ffn.fc2.weight"]
    hf[theirs + "output.dense.bias"] = weights[ours + "ffn.fc2.bias"]
    return hf


def exported_position_offset(cfg: BertConfig, pad_token_id: int) -> int:
    """Rows our position table is shifted by in the export: RoBERTa's offset for PreLN, none for BERT (PostLN)."""
    return 0 if cfg.layer_norm == "post" else position_offset(pad_token_id)


def bert_state_dict(weights: dict[str, torch.Tensor], cfg: BertConfig) -> dict[str, torch.Tensor]:
    """A PostLN model's names and layouts -> transformers' BertForPreTraining: our attn_norm is the LayerNorm
    after the attention's residual add (attention.output.LayerNorm), ffn_norm the one after the feed-forward's
    (output.LayerNorm); positions start at 0; the pooler and NSP classifier map one to one."""
    hf: dict[str, torch.Tensor] = {}
    emb = "bert.embeddings."

    def copy(ours: str, theirs: str) -> None:
        for suffix in ("weight", "bias"):
            hf[f"{theirs}.{suffix}"] = weights[f"{ours}.{suffix}"]

    hf[emb + "word_embeddings.weight"] = weights["embeddings.word.weight"]
    hf[emb + "position_embeddings.weight"] = weights["embeddings.position.weight"]
    hf[emb + "token_type_embeddings.weight"] = weights["embeddings.token_type.weight"]
    copy("embeddings.norm", emb + "LayerNorm")
    for i in range(cfg.num_layers):
        ours, theirs = f"encoder.layers.{i}.", f"bert.encoder.layer.{i}."
        layer = full_width_layer(weights, ours, cfg)
        hf.update(layer_linears(weights, layer, ours, theirs))
        copy(ours + "attn_norm", theirs + "attention.output.LayerNorm")
        copy(ours + "ffn_norm", theirs + "output.LayerNorm")
    copy("heads.transform", "cls.predictions.transform.dense")
    copy("heads.transform_norm", "cls.predictions.transform.LayerNorm")
    hf["cls.predictions.decoder.weight"] = weights["embeddings.word.weight"]
    hf["cls.predictions.decoder.bias"] = hf["cls.predictions.bias"] = weights["heads.decoder.bias"]
    if "heads.pooler.weight" in weights:  # an MLM-only model (nsp false) has neither pooler nor NSP head
        copy("heads.pooler", "bert.pooler.dense")
        copy("heads.nsp", "cls.seq_relationship")
    return {name: tensor.detach().contiguous().clone() for name, tensor in hf.items()}


def hf_state_dict(weights: dict[str, torch.Tensor], cfg: BertConfig, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Our names and layouts -> RobertaPreLayerNormForMaskedLM's (the classification head's dense is our pooler);
    a PostLN model -> BertForPreTraining's (bert_state_dict)."""
    if cfg.layer_norm == "post":
        return bert_state_dict(weights, cfg)
    hf: dict[str, torch.Tensor] = {}
    base, emb = HF_PREFIX, HF_PREFIX + "embeddings."

    def copy(ours: str, theirs: str) -> None:
        for suffix in ("weight", "bias"):
            hf[f"{theirs}.{suffix}"] = weights[f"{ours}.{suffix}"]

    hf[emb + "word_embeddings.weight"] = weights["embeddings.word.weight"]
    hf[emb + "token_type_embeddings.weight"] = weights["embeddings.token_type.weight"]
    ours_positions = weights["embeddings.position.weight"]
    offset = position_offset(pad_token_id)
    positions = torch.zeros(cfg.max_position_embeddings + offset, cfg.hidden_size, dtype=ours_positions.dtype)
    positions[offset:] = ours_positions
    hf[emb + "position_embeddings.weight"] = positions
    copy("embeddings.norm", emb + "LayerNorm")
    for i in range(cfg.num_layers):
        ours, theirs = f"encoder.layers.{i}.", f"{base}encoder.layer.{i}."
        layer = full_width_layer(weights, ours, cfg)
        copy(ours + "attn_norm", theirs + "attention.LayerNorm")
        copy(ours + "ffn_norm", theirs + "intermediate.LayerNorm")
        hf.update(layer_linears(weights, layer, ours, theirs))
    copy("encoder.final_norm", base + "LayerNorm")
    copy("heads.transform", "lm_head.dense")
    copy("heads.transform_norm", "lm_head.layer_norm")
    hf["lm_head.bias"] = weights["heads.decoder.bias"]  # decoder weight and bias are tied in transformers
    return {name: tensor.detach().contiguous().clone() for name, tensor in hf.items()}


def pooler_state_dict(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our NSP pooler (dense, tanh on [CLS]) under the name of the dense layer of transformers' sequence
    classification head, which has the same shape and activation. It goes to its own file, not model.safetensors:
    the masked-LM model that config.json names has no such layer, and transformers would report it as UNEXPECTED
    on every load."""
    if "heads.pooler.weight" not in weights:  # an MLM-only model (nsp false) has no pooler
        return {}
    return {f"classifier.dense.{s}": weights[f"heads.pooler.{s}"].detach().contiguous().clone()
            for s in ("weight", "bias")}


def load_pooler(model: torch.nn.Module, folder: str | Path) -> bool:
    """Put an export's pooler into a transformers sequence classifier (its classifier.dense); False when the
    folder has no pooler file (an export of an MLM-only model, or a folder pld-export did not write)."""
    path = Path(folder) / POOLER_FILE
    dense = getattr(getattr(model, "classifier", None), "dense", None)
    if not path.is_file() or dense is None:
        return False
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    with torch.no_grad():
        for suffix in ("weight", "bias"):
            theirs, ours = getattr(dense, suffix), tensors.get(f"classifier.dense.{suffix}")
            if ours is None or ours.shape != theirs.shape:
                raise UserError(f"{path}: classifier.dense.{suffix}: expected a tensor of shape {tuple(theirs.shape)}, "
                                f"got {None if ours is None else tuple(ours.shape)}")
            theirs.copy_(ours)
    return True


def from_hf_state_dict(tensors: dict[str, torch.Tensor], cfg: BertConfig, pad_token_id: int) -> dict[str, torch.Tensor]:
    """The export's inverse, derived from the export itself rather than written a second time: each of our tensors
    is filled with its element numbers, mapped as export_weights maps weights (hf_state_dict, and pooler_state_dict
    beside the RoBERTa layout), and the numbers then tell where each exported value came from.

    ``tensors``: model.safetensors (and pooler.safetensors) of a pld-export folder of ``cfg`` at full width (a slim
    EarlyBERT model is exported zero-padded to it). Returns fp32 weights under BertForPreTraining's names; a tensor
    the export does not hold (the NSP classifier beside the RoBERTa layout, a pooler whose file is missing) is left
    out. Raises KeyError(name) for an exported tensor that is missing and ValueError for one of another shape.
    The element numbers cost two int32 copies of the model while this runs (int64 past 2**31 parameters).
    """
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in BertForPreTraining(cfg).state_dict().items()}
    tied = "heads.decoder.weight"  # the word embeddings, stored once
    sizes = {name: math.prod(shape) for name, shape in shapes.items() if name != tied}
    total = sum(sizes.values()) + 1  # element number 0 marks the zeros the export pads with
    index_dtype = torch.int32 if total < 2**31 else torch.int64
    starts, probe, first = {}, {}, 1
    for name, size in sizes.items():
        starts[name] = first
        probe[name] = torch.arange(first, first + size, dtype=index_dtype).view(shapes[name])
        first += size
    probe[tied] = probe["embeddings.word.weight"]
    mapped = hf_state_dict(probe, cfg, pad_token_id)
    if any(name.startswith(HF_PREFIX) for name in mapped):
        mapped.update(pooler_state_dict(probe))
    del probe
    values = torch.zeros(total, dtype=torch.float32)
    seen = torch.zeros(total, dtype=torch.bool)
    for name, index in mapped.items():
        if name not in tensors:
            if name.startswith("classifier.dense."):  # the pooler's own file was not given
                continue
            raise KeyError(name)
        value = tensors[name]
        if tuple(value.shape) != tuple(index.shape):
            raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {tuple(index.shape)}")
        real = index != 0
        values[index[real].long()] = value[real].float()
        seen[index[real].long()] = True
    weights = {name: values[starts[name]:starts[name] + size].view(shapes[name]).clone()
               for name, size in sizes.items() if seen[starts[name]:starts[name] + size].all()}
    if "embeddings.word.weight" in weights:
        weights[tied] = weights["embeddings.word.weight"]
    return weights


def hf_config(cfg: BertConfig, vocab: Vocab, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    pad = vocab.id(SPECIAL_TOKENS["pad_token"])
    post = cfg.layer_norm == "post"
    return {
        "architectures": [BERT_ARCHITECTURE if post else HF_ARCHITECTURE],
        "model_type": "bert" if post else HF_MODEL_TYPE,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.intermediate_size,
        "hidden_act": "gelu",  # the exact (erf) GELU, as torch.nn.functional.gelu
        "hidden_dropout_prob": cfg.hidden_dropout,
        "attention_probs_dropout_prob": cfg.attention_dropout,
        "max_position_embeddings": cfg.max_position_embeddings + exported_position_offset(cfg, pad),
        "type_vocab_size": cfg.type_vocab_size,
        "initializer_range": cfg.initializer_range,
        "layer_norm_eps": cfg.layer_norm_eps,
        "pad_token_id": pad,
        "bos_token_id": vocab.id(SPECIAL_TOKENS["cls_token"]),
        "eos_token_id": vocab.id(SPECIAL_TOKENS["sep_token"]),
        "tie_word_embeddings": True,
        "classifier_dropout": None,
        # transformers 5 reads "dtype", 4.x "torch_dtype"
        "dtype": str(dtype).removeprefix("torch."),
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def tokenizer_files(vocab: Vocab, max_length: int) -> dict[str, str]:
    """tokenizer_config.json and special_tokens_map.json for a BERT WordPiece tokenizer on vocab.txt."""
    config = {"tokenizer_class": "BertTokenizer", "do_lower_case": vocab.lowercase, "strip_accents": None,
              "tokenize_chinese_chars": True, "model_max_length": max_length,
              "clean_up_tokenization_spaces": False, **SPECIAL_TOKENS}
    return {"tokenizer_config.json": json.dumps(config, indent=2) + "\n",
            "special_tokens_map.json": json.dumps(SPECIAL_TOKENS, indent=2) + "\n"}


def _check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not overwrite:
        raise UserError(f"{out}: exists and is not empty (pass --overwrite to replace it)")


def _write_folder(out: Path, overwrite: bool, write: Any) -> None:
    """Build the folder beside its destination, then rename it into place: never a half-written export."""
    _check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(tmp)
        # mkdtemp (and safetensors) make private files; an export is meant to be shared
        os.chmod(tmp, 0o755)
        for path in tmp.iterdir():
            os.chmod(path, 0o644)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def export_weights(weights: dict[str, torch.Tensor], cfg: BertConfig, vocab: Vocab, out: str | Path, *,
                   dtype: torch.dtype = torch.float32, overwrite: bool = False,
                   provenance: dict[str, Any] | None = None) -> Path:
    """Write a Hugging Face folder for BertForPreTraining weights: config.json, model.safetensors,
    vocab.txt, tokenizer.json and tokenizer configs, and pld_export.json (where it came from)."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise UserError("pld-export needs safetensors: pip install 'pld_ds[hf]'") from None
    from tokenizers import BertWordPieceTokenizer

    pad = vocab.id(SPECIAL_TOKENS["pad_token"])
    tensors = {name: t.to(dtype) for name, t in hf_state_dict(weights, cfg, pad).items()}
    # the RoBERTa layout has no pooler of its own: ours goes beside it
    roberta = any(name.startswith(HF_PREFIX) for name in tensors)
    pooler = {name: t.to(dtype) for name, t in pooler_state_dict(weights).items()} if roberta else {}
    out = Path(out)

    def write(folder: Path) -> None:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        if pooler:
            save_file(pooler, str(folder / POOLER_FILE), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(hf_config(cfg, vocab, dtype), indent=2) + "\n")
        (folder / "vocab.txt").write_text("\n".join(vocab.tokens) + "\n", encoding="utf-8")
        for name, text in tokenizer_files(vocab, cfg.max_position_embeddings).items():
            (folder / name).write_text(text)
        tokenizer = BertWordPieceTokenizer(str(folder / "vocab.txt"), lowercase=vocab.lowercase)
        tokenizer.save(str(folder / "tokenizer.json"))
        record = {"model": dataclasses.asdict(cfg), "position_offset": exported_position_offset(cfg, pad),
                  "lowercase": vocab.lowercase, "pooler": POOLER_FILE if pooler else None, **(provenance or {})}
        (folder / "pld_export.json").write_text(json.dumps(record, indent=2, default=str) + "\n")

    _write_folder(out, overwrite, write)
    return out


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, vocab: str | Path | None = None,
                      lowercase: bool | None = None, model: str | None = None, dtype: torch.dtype = torch.float32,
                      overwrite: bool = False) -> Path:
    _check_output(Path(out), overwrite)  # before the seconds spent reading the checkpoint
    ckpt = load_checkpoint(checkpoint, model)
    found = find_vocab(ckpt, vocab, lowercase)
    provenance = {"checkpoint": str(ckpt.step_dir), "vocab": str(found.path), **ckpt.info}
    return export_weights(ckpt.state_dict, ckpt.config, found, out, dtype=dtype, overwrite=overwrite,
                          provenance=provenance)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="pld-export", description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="run folder, checkpoints folder (with `latest`) or global_stepN folder")
    p.add_argument("output", help="folder to write (config.json, model.safetensors, vocab.txt, tokenizer files)")
    p.add_argument("--vocab", metavar="FILE", help="vocab.txt (default: the one in the manifest of the run's --data)")
    p.add_argument("--lowercase", action=argparse.BooleanOptionalAction, default=None,
                   help="lower-case input text (default: the manifest's setting, else guessed from the vocab)")
    p.add_argument("--model", help="preset or JSON file of model fields, when the run has no run_config.json")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the exported weights")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with one_line_errors("pld-export", args.debug):
        out = export_checkpoint(args.checkpoint, args.output, vocab=args.vocab, lowercase=args.lowercase,
                                model=args.model, dtype=DTYPES[args.dtype], overwrite=args.overwrite)
    record = json.loads((out / "pld_export.json").read_text())
    architecture = json.loads((out / "config.json").read_text())["architectures"][0]
    print(f"pld-export: wrote {out} ({architecture}, step {record.get('global_step')}, "
          f"ZeRO stage {record.get('zero_stage')}, {args.dtype})")


if __name__ == "__main__":
    main()
