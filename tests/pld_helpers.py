"""Shared helpers for the pld_ds tests: a tiny model, synthetic batches, subprocess environments."""

from __future__ import annotations

import contextlib
import copy
import csv
import hashlib
import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from pld_ds.config import model_config
from pld_ds.data.schema import IGNORE_INDEX
from pld_ds.model import BertConfig, BertForPreTraining

REPO = Path(__file__).resolve().parents[1]
DS_CONFIGS = REPO / "ds_configs"
TINY_VOCAB = 100
# Variables PLDEngine sets in the test process; a child process must not inherit them (it would
# try to join this process's rendezvous).
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "CROSS_RANK", "CROSS_SIZE")


def tiny_config(dropout: float = 0.0, **overrides: Any) -> BertConfig:
    return model_config("tiny", vocab_size=TINY_VOCAB, hidden_dropout=dropout, attention_dropout=dropout, **overrides)


def tiny_model(seed: int = 0, dropout: float = 0.0, **overrides: Any) -> BertForPreTraining:
    torch.manual_seed(seed)
    return BertForPreTraining(tiny_config(dropout, **overrides))


def synthetic_batch(batch: int = 4, seq_len: int = 16, vocab: int = TINY_VOCAB, seed: int = 0,
                    pad: bool = True) -> dict[str, torch.Tensor]:
    """Random ids, some padding at the end of rows, ~25% of the real positions labelled."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, vocab, (batch, seq_len), generator=g)
    lengths = torch.randint(seq_len // 2, seq_len + 1, (batch,), generator=g) if pad else torch.full((batch,), seq_len)
    attention_mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
    input_ids = input_ids * attention_mask
    labelled = (torch.rand(batch, seq_len, generator=g) < 0.25) & attention_mask.bool()
    labelled[:, 0] = False
    labelled[:, 1] = True  # at least one target per row
    labels = torch.where(labelled, torch.randint(5, vocab, (batch, seq_len), generator=g), IGNORE_INDEX)
    token_type_ids = (torch.arange(seq_len)[None, :] >= (lengths[:, None] // 2)).long() * attention_mask
    return {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask,
            "masked_lm_labels": labels, "next_sentence_labels": torch.randint(0, 2, (batch,), generator=g)}


def checksum(module: torch.nn.Module) -> str:
    """A digest of every parameter (names and values): replicas that agree have equal checksums."""
    return checksum_of(dict(module.named_parameters()))


def checksum_of(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name, p in tensors.items():
        digest.update(name.encode())
        digest.update(p.detach().float().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def load_ds_config(name: str = "tiny_cpu_pld.json") -> dict[str, Any]:
    return copy.deepcopy(json.loads((DS_CONFIGS / name).read_text()))


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data, indent=2))
    return path


def child_env() -> dict[str, str]:
    """The environment for a subprocess: no rendezvous variables inherited from this process."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


# Master ports handed to multi-process runs: DeepSpeed's CPU all-reduce leaves a shared-memory buffer
# per rank in /dev/shm named by address and port (69 MB each, never unlinked); conftest removes ours.
USED_PORTS: list[int] = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    USED_PORTS.append(port)
    return port


def remove_shm_buffers(ports: list[int], folder: Path = Path("/dev/shm")) -> int:
    """Unlink DeepSpeed's CPU all-reduce buffers of these master ports; how many were removed."""
    removed = 0
    for port in ports:
        for path in folder.glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
            with contextlib.suppress(OSError):
                path.unlink()
                removed += 1
    return removed


def read_csv_scalar(path: Path) -> list[tuple[int, float]]:
    """(step, value) rows of a DeepSpeed csv_monitor file; header rows (repeated on resume) are skipped."""
    rows = []
    with open(path, newline="") as f:
        for row in csv.reader(f):
            if row and row[0] != "step":
                rows.append((int(row[0]), float(row[1])))
    return rows


def csv_segments(path: Path) -> list[list[tuple[int, float]]]:
    """Rows of a csv_monitor file split at each header: one segment per process that appended to it."""
    segments: list[list[tuple[int, float]]] = []
    with open(path, newline="") as f:
        for row in csv.reader(f):
            if not row:
                continue
            if row[0] == "step":
                segments.append([])
            else:
                segments[-1].append((int(row[0]), float(row[1])))
    return segments


@contextlib.contextmanager
def torch_threads(num: int) -> Iterator[None]:
    """Tiny models run fastest on one thread, and a shared 2-core machine thrashes with more."""
    before = torch.get_num_threads()
    torch.set_num_threads(num)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def console_script(name: str) -> str:
    """A console script of this interpreter's environment (found even when the venv is not activated)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name
