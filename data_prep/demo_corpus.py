"""A small English corpus from the documentation that ships with every Python installation.

The quickstart trains on it so that it needs no download: the language reference topics behind
`help()` (pydoc_data) and the docstrings of the standard library's modules, read with `ast` (no
module is imported). Output is plain text: one paragraph per line, documents separated by a blank
line.

    python -m data_prep.demo_corpus OUT.txt [--max-bytes N]
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

_MIN_WORDS = 5


def _paragraphs(text: str) -> list[str]:
    """Prose paragraphs: wrapped lines joined; code, tables and headings underlines dropped."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line for line in block.splitlines() if line.strip()]
        heading = len(lines) > 1 and set(lines[1].strip()) <= set("*=-~^")
        if not lines or lines[0].startswith((" ", "\t", ">>>")) or heading:
            continue
        paragraph = " ".join(line.strip() for line in lines)
        if len(paragraph.split()) >= _MIN_WORDS:
            out.append(paragraph)
    return out


def _topic_documents() -> Iterator[list[str]]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        return
    for name in sorted(topics):
        yield _paragraphs(topics[name])


def _docstring_documents() -> Iterator[list[str]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        if any(part in {"test", "tests", "site-packages", "idle_test"} for part in path.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue
        kinds = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
        nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, kinds)]
        doc = [p for node in nodes for p in _paragraphs(ast.get_docstring(node) or "")]
        if doc:
            yield doc


def write_corpus(out: Path, max_bytes: int) -> tuple[int, int]:
    """(documents, bytes) written to `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    docs = written = 0
    tmp = out.with_suffix(out.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for doc in (*_topic_documents(), *_docstring_documents()):
            if len(doc) < 2 or written >= max_bytes:
                continue
            text = "\n".join(doc) + "\n\n"
            f.write(text)
            written += len(text.encode())
            docs += 1
    tmp.replace(out)
    return docs, written


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m data_prep.demo_corpus", description=__doc__.split("\n")[0])
    p.add_argument("output", type=Path)
    p.add_argument("--max-bytes", type=int, default=8_000_000)
    args = p.parse_args(argv)
    docs, size = write_corpus(args.output, args.max_bytes)
    if docs == 0:
        print(f"demo_corpus: error: found no documentation text in this Python ({sys.executable})", file=sys.stderr)
        sys.exit(2)
    print(f"demo_corpus: {docs} documents, {size / 1e6:.1f} MB -> {args.output}")


if __name__ == "__main__":
    main()
