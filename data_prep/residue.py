"""Markup residue in finished shards: how many samples still hold wiki or HTML markup.

    python -m data_prep.residue SHARDS_DIR [--vocab vocab.txt] [--examples 5] [--json OUT.json]

Every sample of every shard under the folder is decoded back to text with the vocabulary (masked
positions restored from ``masked_lm_ids``, WordPiece ``##`` pieces joined), as BERT's tokenizer
sees it: lower-cased, punctuation split off by spaces (``{{cite`` reads ``{ { cite``). A sample
counts as residue when any pattern below matches; the report gives the share of samples per
pattern and a few decoded examples.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# Decoded text is lower case with punctuation as separate tokens.
RESIDUE_PATTERNS: dict[str, re.Pattern[str]] = {
    "template braces": re.compile(r"\{ \{|\} \}"),
    "table syntax": re.compile(r"\{ \||\| \}|\| \||! !|\| -"),
    "link brackets": re.compile(r"\[ \[|\] \]"),
    "html or ref tag": re.compile(
        r"< /? ?(?:ref|references|li|ul|ol|br|div|span|small|big|sup|sub|center|font|table|tr|td|th|blockquote|"
        r"gallery|math|nowiki|poem|code|pre|abbr|timeline|imagemap|includeonly|noinclude|onlyinclude|p|s|u|b|i)"
        r" ?(?:>|/ >|[a-z]+ =)|< ! - -"
    ),
    "image options": re.compile(r"\b(?:thumb|thumbnail|frameless|upright)\s*\||\|\s*(?:thumb|thumbnail)\b|\b\d+ ?px\b"),
    "file link": re.compile(r"\b(?:file|image|media) : [^|\]]{0,80}?\. (?:jpe?g|png|svg|gif|tiff?|ogg|ogv|webm|pdf)\b"),
    "category link": re.compile(r"\bcategory : \w"),
    "template parameter": re.compile(r"\| \w+ (?:\w+ )?=|\b(?:class|style|bgcolor|colspan|rowspan|align|valign|"
                                     r"cellpadding|cellspacing|border|scope) = [\"'\w#]"),
    "magic word": re.compile(r"_ _ [a-z]+ _ _|# redirect\b|\bdefaultsort :"),
    "html entity": re.compile(r"& (?:nbsp|amp|lt|gt|quot|ndash|mdash|minus|times|# \d+) ;"),
}


def residue_kinds(text: str) -> list[str]:
    """Names of the residue patterns found in one decoded sample."""
    return [name for name, pattern in RESIDUE_PATTERNS.items() if pattern.search(text)]


def load_tokens(vocab: Path) -> list[str]:
    return vocab.read_text(encoding="utf-8").splitlines()


def decode(ids: np.ndarray, tokens: Sequence[str]) -> str:
    """WordPiece ids -> text: [CLS]/[SEP]/[PAD] dropped, "##" pieces glued to the word before."""
    words: list[str] = []
    glue = False  # a "##" piece continues the word before it, never across [SEP]
    for i in ids:
        token = tokens[i] if 0 <= i < len(tokens) else "[UNK]"
        if token in ("[CLS]", "[PAD]", "[SEP]"):
            glue = False
            continue
        if token == "[UNK]":
            token = "\u2047"  # "⁇": "[UNK]" would read as a bracket
        if token.startswith("##") and glue:
            words[-1] += token[2:]
        else:
            words.append(token)
            glue = True
    return " ".join(words)


def iter_samples(folder: Path, tokens: Sequence[str]) -> Iterator[str]:
    """Decoded text of every sample in every ``*.hdf5`` under ``folder`` (sorted), masks undone."""
    import h5py

    for path in sorted(folder.rglob("*.hdf5")):
        with h5py.File(path, "r") as f:
            ids = f["input_ids"][:]
            if "masked_lm_positions" in f:
                positions, originals = f["masked_lm_positions"][:], f["masked_lm_ids"][:]
                rows, cols = np.nonzero(positions > 0)
                ids[rows, positions[rows, cols]] = originals[rows, cols]
            lengths = f["input_mask"][:].sum(axis=1) if "input_mask" in f else np.full(len(ids), ids.shape[1])
        for row, length in zip(ids, lengths, strict=True):
            yield decode(row[:length], tokens)


@dataclass
class ResidueReport:
    samples: int = 0
    with_residue: int = 0
    per_pattern: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RESIDUE_PATTERNS, 0))
    examples: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.with_residue / self.samples if self.samples else 0.0

    def as_dict(self) -> dict[str, object]:
        return {
            "samples": self.samples,
            "with_residue": self.with_residue,
            "rate": self.rate,
            "per_pattern": self.per_pattern,
            "examples": self.examples,
        }

    def lines(self) -> list[str]:
        out = [f"{self.with_residue:,} of {self.samples:,} samples hold markup residue ({self.rate:.2%})"]
        out += [f"  {name:<20} {count:>7,} ({count / max(self.samples, 1):.2%})"
                for name, count in self.per_pattern.items() if count]
        out += [f"  e.g. {e}" for e in self.examples]
        return out


def measure(folder: Path, vocab: Path, examples: int = 5, context: int = 60) -> ResidueReport:
    """Scan every shard under ``folder``; ``examples`` decoded snippets around the first matches."""
    report = ResidueReport()
    tokens = load_tokens(vocab)
    for text in iter_samples(folder, tokens):
        report.samples += 1
        found = residue_kinds(text)
        if not found:
            continue
        report.with_residue += 1
        for name in found:
            report.per_pattern[name] += 1
        if len(report.examples) < examples:
            match = RESIDUE_PATTERNS[found[0]].search(text)
            assert match is not None
            start = max(0, match.start() - context)
            report.examples.append(f"[{found[0]}] ...{text[start : match.end() + context]}...")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.residue", description=__doc__.split("\n")[0])
    p.add_argument("shards", type=Path, help="a pld-prep output folder (or any folder of NVIDIA-format shards)")
    p.add_argument("--vocab", type=Path, help="vocab.txt (default: SHARDS/vocab.txt)")
    p.add_argument("--examples", type=int, default=5, help="decoded examples to print (default 5)")
    p.add_argument("--json", type=Path, help="also write the report here")
    args = p.parse_args(argv)
    vocab = args.vocab or args.shards / "vocab.txt"
    if not vocab.is_file():
        print(f"residue: error: --vocab {vocab}: no such file (expected the shards' vocab.txt)", file=sys.stderr)
        return 2
    if not any(args.shards.rglob("*.hdf5")):
        print(f"residue: error: {args.shards}: no *.hdf5 shards found", file=sys.stderr)
        return 2
    report = measure(args.shards, vocab, args.examples)
    print("\n".join(report.lines()))
    if args.json:
        args.json.write_text(json.dumps(report.as_dict(), indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
