"""Markup residue of pld-prep on Wikipedia: a dump built from WikiExtractor text, the text itself, real dumps.

    python bench/wiki_residue.py --vocab vocab.txt --wiki-text WIKIEXTRACTOR_FILES... [--dump REAL.xml.bz2 ...]

1. Builds ``built.xml.bz2``: every article of the WikiExtractor files, its paragraphs wrapped in the
   markup of a real article (infobox and navigation templates, bold title, links with targets and
   trails, refs with citation templates, file links with options and captions, a gallery, a
   wikitable, bulleted and HTML lists, headings, entities, comments, behaviour switches, See also /
   Notes / References / Further reading / External links sections, categories, interlanguage links),
   plus redirect, disambiguation, talk, user, template and category pages.
2. Runs ``pld-prep`` (seq 128, dupe factor 1) on the built dump, on the prose it was built from
   (plain text, no markup), on the WikiExtractor text itself and on every ``--dump`` given, then
   decodes every sample of the shards and counts markup with ``data_prep.residue``. The token
   counts of the first two show how much of the prose the dump path kept.
"""

from __future__ import annotations

import argparse
import bz2
import html
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from data_prep import residue

_MARKUP_CHARS = ("{{", "}}", "[[", "]]", "<", ">", "{|", "|}", "&nbsp;", "&amp;", "__")
DOC = re.compile(r'<doc id="(\d+)" url="[^"]*" title="([^"]*)">\n(.*?)\n</doc>', re.S)


def wikiextractor_articles(paths: list[Path]) -> list[tuple[str, list[str]]]:
    articles = []
    for path in paths:
        for match in DOC.finditer(path.read_text(encoding="utf-8")):
            title = html.unescape(match.group(2))
            # WikiExtractor left some markup in its text ("{{#if:", "[[update]]"); such paragraphs are
            # left out, so that the residue measured on the built dump is the dump path's alone.
            lines = [line.strip() for line in match.group(3).split("\n")
                     if line.strip() and not any(m in line for m in _MARKUP_CHARS)]
            if lines and lines[0] == title:
                lines = lines[1:]
            if lines:
                articles.append((title, lines))
    return articles


def _cite(rng: np.random.Generator, i: int) -> str:
    kind = rng.choice(["web", "book", "journal", "news"])
    return (f"{{{{cite {kind} |url=http://www.example.org/{i}/page.html |title=Source {i} |last=Smith "
            f"|first=J. |date=May {2000 + i % 15} |accessdate=12 January 2015 |publisher=[[Example Press]]}}}}")


def _mark_sentence(sentence: str, rng: np.random.Generator, counter: list[int]) -> str:
    words = sentence.split(" ")
    for k, word in enumerate(words):
        core = word.strip(".,;:()\"'")
        if not core.isalpha() or len(core) < 4:
            continue
        roll = rng.random()
        if roll < 0.05:
            words[k] = word.replace(core, f"[[{core}]]")
        elif roll < 0.08:
            words[k] = word.replace(core, f"[[{core} (disambiguation)|{core}]]")
        elif roll < 0.09 and core.endswith("s"):
            words[k] = word.replace(core, f"[[{core[:-1]}]]s")
        elif roll < 0.10:
            words[k] = word.replace(core, f"''{core}''")
    text = " ".join(words)
    roll = rng.random()
    counter[0] += 1
    if roll < 0.2:
        text += f"<ref name=\"r{counter[0] % 7}\">{_cite(rng, counter[0])}</ref>"
    elif roll < 0.25:
        text += f"<ref name=\"r{counter[0] % 7}\" />"
    elif roll < 0.3:
        text += f"<ref>Smith, ''Book {counter[0]}'', p.&nbsp;{counter[0] % 300}.</ref>"
    elif roll < 0.33:
        text += "{{citation needed|date=March 2015}}"
    elif roll < 0.35:
        text += "<!-- editors: check this -->"
    return text


def wrap_article(title: str, paragraphs: list[str], rng: np.random.Generator) -> str:
    counter = [0]
    out = [
        "{{Use dmy dates|date=March 2015}}\n{{Infobox person\n| name = " + title
        + f"\n| image = {title}.jpg\n| image_size = 220px\n| birth_date = {{{{birth date|1885|1|1}}}}\n"
        + "| known_for = [[Science]]<br />[[Art]]\n| website = {{URL|example.org}}\n}}\n__NOTOC__\n"
    ]
    for p, paragraph in enumerate(paragraphs):
        sentences = re.split(r"(?<=[.!?]) (?=[A-Z])", paragraph)
        marked = " ".join(_mark_sentence(s, rng, counter) for s in sentences)
        if p == 0 and marked.startswith(title):
            marked = f"'''{title}'''" + marked[len(title):]
        if p and p % 3 == 0:
            out.append(f"== Section {p // 3} ==\n")
        if p % 4 == 1:
            out.append(f"[[File:{title} {p}.jpg|thumb|{200 + p}px|{rng.choice(['left', 'right', 'center'])}|"
                       f"A view of [[{title}]] in {1900 + p}]]\n")
        out.append(marked + "\n\n")
        if p == 2:
            out.append('{| class="wikitable sortable" style="text-align:center"\n|+ Results\n|-\n! Year !! Event\n'
                       f"|-\n| 1992 || [[1992 Wimbledon Championships|Wimbledon]]\n|-\n| bgcolor=lime | Won "
                       f"|| Final <ref>{_cite(rng, 99)}</ref>\n|}}\n\n")
        if p == 3:
            out.append("* First item on [[Malanje]]\n* Second item\n** Nested item\n# Numbered item\n"
                       "; Term : its definition\n<ul><li>malanje</li><li>moxico</li></ul>\n"
                       "<li> malanje <li> moxico\n\n")
        if p == 4:
            out.append("<gallery>\nFile:A.jpg|One\nFile:B.png|Two\n</gallery>\n<div style=\"clear:both\"></div>\n")
    out.append(
        "== See also ==\n* [[List of things]]\n* [[Other thing]]\n"
        "== Notes ==\n{{notelist}}\n== References ==\n{{reflist|30em}}\n"
        f"== Further reading ==\n* {_cite(rng, 1000)}\n"
        "== External links ==\n* [http://www.example.org Official website]\n* {{Commons category|Things}}\n"
        f"{{{{Navbox |name=Things |list1=[[A]] · [[B]]}}}}\n{{{{Authority control}}}}\n{{{{DEFAULTSORT:{title}}}}}\n"
        f"[[Category:1885 births]]\n[[Category:Things named {title}]]\n[[fr:{title}]]\n[[de:{title}]]\n"
    )
    return "".join(out)


def _page(title: str, ns: int, text: str, redirect: str | None = None) -> str:
    redirect_xml = f'<redirect title="{html.escape(redirect)}" />' if redirect else ""
    return (f"  <page>\n    <title>{html.escape(title)}</title>\n    <ns>{ns}</ns>\n    <id>1</id>\n{redirect_xml}"
            f'    <revision>\n      <text xml:space="preserve">{html.escape(text)}</text>\n'
            "    </revision>\n  </page>\n")


def build_dump(articles: list[tuple[str, list[str]]], path: Path, seed: int = 0) -> dict[str, int]:
    rng = np.random.default_rng(seed)
    counts = {"articles": 0, "redirects": 0, "disambiguation": 0, "other_namespaces": 0}
    with bz2.open(path, "wt", encoding="utf-8") as f:
        f.write('<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10" xml:lang="en">\n'
                '  <siteinfo>\n    <namespaces>\n      <namespace key="0" case="first-letter" />\n'
                '      <namespace key="1" case="first-letter">Talk</namespace>\n'
                '      <namespace key="2" case="first-letter">User</namespace>\n'
                '      <namespace key="6" case="first-letter">File</namespace>\n'
                '      <namespace key="10" case="first-letter">Template</namespace>\n'
                '      <namespace key="14" case="first-letter">Category</namespace>\n'
                '    </namespaces>\n  </siteinfo>\n')
        for i, (title, paragraphs) in enumerate(articles):
            f.write(_page(title, 0, wrap_article(title, paragraphs, rng)))
            counts["articles"] += 1
            if i % 3 == 0:
                f.write(_page(f"{title} redirect", 0, f"#REDIRECT [[{title}]] {{{{R from move}}}}", redirect=title))
                counts["redirects"] += 1
            if i % 10 == 0:
                f.write(_page(f"{title} (disambiguation)", 0,
                              f"'''{title}''' may refer to:\n* [[{title}]], an article\n* [[{title} (band)]]\n"
                              "{{disambiguation}}"))
                f.write(_page(f"Talk:{title}", 1, "== Merge? ==\nShould this be merged? ~~~~"))
                f.write(_page(f"User:Editor {i}", 2, "I edit articles about things."))
                f.write(_page(f"Template:Box {i}", 10, "{{Navbox|name=Box}}<noinclude>Doc.</noinclude>"))
                counts["disambiguation"] += 1
                counts["other_namespaces"] += 3
        f.write("</mediawiki>\n")
    return counts


def run_prep(inputs: list[Path], output: Path, vocab: Path, workers: int) -> tuple[dict, float]:
    cmd = [sys.executable, "-m", "data_prep", "--input", *map(str, inputs), "--output", str(output),
           "--vocab", str(vocab), "--dupe-factor", "1", "--workers", str(workers), "--seed", "1"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - start
    return json.loads((output / "manifest.json").read_text()), wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=Path, required=True, help="BERT vocab.txt")
    p.add_argument("--wiki-text", type=Path, nargs="+", required=True, help="WikiExtractor output files")
    p.add_argument("--dump", type=Path, nargs="*", default=[], help="real dumps (.xml / .xml.bz2) to measure too")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--examples", type=int, default=3)
    p.add_argument("--work", type=Path, help="folder for the dump and shards (default: a temporary one)")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="wiki_residue_"))
    work.mkdir(parents=True, exist_ok=True)
    articles = wikiextractor_articles(args.wiki_text)
    built = work / "built.xml.bz2"
    pages = build_dump(articles, built)
    print(f"built {built}: {pages} ({built.stat().st_size / 2**20:.1f} MiB compressed)")
    # The prose the dump was built from, without markup: what a perfect dump reader would give.
    source = work / "built_source.txt"
    source.write_text("".join("\n".join(paragraphs) + "\n\n" for _, paragraphs in articles), encoding="utf-8")
    runs = [("built dump (WikiExtractor text wrapped in markup)", [built]),
            ("the built dump's prose, no markup", [source]),
            ("WikiExtractor text itself", args.wiki_text)]
    runs += [(f"real dump {d.name}", [d]) for d in args.dump]
    results = {}
    for k, (name, inputs) in enumerate(runs):
        out = work / f"shards_{k}"
        manifest, wall = run_prep(inputs, out, args.vocab, args.workers)
        report = residue.measure(out, args.vocab, args.examples)
        results[name] = {"documents": manifest["total_documents"], "tokens": manifest["total_tokens"],
                         "prep_seconds": round(wall, 1), **report.as_dict()}
        print(f"\n{name}: {manifest['total_documents']:,} documents, {manifest['total_tokens']:,} tokens, "
              f"pld-prep {wall:.1f} s")
        print("\n".join(report.lines()))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
