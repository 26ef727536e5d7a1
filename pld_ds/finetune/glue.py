"""GLUE tasks from the standard TSV layout (glue_data/<TASK>/{train,dev}.tsv) and their metrics.

The files are read as plain tab-separated lines, never with CSV quoting: sentences contain quote
characters. CoLA has no header line; MRPC's files start with a byte-order mark; STS-B's labels are
similarity scores in [0, 5]; test.tsv files carry no labels and are not read.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pld_ds.errors import UserError


@dataclass(frozen=True)
class Task:
    name: str  # as in the folder name: CoLA, SST-2, MRPC, STS-B, RTE
    header: bool
    text_a: int  # column indexes
    text_b: int | None
    label: int
    labels: tuple[str, ...] | None  # class labels in id order; None: a regression score
    metrics: tuple[str, ...]  # the first is the task's headline metric

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    @property
    def is_regression(self) -> bool:
        return self.labels is None


TASKS: dict[str, Task] = {t.name.lower(): t for t in (
    # CoLA: source, label, original label, sentence (no header)
    Task("CoLA", header=False, text_a=3, text_b=None, label=1, labels=("0", "1"), metrics=("mcc", "accuracy")),
    Task("SST-2", header=True, text_a=0, text_b=None, label=1, labels=("0", "1"), metrics=("accuracy",)),
    # MRPC: Quality, #1 ID, #2 ID, #1 String, #2 String
    Task("MRPC", header=True, text_a=3, text_b=4, label=0, labels=("0", "1"), metrics=("f1", "accuracy")),
    # STS-B: index, genre, filename, year, old_index, source1, source2, sentence1, sentence2, score
    Task("STS-B", header=True, text_a=7, text_b=8, label=9, labels=None, metrics=("spearman", "pearson")),
    Task("RTE", header=True, text_a=1, text_b=2, label=3, labels=("entailment", "not_entailment"),
         metrics=("accuracy",)),
)}


def get_task(name: str) -> Task:
    key = name.strip().lower()
    aliases = {"sst2": "sst-2", "stsb": "sts-b", "sts": "sts-b"}
    task = TASKS.get(aliases.get(key, key))
    if task is None:
        names = ", ".join(t.name for t in TASKS.values())
        raise UserError(f"--tasks: unknown task {name!r} (expected some of: {names})")
    return task


@dataclass(frozen=True)
class Example:
    text_a: str
    text_b: str | None
    label: float | int  # class id, or the score for regression


def read_split(task: Task, path: str | Path, limit: int | None = None) -> list[Example]:
    """The labelled examples of one split file; `limit` keeps the first N."""
    path = Path(path)
    try:
        # utf-8-sig drops MRPC's byte-order mark, which would otherwise glue itself to the first header
        with open(path, encoding="utf-8-sig", newline="") as f:
            lines = f.read().split("\n")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file (expected GLUE's {task.name}/{path.name})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read: {err}") from None
    needed = 1 + max(c for c in (task.text_a, task.text_b, task.label) if c is not None)
    examples = []
    for number, line in enumerate(lines, start=1):
        line = line.rstrip("\r")
        if not line or (task.header and number == 1):
            continue
        cols = line.split("\t")
        if len(cols) < needed:
            raise UserError(f"{path}:{number}: {len(cols)} tab-separated columns, {task.name} needs {needed}")
        raw = cols[task.label].strip()
        if task.labels is None:
            try:
                label: float | int = float(raw)
            except ValueError:
                raise UserError(f"{path}:{number}: label {raw!r} is not a number (STS-B scores are 0 to 5)") from None
            if not math.isfinite(label):
                raise UserError(f"{path}:{number}: label {raw!r} is not a finite number")
        elif raw in task.labels:
            label = task.labels.index(raw)
        else:
            raise UserError(f"{path}:{number}: label {raw!r} is not one of {', '.join(task.labels)}")
        examples.append(Example(cols[task.text_a], None if task.text_b is None else cols[task.text_b], label))
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise UserError(f"{path}: no labelled examples")
    return examples


# -- metrics --------------------------------------------------------------------------------------


def _binary_counts(preds: Sequence[int], labels: Sequence[int]) -> tuple[int, int, int, int]:
    p, y = np.asarray(preds), np.asarray(labels)
    if p.shape != y.shape:
        raise ValueError(f"{p.shape[0]} predictions for {y.shape[0]} labels")
    tp = int(np.sum((p == 1) & (y == 1)))
    tn = int(np.sum((p == 0) & (y == 0)))
    fp = int(np.sum((p == 1) & (y == 0)))
    fn = int(np.sum((p == 0) & (y == 1)))
    return tp, tn, fp, fn


def accuracy(preds: Sequence[int], labels: Sequence[int]) -> float:
    p, y = np.asarray(preds), np.asarray(labels)
    if p.shape != y.shape or p.size == 0:
        raise ValueError("accuracy needs as many predictions as labels, at least one")
    return float(np.mean(p == y))


def f1(preds: Sequence[int], labels: Sequence[int]) -> float:
    """F1 of the positive class (1); 0 when there is no positive prediction nor label."""
    tp, _, fp, fn = _binary_counts(preds, labels)
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def matthews_corrcoef(preds: Sequence[int], labels: Sequence[int]) -> float:
    """Matthews correlation for binary labels; 0 when a marginal is empty (as scikit-learn)."""
    tp, tn, fp, fn = _binary_counts(preds, labels)
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denominator if denominator else 0.0


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation; 0 for a constant input (it carries no information; scipy says nan)."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape or a.size < 2:
        raise ValueError("correlation needs two sequences of equal length, at least 2")
    a, b = a - a.mean(), b - b.mean()
    denominator = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / denominator if denominator else 0.0


def average_ranks(x: Sequence[float]) -> np.ndarray:
    """1-based ranks, ties sharing the mean of the ranks they span."""
    _, inverse, counts = np.unique(np.asarray(x, dtype=np.float64), return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    mean_rank = ends - (counts - 1) / 2.0  # the mean of (end - count + 1) .. end
    return mean_rank[inverse.reshape(-1)]


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    return pearson(average_ranks(x), average_ranks(y))


METRICS: dict[str, Callable[[Sequence, Sequence], float]] = {
    "accuracy": accuracy, "f1": f1, "mcc": matthews_corrcoef, "pearson": pearson, "spearman": spearman}


def task_metrics(task: Task, predictions: Sequence[float], labels: Sequence[float]) -> dict[str, float]:
    """The task's metrics for class ids (classification) or scores (regression)."""
    return {name: METRICS[name](predictions, labels) for name in task.metrics}
