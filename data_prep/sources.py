"""Corpus readers: turn input files into documents.

A document is one string whose paragraphs are separated by a blank line ("\\n\\n"); the sentence
splitter treats a blank line as a hard boundary, so lines that are already sentences stay apart.

Formats (auto-detected per file unless ``--input-format`` says otherwise):

* ``wikiextractor``: ``<doc ...>`` ... ``</doc>`` blocks, one paragraph per line; the title line that
  WikiExtractor repeats at the top of each document is dropped.
* ``books``: one Project Gutenberg book per file; the licence header and footer are cut at the
  ``*** START OF`` / ``*** END OF`` markers (or the older "SMALL PRINT" / "End of Project Gutenberg"
  ones), hard-wrapped lines are joined and paragraphs split on blank lines.
* ``plain``: blank lines separate documents, every other line is a sentence or paragraph (the format
  of google-research/bert's ``sample_text.txt``).
* ``jsonl``: one JSON object per line, the document in the ``--text-key`` field.
* ``wikixml``: a raw Wikipedia ``pages-articles`` dump (``.xml`` or ``.xml.bz2``): the running text
  of article pages, rendered from mwparserfromhell's parse tree (``data_prep/wiki.py``; the
  optional ``pld_ds[wiki]`` extra).
* ``parquet``: the ``--text-key`` column, read with the optional ``pyarrow`` package.
"""

from __future__ import annotations

import codecs
import html
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from data_prep.errors import PrepError

FORMATS = ("wikiextractor", "books", "plain", "jsonl", "wikixml", "parquet")

# Documents shorter than this (in characters, after stripping) are skipped: WikiExtractor emits many
# title-only stubs and one-line disambiguation pages that cannot form a sentence pair.
MIN_DOC_CHARS = 20

_SNIFF_BYTES = 64 * 1024
_DOC_OPEN = re.compile(r"^<doc\b", re.M)
_TITLE_ATTR = re.compile(r'\btitle="([^"]*)"')
_GUTENBERG_START = re.compile(
    r"^(?:\*{3}\s*START OF (?:THIS|THE) PROJECT GUTENBERG[^\n]*|\*END\*?\s*THE SMALL PRINT[^\n]*)$",
    re.M | re.I,
)
_GUTENBERG_END = re.compile(
    r"^(?:\*{3}\s*END OF (?:THIS|THE) PROJECT GUTENBERG|(?:The )?End of (?:the |this )?Project Gutenberg)",
    re.M | re.I,
)
_CREDIT = re.compile(
    r"(?:this e-?(?:text|book) was )?(?:produced|prepared|transcribed|e-?text prepared)\b.{0,40}\bby\b", re.I
)
_BLANK_LINES = re.compile(r"\n[ \t\f\v]*\n\s*")
_UNSUPPORTED_SUFFIXES = (".gz", ".zip", ".xz", ".zst", ".7z", ".tar")


def _count_replaced(exc: UnicodeError) -> tuple[str, int]:
    # Counting happens in the handler so that a file is decoded once, in linear time.
    assert isinstance(exc, UnicodeDecodeError)
    _replaced[0] += exc.end - exc.start
    return "\ufffd", exc.end


_replaced = [0]
codecs.register_error("pld-prep-count", _count_replaced)


def decode(data: bytes) -> tuple[str, int]:
    """UTF-8 text of ``data`` and the number of bytes that were not UTF-8 (each run -> U+FFFD)."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        before = _replaced[0]
        text = data.decode("utf-8", "pld-prep-count")
        return text, _replaced[0] - before


@dataclass
class SourceStats:
    """Counts for one ``--input`` argument, reported in the manifest."""

    path: str
    files: int = 0
    documents: int = 0
    bytes: int = 0
    replaced_bytes: int = 0
    skipped_documents: int = 0
    formats: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {
            "path": self.path,
            "formats": self.formats,
            "files": self.files,
            "documents": self.documents,
            "bytes": self.bytes,
            "replaced_bytes": self.replaced_bytes,
            "skipped_documents": self.skipped_documents,
        }


@dataclass(frozen=True)
class Source:
    """One ``--input`` argument and the (file, format) pairs found under it, in reading order."""

    arg: str
    files: tuple[tuple[Path, str], ...]


def resolve_inputs(paths: Sequence[str], input_format: str = "auto", exclude: Path | None = None) -> list[Source]:
    """Expand the ``--input`` arguments into files, walking directories recursively in sorted order.

    Hidden files and folders are skipped, and so is ``exclude`` (the output folder, which may sit
    inside an input folder).
    """
    excluded = exclude.resolve() if exclude is not None else None
    sources = []
    for arg in paths:
        path = Path(arg)
        if not path.exists():
            raise PrepError(f"--input {arg}: no such file or directory")
        if path.is_dir():
            files = [f for f in _walk(path) if excluded is None or not _is_within(f, excluded)]
            if not files:
                raise PrepError(f"--input {arg}: directory holds no input files")
        else:
            files = [path]
        resolved = []
        for f in files:
            if not os.access(f, os.R_OK):
                raise PrepError(f"{f}: not readable (permission denied)")
            fmt = detect_format(f) if input_format == "auto" else input_format
            resolved.append((f, fmt))
        sources.append(Source(arg, tuple(resolved)))
    return sources


def _walk(root: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath, f) for f in sorted(filenames) if not f.startswith("."))
    return found


def _is_within(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder)


def detect_format(path: Path) -> str:
    """Guess the format of one file from its name and first 64 KiB."""
    name = path.name.lower()
    if name.endswith((".xml", ".xml.bz2")):
        return "wikixml"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(_UNSUPPORTED_SUFFIXES) or name.endswith(".bz2"):
        raise PrepError(
            f"{path}: compressed input is not supported "
            "(expected plain text, WikiExtractor, Gutenberg, JSONL, .xml/.xml.bz2 or .parquet)"
        )
    try:
        with open(path, "rb") as f:
            head, _ = decode(f.read(_SNIFF_BYTES))
    except OSError as e:
        raise PrepError(f"{path}: cannot read ({e.strerror})") from e
    head = head.lstrip("\ufeff")
    if name.endswith((".jsonl", ".json")) or _looks_like_jsonl(head):
        return "jsonl"
    if _DOC_OPEN.search(head):
        return "wikiextractor"
    if _GUTENBERG_START.search(head) or "project gutenberg" in head[:4096].lower():
        return "books"
    return "plain"


def _looks_like_jsonl(head: str) -> bool:
    first = next((line.strip() for line in head.splitlines() if line.strip()), "")
    if not (first.startswith("{") and first.endswith("}")):
        return False
    try:
        return isinstance(json.loads(first), dict)
    except ValueError:
        return False


class CorpusReader:
    """Iterates the documents of all sources in order, counting per source as it goes."""

    def __init__(self, sources: Sequence[Source], text_key: str = "text", workers: int = 1) -> None:
        self.sources = list(sources)
        self.text_key = text_key
        self.workers = workers  # processes that parse Wikipedia dumps
        self.stats = [SourceStats(s.arg) for s in self.sources]

    def __iter__(self) -> Iterator[str]:
        for source, stats in zip(self.sources, self.stats, strict=True):
            for path, fmt in source.files:
                stats.files += 1
                if fmt not in stats.formats:
                    stats.formats.append(fmt)
                documents = (
                    _read_wikixml(path, stats, self.text_key, self.workers)
                    if fmt == "wikixml"
                    else _READERS[fmt](path, stats, self.text_key)
                )
                for doc in documents:
                    if len(doc) < MIN_DOC_CHARS:
                        stats.skipped_documents += 1
                        continue
                    stats.documents += 1
                    yield doc


def _open_binary(path: Path) -> BinaryIO:
    try:
        return open(path, "rb")
    except OSError as e:
        raise PrepError(f"{path}: cannot read ({e.strerror})") from e


def _lines(path: Path, stats: SourceStats) -> Iterator[str]:
    first = True
    with _open_binary(path) as f:
        for raw in f:
            stats.bytes += len(raw)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                line, bad = decode(raw)
                stats.replaced_bytes += bad
            if first:
                line = line.lstrip("\ufeff")
                first = False
            yield line


def _join_paragraphs(paragraphs: Iterable[str]) -> str:
    return "\n\n".join(p for p in (x.strip() for x in paragraphs) if p)


def _read_wikiextractor(path: Path, stats: SourceStats, _text_key: str) -> Iterator[str]:
    paragraphs: list[str] | None = None
    title: str | None = None
    for line in _lines(path, stats):
        if paragraphs is None:
            if line.startswith("<doc"):
                match = _TITLE_ATTR.search(line)
                title = html.unescape(match.group(1)).strip() if match else None
                paragraphs = []
            continue
        if line.startswith("</doc>"):
            yield _join_paragraphs(paragraphs)
            paragraphs = None
            continue
        text = line.strip()
        if not text:
            continue
        if title is not None:
            # Only the first non-blank line can be the repeated title.
            if text == title:
                title = None
                continue
            title = None
        paragraphs.append(text)
    if paragraphs:
        yield _join_paragraphs(paragraphs)


def _read_books(path: Path, stats: SourceStats, _text_key: str) -> Iterator[str]:
    with _open_binary(path) as f:
        data = f.read()
    stats.bytes += len(data)
    text, bad = decode(data)
    stats.replaced_bytes += bad
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    start = _GUTENBERG_START.search(text)
    begin = start.end() if start else 0
    end = _GUTENBERG_END.search(text, begin)
    body = text[begin : end.start() if end else len(text)]
    paragraphs = [" ".join(line.strip() for line in p.split("\n")) for p in _BLANK_LINES.split(body)]
    # The transcribers' credit ("Produced by ...") sits right after the start marker.
    while paragraphs and (not paragraphs[0] or _CREDIT.match(paragraphs[0])):
        paragraphs.pop(0)
    yield _join_paragraphs(paragraphs)


def _read_plain(path: Path, stats: SourceStats, _text_key: str) -> Iterator[str]:
    lines: list[str] = []
    for line in _lines(path, stats):
        text = line.strip()
        if text:
            lines.append(text)
        elif lines:
            yield "\n\n".join(lines)
            lines = []
    if lines:
        yield "\n\n".join(lines)


def _read_jsonl(path: Path, stats: SourceStats, text_key: str) -> Iterator[str]:
    for line in _lines(path, stats):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        text = record.get(text_key) if isinstance(record, dict) else None
        # A malformed line or one without the text field counts as a skipped document.
        yield _join_paragraphs(text.splitlines()) if isinstance(text, str) else ""


def _read_wikixml(path: Path, stats: SourceStats, _text_key: str, workers: int = 1) -> Iterator[str]:
    from data_prep import wiki  # needs the optional mwparserfromhell, checked when a dump is read

    stats.bytes += path.stat().st_size
    yield from wiki.read_dump(path, processes=workers)


def _read_parquet(path: Path, stats: SourceStats, text_key: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise PrepError(f"{path}: reading parquet needs the optional package pyarrow (pip install pyarrow)") from e
    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own error types for corrupt files
        raise PrepError(f"{path}: not a readable parquet file ({e})") from e
    if text_key not in parquet.schema_arrow.names:
        raise PrepError(f"{path}: no column {text_key!r} (expected the document text there; see --text-key)")
    stats.bytes += path.stat().st_size
    for batch in parquet.iter_batches(columns=[text_key], batch_size=1024):
        for text in batch.column(0).to_pylist():
            yield _join_paragraphs(text.splitlines()) if isinstance(text, str) else ""


_READERS = {
    "wikiextractor": _read_wikiextractor,
    "books": _read_books,
    "plain": _read_plain,
    "jsonl": _read_jsonl,
    "wikixml": _read_wikixml,
    "parquet": _read_parquet,
}
