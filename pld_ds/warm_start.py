"""Phase 2 of the BERT recipe: a run that starts from another run's weights, and from nothing else.

``pld-pretrain --init-from PATH`` reads the weights of a pld_ds checkpoint (a run folder, a
checkpoints folder or a global_stepN folder; ZeRO partitions merged) or of a ``pld-export`` folder;
the optimizer, the learning-rate schedule and the data position start anew. Every tensor must have
the shape of the model being trained, with two exceptions that a change of objective brings: the
NSP head (pooler and classifier) may be absent from the weights (it then starts from its
initialisation; a PreLN export holds the pooler but not the classifier) or absent from the model (MLM-only
phase 2: its weights are left out), and EarlyBERT's slimming coefficients may be absent (they start
at 1).

The position table is checked first and on its own: phase 2 at sequence length 512 needs 512
positions in phase 1's model already, which is why BERT's recipes give phase 1 a 512-position table
even though it trains at 128.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from pld_ds import export
from pld_ds.errors import UserError
from pld_ds.model import BertConfig

NSP_HEAD = ("heads.pooler.", "heads.nsp.")
SLIMMING = ("attn.head_coef", "ffn.neuron_coef")
EXPORT_RECORD = "pld_export.json"
POSITIONS = "embeddings.position.weight"


@dataclass(frozen=True)
class InitialWeights:
    state_dict: dict[str, torch.Tensor]
    # Optimizer steps these weights were trained for (the step theta was at), when the source records it.
    step: int | None
    source: str  # where they came from, for messages


def _record_step(record: dict) -> int | None:
    """The step theta was at: the PLD state's step (the engine's optimizer steps), else the global step."""
    def count(value: object) -> int | None:
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None

    pld = record.get("pld") if isinstance(record.get("pld"), dict) else {}
    step = count(pld.get("step"))
    if step is not None:  # a phase-2 checkpoint continued an earlier curve from its offset
        return step + (count(pld.get("step_offset")) or 0)
    return count(record.get("global_step"))


def read_initial_weights(path: str, model: str | None = None) -> InitialWeights:
    """Weights (fp32, BertForPreTraining's names) of a pld_ds checkpoint or a pld-export folder.

    ``model``: the shape to read a checkpoint with when its run folder has no run_config.json."""
    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"--init-from {path}: no such folder (expected a pld_ds checkpoint or a pld-export folder)")
    if (folder / EXPORT_RECORD).is_file():
        return _read_export(folder)
    step_dir = export.find_step_dir(folder)
    has_run_config = export._find_run_config(step_dir) is not None
    ckpt = export.load_checkpoint(folder, None if has_run_config else model)
    return InitialWeights(ckpt.state_dict, _record_step(ckpt.info), str(ckpt.step_dir))


def _read_export(folder: Path) -> InitialWeights:
    record_path = folder / EXPORT_RECORD
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        fields = dict(record["model"])
        offset = int(record["position_offset"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{record_path}: unreadable ({err}; expected the pld_export.json pld-export writes)") from None
    # Exported layers are full width (slim ones zero-padded, coefficients folded in).
    fields.update(layer_heads=None, layer_intermediate=None, slimming=False)
    known = {f.name for f in dataclasses.fields(BertConfig)}
    try:
        cfg = BertConfig(**{k: v for k, v in fields.items() if k in known})
    except (TypeError, ValueError) as err:
        raise UserError(f"{record_path}: model: {err}") from None
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise UserError("--init-from a pld-export folder needs safetensors: pip install 'pld_ds[hf]'") from None
    tensors: dict[str, torch.Tensor] = {}
    for name in ("model.safetensors", export.POOLER_FILE):
        path = folder / name
        if name == export.POOLER_FILE and not path.is_file():  # an MLM-only model has none
            continue
        try:
            tensors.update(load_file(str(path)))
        except (OSError, RuntimeError, ValueError) as err:  # safetensors reports a damaged file as any of these
            reason = str(err).strip()[:200]
            raise UserError(f"{path}: cannot read ({reason}; expected safetensors weights)") from None
    # Both layouts number positions from pad_token_id + 1 (RoBERTa) or from 0 (BERT): the export records it.
    pad = offset - 1 if offset > 0 else 0
    try:
        weights = export.from_hf_state_dict(tensors, cfg, pad)
    except KeyError as err:
        raise UserError(f"{folder}: no tensor {err.args[0]} (expected a pld-export folder of a "
                        f"{cfg.num_layers}-layer model)") from None
    except ValueError as err:
        raise UserError(f"{folder}: {err} (expected a pld-export folder of the model its pld_export.json "
                        "describes)") from None
    return InitialWeights(weights, _record_step(record), str(folder))


def load_into(model: torch.nn.Module, init: InitialWeights, seq_len: int, shape_source: str) -> list[str]:
    """Copy ``init`` into ``model`` after checking every shape; returns notes on what was left out or starts
    fresh. ``seq_len``: the sequence length of this run's data; ``shape_source``: what decided the model's shape."""
    where = f"--init-from {init.source}"
    weights = init.state_dict
    rows = weights[POSITIONS].shape[0] if POSITIONS in weights else None
    if rows is not None and rows < seq_len:
        raise UserError(f"{where}: {POSITIONS} has {rows} positions, fewer than this data's sequence length "
                        f"{seq_len}: phase 2 at length {seq_len} needs max_position_embeddings >= {seq_len} in phase "
                        f"1's model already (BERT's recipes use 512 from the start: train phase 1 with such a model)")
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    fresh, dropped = [], []
    for name, shape in expected.items():
        if name not in weights:
            if name.startswith(NSP_HEAD) or name.endswith(SLIMMING):
                fresh.append(name)
                continue
            raise UserError(f"{where}: no tensor {name} (the model of {shape_source} has one of shape {shape})")
        found = tuple(weights[name].shape)
        if found != shape:
            hint = ""
            if name == "embeddings.word.weight":
                hint = " (phase 2's data must use phase 1's vocabulary)"
            elif name == POSITIONS:
                hint = f" (--model must keep phase 1's max_position_embeddings, {found[0]})"
            raise UserError(f"{where}: {name} has shape {found}, the model of {shape_source} {shape}{hint}")
    for name in weights:
        if name not in expected:
            if not name.startswith(NSP_HEAD):
                raise UserError(f"{where}: has tensor {name} of shape {tuple(weights[name].shape)}, which the model "
                                f"of {shape_source} lacks")
            dropped.append(name)
    model.load_state_dict({k: v for k, v in weights.items() if k in expected}, strict=False)
    notes = []
    if any(n.startswith(NSP_HEAD) for n in fresh):
        notes.append("the NSP head starts from its initialisation (not in the weights)")
    if dropped:
        notes.append("the weights' NSP head is left out (this model is MLM-only)")
    if any(n.endswith(SLIMMING) for n in fresh):
        notes.append("EarlyBERT's slimming coefficients start at 1")
    return notes
