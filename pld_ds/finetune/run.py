"""Fine-tune a pld_ds checkpoint, or a Hugging Face model folder, on GLUE tasks and tabulate dev results.

    pld-finetune --init runs/base-pld --data glue_data --tasks rte,mrpc --lr 2e-5,3e-5 --output runs/glue
    pld-finetune --hf exported/base-pld --data glue_data --tasks sst-2 --output runs/glue-hf
    (also: python -m pld_ds.finetune ...)

Plain PyTorch: AdamW with linear warm-up and decay, gradient clipping at 1, every layer active. Each
comma-separated list (--lr, --batch-size, --epochs, --seed) spans a grid, run for every task; the
dev metrics after the last epoch are reported, and the best run per task by the task's headline
metric goes into the summary table (OUTPUT/summary.md, OUTPUT/results.json).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pld_ds.errors import ArgumentParser, UserError, one_line_errors
from pld_ds.finetune.glue import TASKS, Example, Task, get_task, read_split, task_metrics

# -- models and tokenizers ------------------------------------------------------------------------


@dataclass
class Encoded:
    """Token ids of a split, unpadded (each batch is padded to its longest row), and the labels."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]]
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.input_ids)


class Backbone:
    """A pretrained encoder and its tokenizer: makes classifiers and encodes sentence pairs."""

    name: str
    pad_id: int
    max_length: int  # the longest sequence the position table allows

    def encode_pairs(self, examples: Sequence[Example], max_length: int) -> tuple[list[list[int]], list[list[int]]]:
        raise NotImplementedError

    def classifier(self, num_labels: int) -> nn.Module:
        """A fresh classifier (pretrained encoder, new head); its forward returns logits."""
        raise NotImplementedError

    def encode(self, task: Task, examples: Sequence[Example], max_length: int) -> Encoded:
        ids, types = self.encode_pairs(examples, max_length)
        dtype = torch.float32 if task.is_regression else torch.long
        return Encoded(ids, types, torch.tensor([e.label for e in examples], dtype=dtype))


class _Logits(nn.Module):
    """Adapts a model whose output has .logits to a forward that returns the logits tensor."""

    def __init__(self, model: nn.Module, pass_token_types: bool = True) -> None:
        super().__init__()
        self.model = model
        self.pass_token_types = pass_token_types

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, attention_mask: torch.Tensor
                ) -> torch.Tensor:
        extra = {"token_type_ids": token_type_ids} if self.pass_token_types else {}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits


class CheckpointBackbone(Backbone):
    """A pld_ds checkpoint (run, checkpoints or global_stepN folder), tokenized with its WordPiece vocab."""

    def __init__(self, path: str, vocab: str | None = None, lowercase: bool | None = None,
                 model: str | None = None) -> None:
        from tokenizers import BertWordPieceTokenizer

        from pld_ds.export import SPECIAL_TOKENS, find_vocab, load_checkpoint

        self.checkpoint = load_checkpoint(path, model)
        self.vocab = find_vocab(self.checkpoint, vocab, lowercase)
        self.tokenizer = BertWordPieceTokenizer(str(self.vocab.path), lowercase=self.vocab.lowercase)
        self.pad_id = self.vocab.id(SPECIAL_TOKENS["pad_token"])
        self.max_length = self.checkpoint.config.max_position_embeddings
        self.name = f"{self.checkpoint.step_dir} (step {self.checkpoint.info.get('global_step')})"

    def encode_pairs(self, examples: Sequence[Example], max_length: int) -> tuple[list[list[int]], list[list[int]]]:
        self.tokenizer.enable_truncation(max_length, strategy="longest_first")
        inputs = [e.text_a if e.text_b is None else (e.text_a, e.text_b) for e in examples]
        encodings = self.tokenizer.encode_batch(inputs)  # [CLS] a [SEP] (b [SEP]), type ids 0 then 1
        return [e.ids for e in encodings], [e.type_ids for e in encodings]

    def classifier(self, num_labels: int) -> nn.Module:
        from pld_ds.model import BertForSequenceClassification, load_pretraining_weights

        model = BertForSequenceClassification(self.checkpoint.config, num_labels)
        load_pretraining_weights(model, self.checkpoint.state_dict)
        return _Logits(model)


class HFBackbone(Backbone):
    """A Hugging Face model folder (for example one written by pld-export), through transformers' Auto classes."""

    def __init__(self, folder: str) -> None:
        try:
            from transformers import AutoConfig, AutoTokenizer
        except ImportError:
            raise UserError("--hf needs transformers: pip install 'pld_ds[hf]'") from None
        path = Path(folder)
        if not (path / "config.json").is_file():
            raise UserError(f"--hf {folder}: no config.json (expected a Hugging Face model folder)")
        self.folder = folder
        try:
            self.config = AutoConfig.from_pretrained(folder)
            self.tokenizer = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError, KeyError) as err:
            raise UserError(f"--hf {folder}: {str(err).splitlines()[0]}") from None
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        limit = self.tokenizer.model_max_length
        self.max_length = int(limit) if limit and limit < 1_000_000 else int(self.config.max_position_embeddings)
        self.token_types = "token_type_ids" in self.tokenizer.model_input_names
        self.name = f"{folder} ({self.config.model_type})"

    def encode_pairs(self, examples: Sequence[Example], max_length: int) -> tuple[list[list[int]], list[list[int]]]:
        a = [e.text_a for e in examples]
        b = None if examples[0].text_b is None else [e.text_b for e in examples]
        enc = self.tokenizer(a, b, truncation="longest_first", max_length=max_length)
        types = enc.get("token_type_ids") or [[0] * len(ids) for ids in enc["input_ids"]]
        return list(enc["input_ids"]), list(types)

    def classifier(self, num_labels: int) -> nn.Module:
        from transformers import AutoModelForSequenceClassification
        from transformers.utils import logging as hf_logging

        from pld_ds.export import load_pooler

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the load report lists the new head on every run of a sweep
        try:
            model = AutoModelForSequenceClassification.from_pretrained(self.folder, num_labels=num_labels)
        finally:
            hf_logging.set_verbosity(verbosity)
        load_pooler(model, self.folder)  # a pld-export folder keeps the pretrained pooler beside the weights
        return _Logits(model, self.token_types)


# -- training -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HParams:
    lr: float
    batch_size: int
    epochs: int
    seed: int
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    eval_batch_size: int = 64
    log_every: int = 0  # print progress every this many steps within an epoch (0: about ten lines per epoch)


@dataclass
class RunResult:
    task: str
    hparams: HParams
    train_examples: int
    dev_examples: int
    metrics: dict[str, float]  # dev, after the last epoch
    history: list[dict[str, float]] = field(default_factory=list)  # per epoch: train loss and dev metrics
    seconds: float = 0.0
    ticket: dict[str, Any] | None = None  # with --earlybert: when the ticket was drawn and what it saves
    baseline: dict[str, float] = field(default_factory=dict)  # dev metrics of constant_prediction

    def headline(self) -> float:
        return self.metrics[get_task(self.task).metrics[0]]


def batches(data: Encoded, indices: Sequence[int], batch_size: int, pad_id: int,
            device: torch.device) -> list[dict[str, torch.Tensor]]:
    """Padded batches in the order of `indices`: each as long as its longest row (dynamic padding)."""
    out = []
    for start in range(0, len(indices), batch_size):
        rows = indices[start:start + batch_size]
        longest = max(len(data.input_ids[i]) for i in rows)
        ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
        types = torch.zeros((len(rows), longest), dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for r, i in enumerate(rows):
            n = len(data.input_ids[i])
            ids[r, :n] = torch.tensor(data.input_ids[i])
            types[r, :n] = torch.tensor(data.token_type_ids[i])
            mask[r, :n] = 1
        out.append({"input_ids": ids.to(device), "token_type_ids": types.to(device), "attention_mask": mask.to(device),
                    "labels": data.labels[list(rows)].to(device)})
    return out


def loss_fn(task: Task, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if task.is_regression:
        return F.mse_loss(logits.float().squeeze(-1), labels.float())
    return F.cross_entropy(logits.float(), labels)


def linear_warmup_decay(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR multiplier: 0 -> 1 over the warm-up steps, then linearly to 0 at the last step."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def optimizer_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: biases, LayerNorm and embedding-norm parameters are not decayed."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def predict(task: Task, model: nn.Module, data: Encoded, hp: HParams, pad_id: int, device: torch.device) -> list:
    model.eval()
    predictions: list = []
    for batch in batches(data, range(len(data)), hp.eval_batch_size, pad_id, device):
        batch.pop("labels")
        logits = model(**batch).float()
        predictions += (logits.squeeze(-1) if task.is_regression else logits.argmax(-1)).cpu().tolist()
    return predictions


def constant_prediction(task: Task, train_labels: torch.Tensor) -> float:
    """What a model that ignores its input predicts: the training set's majority class (the smallest id on a
    tie), or its mean score for a regression task (whose correlations are then 0)."""
    if task.labels is None:
        return float(train_labels.float().mean())
    return float(torch.bincount(train_labels.long(), minlength=task.num_labels).argmax())


def train_and_evaluate(task: Task, backbone: Backbone, train: Encoded, dev: Encoded, hp: HParams,
                       device: torch.device, log: Callable[[str], None] = print,
                       earlybert_cfg: Any = None) -> RunResult:
    """Fine-tune a fresh classifier. With an enabled EarlyBertConfig (pld_ds checkpoints only) the first
    steps search for a ticket (L1 term on the slimming coefficients), then the slim model trains on."""
    start = time.perf_counter()
    torch.manual_seed(hp.seed)  # the new head's initial weights and dropout follow the seed
    model = backbone.classifier(task.num_labels)
    search = None
    if earlybert_cfg is not None and earlybert_cfg.enabled:
        from pld_ds.earlybert import TicketSearch

        search = TicketSearch(model.model, earlybert_cfg, penalty_in_loss=False)  # adds the coefficients
    model = model.to(device)
    steps_per_epoch = math.ceil(len(train) / hp.batch_size)
    total = steps_per_epoch * hp.epochs

    def optimizer_and_schedule(done: int) -> tuple[torch.optim.Optimizer, Any]:
        optimizer = torch.optim.AdamW(optimizer_groups(model, hp.weight_decay), lr=hp.lr)
        schedule = linear_warmup_decay(total, int(hp.warmup_ratio * total))
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step + done))

    optimizer, scheduler = optimizer_and_schedule(0)
    order = torch.Generator().manual_seed(hp.seed)
    result = RunResult(task.name, hp, len(train), len(dev), {})
    result.baseline = task_metrics(task, [constant_prediction(task, train.labels)] * len(dev), dev.labels.tolist())
    step = 0
    log_every = hp.log_every or max(1, steps_per_epoch // 10)
    for epoch in range(1, hp.epochs + 1):
        model.train()
        loss_sum = 0.0
        window = [0.0, 0, time.perf_counter()]  # loss sum, examples, clock since the last progress line
        indices = torch.randperm(len(train), generator=order).tolist()
        for in_epoch, batch in enumerate(batches(train, indices, hp.batch_size, backbone.pad_id, device), start=1):
            labels = batch.pop("labels")
            loss = loss_fn(task, model(**batch), labels)
            loss_sum += loss.item() * len(labels)
            window[0] += loss.item() * len(labels)
            window[1] += len(labels)
            if search is not None:
                loss = loss + search.penalty(model.model)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), hp.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            if in_epoch % log_every == 0 and in_epoch < steps_per_epoch:
                rate = window[1] / max(time.perf_counter() - window[2], 1e-9)
                left = (len(train) * (hp.epochs - epoch + 1) - in_epoch * hp.batch_size) / rate
                log(f"  {task.name} seed {hp.seed}  epoch {epoch}/{hp.epochs}  step {in_epoch}/{steps_per_epoch}  "
                    f"train_loss {window[0] / window[1]:.4f}  lr {scheduler.get_last_lr()[0]:.3g}  "
                    f"{rate:.1f} examples/s  ~{left / 60:.1f} min left in training")
                window = [0.0, 0, time.perf_counter()]
            if search is not None and search.observe(step, model.model):
                model.model = search.draw(model.model, seq_len=max(len(ids) for ids in train.input_ids)).to(device)
                for line in search.report.lines():
                    log(f"  {line}")
                result.ticket = {"drawn_at": step, "emergence_step": search.emergence_step,
                                 "param_reduction": search.report.param_reduction,
                                 "flop_reduction": search.report.flop_reduction}
                search = None
                optimizer, scheduler = optimizer_and_schedule(step)  # the schedule goes on where it was
        metrics = task_metrics(task, predict(task, model, dev, hp, backbone.pad_id, device), dev.labels.tolist())
        result.history.append({"epoch": epoch, "train_loss": loss_sum / len(train), **metrics})
        log(f"  {task.name} lr {hp.lr:g} batch {hp.batch_size} seed {hp.seed}  epoch {epoch}/{hp.epochs}  "
            f"train_loss {loss_sum / len(train):.4f}  " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        result.metrics = metrics
    result.seconds = time.perf_counter() - start
    return result


# -- tasks, sweep and summary ---------------------------------------------------------------------


def task_folder(data: Path, task: Task) -> Path:
    """data/<Task>, matching the folder name without regard to case (CoLA, SST-2, STS-B, ...)."""
    if not data.is_dir():
        raise UserError(f"--data {data}: no such directory (expected GLUE's layout: one folder per task)")
    for child in sorted(data.iterdir()):
        if child.is_dir() and child.name.lower() in (task.name.lower(), task.name.lower().replace("-", "")):
            return child
    raise UserError(f"--data {data}: no {task.name} folder (expected {data / task.name}/train.tsv and dev.tsv)")


def sweep(args: argparse.Namespace, backbone: Backbone, device: torch.device,
          log: Callable[[str], None] = print) -> list[RunResult]:
    earlybert_cfg = None
    if args.earlybert:
        from pld_ds.earlybert import EarlyBertConfig

        earlybert_cfg = EarlyBertConfig.from_ds_config(args.earlybert)
    results = []
    for name in args.tasks:
        task = get_task(name)
        folder = task_folder(Path(args.data), task)
        train_examples = read_split(task, folder / "train.tsv", args.max_train_samples)
        dev_examples = read_split(task, folder / "dev.tsv", args.max_eval_samples)
        train = backbone.encode(task, train_examples, args.max_seq_length)
        dev = backbone.encode(task, dev_examples, args.max_seq_length)
        log(f"{task.name}: {len(train)} train, {len(dev)} dev examples from {folder}")
        for lr, batch_size, epochs, seed in itertools.product(args.lr, args.batch_size, args.epochs, args.seed):
            hp = HParams(lr=lr, batch_size=batch_size, epochs=epochs, seed=seed, weight_decay=args.weight_decay,
                         warmup_ratio=args.warmup_ratio, eval_batch_size=args.eval_batch_size,
                         log_every=args.log_every)
            results.append(train_and_evaluate(task, backbone, train, dev, hp, device, log, earlybert_cfg))
    return results


def best_runs(results: Sequence[RunResult]) -> dict[str, RunResult]:
    """The run with the highest headline metric per task, in the order tasks first appear."""
    best: dict[str, RunResult] = {}
    for r in results:
        if r.task not in best or r.headline() > best[r.task].headline():
            best[r.task] = r
    return best


def _fmt_metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def summary_markdown(results: Sequence[RunResult], init: str) -> str:
    best = best_runs(results)
    lines = [f"# GLUE dev results: {init}", "",
             "| task | metric | score | lr | batch | epochs | seed | all metrics |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for task, r in best.items():
        hp = r.hparams
        lines.append(f"| {task} | {get_task(task).metrics[0]} | {r.headline():.4f} | {hp.lr:g} | {hp.batch_size} | "
                     f"{hp.epochs} | {hp.seed} | {_fmt_metrics(r.metrics)} |")
    if len(best) > 1:
        mean = sum(r.headline() for r in best.values()) / len(best)
        lines.append(f"| average | | {mean:.4f} | | | | | |")
    lines += ["", "## Against the constant baseline", "",
              "Each setting's headline metric over its seeds (mean ± sd) next to the same metric of a constant "
              "prediction (the majority class of the training set; for STS-B its mean score, correlation 0). "
              "`above` says yes when the mean minus one sd is still above the baseline.", "",
              "| task | metric | lr | batch | epochs | seeds | score | constant baseline | above |",
              "|---|---|---:|---:|---:|---:|---|---:|---|"]
    groups: dict[tuple, list[RunResult]] = {}
    for r in results:
        groups.setdefault((r.task, r.hparams.lr, r.hparams.batch_size, r.hparams.epochs), []).append(r)
    for (task, lr, batch, epochs), runs in groups.items():
        metric = get_task(task).metrics[0]
        scores = [r.headline() for r in runs]
        mean = sum(scores) / len(scores)
        sd = math.sqrt(sum((x - mean) ** 2 for x in scores) / (len(scores) - 1)) if len(scores) > 1 else 0.0
        base = runs[0].baseline.get(metric, float("nan"))
        lines.append(f"| {task} | {metric} | {lr:g} | {batch} | {epochs} | {len(runs)} | {mean:.4f} ± {sd:.4f} | "
                     f"{base:.4f} | {'yes' if mean - sd > base else 'no'} |")
    lines += ["", "## All runs", "",
              "| task | lr | batch | epochs | seed | train | dev | metrics | seconds |",
              "|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in results:
        hp = r.hparams
        lines.append(f"| {r.task} | {hp.lr:g} | {hp.batch_size} | {hp.epochs} | {hp.seed} | {r.train_examples} | "
                     f"{r.dev_examples} | {_fmt_metrics(r.metrics)} | {r.seconds:.1f} |")
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, results: Sequence[RunResult], init: str, args: argparse.Namespace) -> str:
    """summary.md and results.json, each written whole or not at all (renamed into place)."""
    from pld_ds.checkpoint import write_text_atomic

    out.mkdir(parents=True, exist_ok=True)
    text = summary_markdown(results, init)
    write_text_atomic(out / "summary.md", text)
    record = {"init": init, "args": vars(args),
              "best": {task: {"metric": get_task(task).metrics[0], "score": r.headline(), "lr": r.hparams.lr,
                              "batch_size": r.hparams.batch_size, "epochs": r.hparams.epochs,
                              "seed": r.hparams.seed} for task, r in best_runs(results).items()},
              "runs": [{**asdict(r), "hparams": asdict(r.hparams)} for r in results]}
    write_text_atomic(out / "results.json", json.dumps(record, indent=2) + "\n")
    return text


def check_output(out: Path) -> None:
    """The results are written after the whole sweep: a folder that cannot take them must fail now, not then."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--output {out}: cannot create the folder ({err.strerror or err})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"--output {out}: not writable (expected a folder for summary.md and results.json)")


def parse_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UserError(f"--device {name}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device here (torch {torch.__version__} sees none); use --device cpu")
    return device


# -- command line ---------------------------------------------------------------------------------


def _list_of(kind: type, minimum: float) -> Callable[[str], list]:
    def parse(text: str) -> list:
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None
        if not values or any(not math.isfinite(v) or v < minimum for v in values):
            raise argparse.ArgumentTypeError(f"expected comma-separated values >= {minimum:g}, got {text!r}")
        return values

    return parse


def _positive_float_list(text: str) -> list[float]:
    values = _list_of(float, 0.0)(text)
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive values, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="pld-finetune", description=__doc__.split("\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--init", metavar="CHECKPOINT", help="pld_ds run folder, checkpoints folder or global_stepN")
    source.add_argument("--hf", metavar="DIR", help="Hugging Face model folder (e.g. written by pld-export)")
    p.add_argument("--data", required=True, metavar="DIR", help="GLUE data: one folder per task with train/dev.tsv")
    p.add_argument("--output", required=True, metavar="DIR", help="summary.md and results.json go here")
    p.add_argument("--tasks", type=lambda s: [t for t in s.split(",") if t.strip()],
                   default=[t.name for t in TASKS.values()], help="comma-separated: cola,sst-2,mrpc,sts-b,rte (all)")
    p.add_argument("--lr", type=_positive_float_list, default=[3e-5], help="learning rate(s), e.g. 2e-5,3e-5,5e-5")
    p.add_argument("--batch-size", type=_list_of(int, 1), default=[32], help="batch size(s)")
    p.add_argument("--epochs", type=_list_of(int, 1), default=[3], help="epoch count(s)")
    p.add_argument("--seed", type=_list_of(int, 0), default=[42], help="seed(s): head initialisation, order, dropout")
    p.add_argument("--max-seq-length", type=int, default=128, help="pairs are truncated longest-first to this")
    p.add_argument("--max-train-samples", type=int, help="use the first N training examples")
    p.add_argument("--max-eval-samples", type=int, help="use the first N dev examples")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup-ratio", type=float, default=0.1, help="fraction of the steps with linear warm-up")
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--log-every", type=int, default=0, metavar="STEPS",
                   help="progress line every STEPS training steps within an epoch (default: about ten per epoch)")
    p.add_argument("--vocab", metavar="FILE", help="with --init: vocab.txt (default: the run's data manifest)")
    p.add_argument("--lowercase", action=argparse.BooleanOptionalAction, default=None,
                   help="with --init: lower-case text (default: the manifest's setting, else guessed from the vocab)")
    p.add_argument("--model", help="with --init: preset or JSON of model fields, when the run has no run_config.json")
    p.add_argument("--earlybert", metavar="FILE",
                   help="with --init: a JSON with an \"earlybert\" block (e.g. the run's DeepSpeed config): search "
                        "for a ticket in the first steps, then fine-tune the slim model")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    args = p.parse_args(argv)
    if args.log_every < 0:
        p.error("--log-every must be >= 0")
    for name in ("max_seq_length", "max_train_samples", "max_eval_samples", "eval_batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_seq_length < 3:
        p.error("--max-seq-length must be >= 3 ([CLS] and [SEP] take two)")
    if not 0.0 <= args.warmup_ratio <= 1.0:
        p.error("--warmup-ratio must be in [0, 1]")
    if args.weight_decay < 0:
        p.error("--weight-decay must be >= 0")
    if args.hf and (args.vocab or args.lowercase is not None or args.model or args.earlybert):
        p.error("--vocab, --lowercase, --model and --earlybert go with --init (an --hf folder brings its own "
                "tokenizer and has no slimming coefficients)")
    return args


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> list[RunResult]:
    for name in args.tasks:  # every input is checked before the model is loaded
        task_folder(Path(args.data), get_task(name))
    device = parse_device(args.device)
    check_output(Path(args.output))
    if args.init:
        backbone: Backbone = CheckpointBackbone(args.init, args.vocab, args.lowercase, args.model)
    else:
        backbone = HFBackbone(args.hf)
    if args.max_seq_length > backbone.max_length:
        raise UserError(f"--max-seq-length {args.max_seq_length}: the model has {backbone.max_length} positions")
    log(f"pld-finetune: {backbone.name} on {', '.join(get_task(t).name for t in args.tasks)}, device {device}")
    results = sweep(args, backbone, device, log)
    log(write_outputs(Path(args.output), results, backbone.name, args))
    log(f"pld-finetune: wrote {Path(args.output) / 'summary.md'} and results.json")
    return results


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with one_line_errors("pld-finetune", args.debug):
        run(args)


if __name__ == "__main__":
    main()
