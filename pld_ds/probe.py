"""What a pretraining run has learned: its eval MLM loss beside the unigram baseline, and fill-mask answers.

    python -m pld_ds.probe RUN_DIR --data SHARDS [--sentence "The capital of France is [MASK]." ...] [--plot FILE.png]

The unigram baseline is the loss of predicting every masked token by its frequency alone: the
cross-entropy, on the validation shards' masked tokens, of the training shards' masked-token
frequencies (add-one smoothed). A model on the "word frequency" plateau sits at that line; learning
language means going below it. Fill-mask runs the run's newest checkpoint (every layer, no PLD) on
each sentence and prints the five likeliest tokens for each [MASK]; with --plot the run's loss curve
is drawn with the baseline beside it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from pld_ds.data.shards import find_shards
from pld_ds.errors import ArgumentParser, UserError, one_line_errors

SENTENCES = ("The capital of France is [MASK].", "She opened the [MASK] and walked into the room.",
             "He was born in [MASK] and died in 1950.")


def _masked_ids(paths: list[Path]) -> np.ndarray:
    import h5py

    ids = []
    for path in paths:
        try:
            with h5py.File(path, "r") as f:
                positions, labels = f["masked_lm_positions"][:], f["masked_lm_ids"][:]
        except (OSError, KeyError) as err:
            raise UserError(f"{path}: cannot read masked_lm_positions / masked_lm_ids ({err}); expected a "
                            "pld-prep shard with static masking") from None
        ids.append(labels[positions > 0])
    return np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)


def unigram_baseline(data: str | Path) -> float:
    """Validation cross-entropy (nats) of the training shards' masked-token frequencies, add-one smoothed over
    the ids seen. `data` is a pld-prep folder with train/ and validation/ shards."""
    root = Path(data)
    train = _masked_ids(find_shards(root / "train", "--data"))
    valid = _masked_ids(find_shards(root / "validation", "--data"))
    if not len(train) or not len(valid):
        raise UserError(f"{root}: no masked tokens in train/ or validation/ (dynamic-masking shards have none: "
                        "the baseline needs shards masked by pld-prep)")
    size = int(max(train.max(), valid.max())) + 1
    counts = np.bincount(train, minlength=size).astype(np.float64) + 1.0
    return float(-np.log(counts[valid] / counts.sum()).mean())


def fill_mask(run_dir: str | Path, sentences: list[str], top: int = 5) -> list[tuple[str, list[list[str]]]]:
    """For each sentence, the `top` likeliest tokens at each [MASK], from the run's newest checkpoint."""
    from tokenizers import BertWordPieceTokenizer

    from pld_ds.export import find_vocab, load_checkpoint
    from pld_ds.model import BertForPreTraining

    ckpt = load_checkpoint(run_dir)
    vocab = find_vocab(ckpt)
    model = BertForPreTraining(ckpt.config)
    model.load_state_dict(ckpt.state_dict, strict=False)
    model.eval()
    tokenizer = BertWordPieceTokenizer(str(vocab.path), lowercase=vocab.lowercase)
    mask_id = vocab.id("[MASK]")
    answers = []
    for sentence in sentences:
        encoded = tokenizer.encode(sentence)
        ids = torch.tensor([encoded.ids[: ckpt.config.max_position_embeddings]])
        if mask_id not in ids[0].tolist():
            raise UserError(f"--sentence {sentence!r}: no [MASK] in it")
        with torch.no_grad():
            logits = model(ids, torch.zeros_like(ids), torch.ones_like(ids)).mlm_logits[0]
        logits[:, len(vocab.tokens):] = -float("inf")  # padding rows of the embedding are no tokens
        per_mask = [[vocab.tokens[i] for i in logits[pos].topk(top).indices.tolist()]
                    for pos in (ids[0] == mask_id).nonzero().flatten().tolist()]
        answers.append((sentence, per_mask))
    return answers


def run_title(run_dir: str | Path, data: str | Path) -> str:
    """A plot title that names the run: its folder, its model and step count (from run_config.json) and data."""
    run = Path(run_dir).resolve()
    config = run / "run_config.json"
    args = {}
    if config.is_file():
        from pld_ds.config import read_json

        args = read_json(config, "run config").get("args") or {}
    model = Path(str(args.get("model", "?"))).name
    parent = run.parent.name
    return f"{parent}/{run.name}: {model}, {args.get('max_steps', '?')} steps on {Path(data).resolve().parent.name}/" \
        f"{Path(data).resolve().name}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="pld-probe", description=__doc__.split("\n")[0])
    p.add_argument("run_dir", metavar="RUN_DIR", help="a pld-pretrain --output folder")
    p.add_argument("--data", required=True, metavar="DIR", help="the pld-prep folder the run trained on")
    p.add_argument("--sentence", action="append", help="a sentence with [MASK] (repeat; default: three examples)")
    p.add_argument("--plot", metavar="FILE.png", help="also draw the run's losses with the baseline")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with one_line_errors("pld-probe", args.debug):
        from pld_ds.plot import EVAL_LOSS_TAG, plot_run, read_scalars

        baseline = unigram_baseline(args.data)
        scalars = read_scalars(args.run_dir)
        print(f"unigram baseline (masked tokens predicted by frequency alone): {baseline:.4f} nats")
        if scalars.get(EVAL_LOSS_TAG):
            step, loss = scalars[EVAL_LOSS_TAG][-1]
            print(f"eval mlm_loss at step {step}: {loss:.4f} nats, {baseline - loss:+.4f} below the baseline")
        if scalars.get("eval/mlm_accuracy"):
            print(f"eval masked-token accuracy: {scalars['eval/mlm_accuracy'][-1][1]:.4f}")
        for sentence, per_mask in fill_mask(args.run_dir, args.sentence or list(SENTENCES)):
            print(f"fill-mask: {sentence}  ->  " + " | ".join(" ".join(tokens) for tokens in per_mask))
        if args.plot:
            title = run_title(args.run_dir, args.data)
            print(plot_run(scalars, args.plot, title=title, baseline=baseline))


if __name__ == "__main__":
    main()
