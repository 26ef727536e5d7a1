"""Wikipedia XML dumps -> clean prose, the way a reader sees an article's running text.

The dump is read as a stream of ``<page>`` elements (memory stays flat on multi-gigabyte dumps) and
each article's wikitext is parsed with mwparserfromhell into a node tree. The tree is rendered node
by node, so what is kept or dropped depends on what a node *is*, not on how its text looks:

* kept: plain text, the visible text of wikilinks (``[[target|text]]`` -> ``text``), labelled
  external links, bold/italic and other inline formatting, ``<nowiki>`` text, HTML entities, a few
  templates that stand for running text (``{{lang|fr|mot}}``, ``{{convert|10|km}}``, ``{{nowrap|...}}``);
* dropped: every other template (infoboxes, citations, navboxes, parser functions and magic words
  such as ``{{DEFAULTSORT:...}}``), tables, ``<ref>`` and other extension tags (``<math>``,
  ``<gallery>``, ...), comments, file/image/media links with their options and caption, category
  links, interlanguage links, bare URLs, behaviour switches (``__NOTOC__``), headings, list items
  (wiki ``*``/``#``/``;``/``:`` lines and HTML ``<li>``), and whole sections that are not prose
  (References, External links, See also, Further reading, Notes, Bibliography, ...).

Pages are articles only: namespace 0, no redirect (``<redirect>`` or ``#REDIRECT``), no
disambiguation page. Namespace names come from the dump's own ``<siteinfo>``, so file and category
links are recognised in any language edition.

mwparserfromhell is an optional dependency (``pip install pld_ds[wiki]``), imported when a dump is read.
"""

from __future__ import annotations

import bz2
import html
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from data_prep.errors import PrepError

# Sections whose body is references, links or lists rather than prose (compared case-insensitively).
NON_PROSE_SECTIONS = frozenset(
    {
        "references", "reference", "notes", "footnotes", "citations", "sources", "bibliography",
        "further reading", "external links", "external link", "see also", "works cited", "notes and references",
        "references and notes", "general references", "general and cited references", "cited sources",
        "gallery", "image gallery", "related pages", "other websites", "selected bibliography",
        "selected works", "discography", "filmography", "publications", "awards and nominations",
    }
)  # fmt: skip

# Templates that mark a page as a disambiguation page (names compared case-insensitively, "_" as " ").
DISAMBIGUATION_TEMPLATES = frozenset(
    {"disambiguation", "disambig", "disamb", "dab", "dis", "hndis", "geodis", "numberdis", "given name",
     "surname", "set index article", "shipindex", "sia", "mountainindex", "roadindex"}
)  # fmt: skip

# Extension and HTML tags whose content is never running text.
DROPPED_TAGS = frozenset(
    {
        "ref", "references", "gallery", "math", "chem", "ce", "score", "timeline", "imagemap", "syntaxhighlight",
        "source", "pre", "graph", "templatedata", "mapframe", "maplink", "hiero", "inputbox", "categorytree",
        "includeonly", "table", "tr", "td", "th", "caption", "ul", "ol", "dl", "li", "dt", "dd", "code",
        "indicator", "templatestyles", "charinsert", "section", "style", "script", "noscript",
    }
)  # fmt: skip

# Wiki list markers (mwparserfromhell gives each its own tag node; the item's text follows it).
_LIST_MARKUP = frozenset({"*", "#", ";", ":"})
_FILE_NAMESPACES = (6, -2)  # File (alias Image), Media
# Namespace aliases (German "Bild:", French "Image:") are not in <siteinfo>: a prefixed link to a
# name with a media extension is a file link whatever its prefix.
_MEDIA_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".gif", ".svg", ".tif", ".tiff", ".webp", ".xcf", ".ogg", ".oga", ".ogv", ".webm",
    ".mp3", ".wav", ".flac", ".mid", ".pdf", ".djvu", ".stl",
)  # fmt: skip
_CATEGORY_NAMESPACE = 14
_ENGLISH_NAMESPACES = {
    -2: "Media", 1: "Talk", 2: "User", 3: "User talk", 4: "Wikipedia", 5: "Wikipedia talk", 6: "File",
    7: "File talk", 8: "MediaWiki", 9: "MediaWiki talk", 10: "Template", 11: "Template talk", 12: "Help",
    13: "Help talk", 14: "Category", 15: "Category talk", 100: "Portal", 101: "Portal talk", 118: "Draft",
    119: "Draft talk", 828: "Module", 829: "Module talk",
}  # fmt: skip
# Behaviour switches (__NOTOC__, __NOEDITSECTION__, ...) are plain text to the parser.
_BEHAVIOUR_SWITCHES = (
    "__NOTOC__", "__FORCETOC__", "__TOC__", "__NOEDITSECTION__", "__NEWSECTIONLINK__", "__NONEWSECTIONLINK__",
    "__NOGALLERY__", "__HIDDENCAT__", "__EXPECTUNUSEDCATEGORY__", "__NOCONTENTCONVERT__", "__NOCC__",
    "__NOTITLECONVERT__", "__NOTC__", "__INDEX__", "__NOINDEX__", "__STATICREDIRECT__", "__DISAMBIG__",
    "__NOGLOBAL__", "__EXPECTED_UNCONNECTED_PAGE__",
)  # fmt: skip
# Table and template syntax at the start of a line means the parser gave up on a construct (it
# has depth limits) and left it as text: such a line is markup, never prose.
_MARKUP_LINE_STARTS = ("{|", "|", "!", "{{", "}}", "[[", "]]")
# Wikitext characters per chunk of articles sent to a converting process.
_CHUNK_CHARS = 1_000_000


def _require_parser(path: Path) -> Any:
    try:
        import mwparserfromhell
    except ImportError as e:
        raise PrepError(
            f"{path}: reading a Wikipedia XML dump needs the optional package mwparserfromhell "
            "(pip install mwparserfromhell, or pip install pld_ds[wiki])"
        ) from e
    return mwparserfromhell


@dataclass
class Namespaces:
    """Namespace names of one wiki (from the dump's ``<siteinfo>``), lower-cased, for link prefixes."""

    names: dict[str, int] = field(default_factory=dict)

    @classmethod
    def english(cls) -> Namespaces:
        ns = cls()
        for key, name in _ENGLISH_NAMESPACES.items():
            ns.add(key, name)
        ns.add(6, "Image")  # the old name of File:, still valid in links
        return ns

    def add(self, key: int, name: str) -> None:
        self.names[name.strip().replace("_", " ").lower()] = key

    def of(self, title: str) -> int:
        """Namespace number of a page title or link target (0 when it has no known prefix)."""
        prefix, colon, _ = title.partition(":")
        if not colon:
            return 0
        return self.names.get(prefix.strip().replace("_", " ").lower(), 0)


def _is_language_prefix(prefix: str) -> bool:
    # Interlanguage links: [[fr:Paris]], [[zh-yue:...]], [[simple:...]]. Language codes are short,
    # lower-case ASCII letters with optional "-" parts.
    parts = prefix.split("-")
    return (2 <= len(parts[0]) <= 3 or prefix == "simple") and all(p.isascii() and p.isalpha() and p.islower()
                                                                    for p in parts)


class _Renderer:
    """Walks one article's node tree and collects its visible running text."""

    def __init__(self, mw: Any, namespaces: Namespaces) -> None:
        self.mw = mw
        self.nodes = mw.nodes
        self.namespaces = namespaces
        self.out: list[str] = []
        self.skip_line = False  # inside a list item: drop text up to the next newline
        self.skip_level = 0  # inside a non-prose section of this heading level (0: not skipping)

    def render_top(self, code: Any) -> str:
        for node in code.nodes:
            if isinstance(node, self.nodes.Heading):
                level = node.level
                if self.skip_level and level > self.skip_level:
                    continue
                title = self.plain(node.title).strip().strip(":").strip().lower()
                self.skip_level = level if title in NON_PROSE_SECTIONS else 0
                self.skip_line = False
                self.out.append("\n\n")
                continue
            if self.skip_level:
                continue
            self.node(node)
        return "".join(self.out)

    def plain(self, code: Any) -> str:
        """Visible text of a nested piece of wikicode (link text, tag contents, headings)."""
        saved, self.out, saved_skip = self.out, [], self.skip_line
        self.skip_line = False
        for node in code.nodes:
            self.node(node)
        text, self.out, self.skip_line = "".join(self.out), saved, saved_skip
        return text

    def emit(self, text: str) -> None:
        if self.skip_line:
            newline = text.find("\n")
            if newline < 0:
                return
            self.skip_line = False
            text = text[newline:]
        self.out.append(text)

    def node(self, node: Any) -> None:
        n = self.nodes
        if isinstance(node, n.Text):
            self.emit(_clean_text(node.value))
        elif isinstance(node, n.Wikilink):
            self.wikilink(node)
        elif isinstance(node, n.Tag):
            self.tag(node)
        elif isinstance(node, n.Template):
            text = self.template(node)
            if text:
                self.emit(text)
        elif isinstance(node, n.ExternalLink):
            if node.title is not None:  # [http://x label] shows the label; a bare URL shows nothing useful
                self.emit(self.plain(node.title))
        elif isinstance(node, n.HTMLEntity):
            self.emit(" " if node.value.lower() in ("nbsp", "#160", "#xa0") else html.unescape(str(node)))
        elif isinstance(node, n.Heading):  # a heading nested inside a tag or link: its text only
            self.emit(self.plain(node.title))
        # Comments, template arguments ({{{1}}}) and anything else: nothing visible.

    def wikilink(self, link: Any) -> None:
        target = str(link.title).strip()
        leading_colon = target.startswith(":")
        target = target.lstrip(":").strip()
        namespace = self.namespaces.of(target)
        prefix, colon, rest = target.partition(":")
        if not leading_colon and (namespace in (*_FILE_NAMESPACES, _CATEGORY_NAMESPACE)
                                  or (colon and rest.strip().lower().endswith(_MEDIA_EXTENSIONS))):
            return  # images with their options and caption; category tags
        if not leading_colon and colon and namespace == 0 and _is_language_prefix(prefix.strip()) and link.text is None:
            return  # interlanguage link: [[fr:Paris]]
        if link.text is not None:
            text = self.plain(link.text)
            if text.strip():
                self.emit(text)
                return
            # The pipe trick, [[Paris, Texas|]]: the title without namespace, comma part or brackets.
            target = rest if colon and namespace else target
            target = target.split(" (")[0].split(",")[0]
        shown = target.split("#")[0] if not target.startswith("#") else target[1:]
        self.emit(html.unescape(shown).replace("\xa0", " ") if "&" in shown else shown)  # [[OS&nbsp;X]]

    def tag(self, tag: Any) -> None:
        markup = tag.wiki_markup
        name = str(tag.tag).strip().lower()
        if markup in _LIST_MARKUP or (name in ("li", "dt", "dd") and (tag.self_closing or tag.contents is None
                                                                       or not str(tag.contents).strip())):
            # A list item's text follows its marker up to the end of the line.
            self.skip_line = True
            return
        if name in ("br",):
            self.emit(" ")
            return
        if name == "hr" or markup == "----":
            self.emit("\n\n")
            return
        if name in DROPPED_TAGS or markup == "{|":
            return
        if tag.contents is None:
            return
        if name == "nowiki":
            self.emit(html.unescape(str(tag.contents)))
            return
        text = self.plain(tag.contents)
        if name in ("blockquote", "p", "div", "poem", "center"):
            text = f"\n\n{text}\n\n"
        self.emit(text)

    def template(self, template: Any) -> str:
        name = _template_name(template)
        params = [p for p in template.params if not p.showkey]

        def positional(i: int) -> str:
            return self.plain(params[i].value).strip() if i < len(params) else ""

        if name in ("lang", "transl", "transliteration"):
            return positional(len(params) - 1) if len(params) >= 2 else ""
        if name.startswith("lang-") or name in ("nowrap", "nobr", "small", "smaller", "big", "larger", "abbr",
                                                 "sic", "not a typo", "linktext", "keypress", "em", "strong"):
            return positional(0)
        if name in ("convert", "cvt"):
            if len(params) >= 4 and positional(1) in ("-", "–", "to", "and", "or", "by", "x", "×", "+"):
                return f"{positional(0)} {positional(1)} {positional(2)} {positional(3)}"
            return f"{positional(0)} {positional(1)}".strip()
        if name in ("circa", "c."):
            return f"c. {positional(0)}".strip()
        if name == "nbsp" or name == "spaces":
            return " "
        if name in ("ndash", "spaced ndash"):
            return " – "
        if name in ("mdash", "spaced mdash"):
            return " — "
        return ""  # infoboxes, citations, navigation boxes, parser functions, magic words


def _template_name(template: Any) -> str:
    return str(template.name).strip().replace("_", " ").lower()


def _clean_text(text: str) -> str:
    if "__" in text:
        for switch in _BEHAVIOUR_SWITCHES:
            text = text.replace(switch, "")
    if "&" in text:  # entities inside a construct the parser gave up on, left as text
        text = html.unescape(text).replace("\xa0", " ")
    # Bold/italic quotes (style tags are not parsed, see article_text).
    return text.replace("'''", "").replace("''", "") if "''" in text else text


def _paragraphs(rendered: str) -> list[str]:
    """Lines -> paragraphs: consecutive lines form one paragraph (as MediaWiki renders them)."""
    paragraphs: list[str] = []
    current: list[str] = []
    for raw in rendered.split("\n"):
        line = " ".join(raw.split())
        if line.startswith(_MARKUP_LINE_STARTS):
            line = ""
        if line:
            current.append(line)
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return [_tidy(p) for p in paragraphs if any(c.isalnum() for c in p)]


def _tidy(paragraph: str) -> str:
    # Removed templates leave empty brackets and spaces before punctuation ("Paris ( ; French ...").
    for before, after in (("; )", ")"), (", )", ")"), ("( )", ""), ("()", ""), ("(; ", "("), ("(, ", "("),
                          (" ,", ","), (" .", "."), (" ;", ";"), (" :", ":"), ("  ", " ")):  # fmt: skip
        if before in paragraph:
            paragraph = paragraph.replace(before, after)
    return paragraph.strip()


def is_disambiguation(code: Any, title: str) -> bool:
    if title.rstrip().endswith("(disambiguation)"):
        return True
    for template in code.ifilter_templates(recursive=False):
        name = _template_name(template)
        if name in DISAMBIGUATION_TEMPLATES or "disambiguation" in name or name.endswith(" disambig"):
            return True
    return "__DISAMBIG__" in str(code)


def article_text(
    wikitext: str, title: str = "", namespaces: Namespaces | None = None, mw: Any = None
) -> str | None:
    """Clean prose of one article's wikitext, paragraphs separated by a blank line.

    None for a redirect or a disambiguation page.
    """
    if mw is None:
        import mwparserfromhell as mw
    if wikitext.lstrip()[:9].upper() == "#REDIRECT":
        return None
    # Unbalanced bold/italic quotes, common in articles, make the parser give up on whole tags (a
    # <ref> left as text); with style tags skipped the quotes stay text and are removed there.
    code = mw.parse(wikitext, skip_style_tags=True)
    if is_disambiguation(code, title):
        return None
    rendered = _Renderer(mw, namespaces or Namespaces.english()).render_top(code)
    return "\n\n".join(_paragraphs(rendered))


@dataclass
class DumpCounts:
    """What one dump held: articles kept and pages left out, by reason."""

    articles: int = 0
    redirects: int = 0
    disambiguation: int = 0
    other_namespaces: int = 0


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def open_dump(path: Path) -> BinaryIO:
    try:
        return bz2.open(path, "rb") if path.name.lower().endswith(".bz2") else open(path, "rb")
    except OSError as e:
        raise PrepError(f"{path}: cannot read ({e.strerror})") from e


def iter_pages(path: Path) -> Iterator[tuple[Namespaces, str, int | None, bool, str]]:
    """(namespaces, title, ns, is_redirect, wikitext) of every page of a dump, in order."""
    namespaces: Namespaces | None = None
    try:
        with open_dump(path) as f:
            root = None
            for event, elem in ET.iterparse(f, events=("start", "end")):
                if root is None:
                    root = elem
                    if _local(root.tag) != "mediawiki":
                        raise PrepError(f"{path}: not a Wikipedia XML dump (root element <{_local(root.tag)}>, "
                                        "expected <mediawiki>)")
                if event != "end":
                    continue
                local = _local(elem.tag)
                if local == "siteinfo":
                    namespaces = Namespaces()
                    for item in elem.iter():
                        if _local(item.tag) == "namespace" and item.text and item.get("key", "").lstrip("-").isdigit():
                            namespaces.add(int(item.get("key", "0")), item.text)
                    namespaces.add(6, "Image")
                    root.clear()
                    continue
                if local != "page":
                    continue
                children = {_local(c.tag): c for c in elem}
                title = (children["title"].text or "") if "title" in children else ""
                ns_elem = children.get("ns")
                ns = int(ns_elem.text) if ns_elem is not None and (ns_elem.text or "").strip().lstrip("-").isdigit() \
                    else None
                text = ""
                revision = children.get("revision")
                if revision is not None:
                    text_elem = next((c for c in revision if _local(c.tag) == "text"), None)
                    text = (text_elem.text or "") if text_elem is not None else ""
                yield namespaces or Namespaces.english(), title, ns, "redirect" in children, text
                # Dropping finished pages keeps memory flat on multi-gigabyte dumps.
                root.clear()
    except ET.ParseError as e:
        raise PrepError(f"{path}: not a readable Wikipedia XML dump ({e})") from e
    except (OSError, EOFError) as e:
        raise PrepError(f"{path}: cannot read the dump ({e})") from e


def _convert_chunk(pages: list[tuple[str, str, Namespaces]]) -> list[str | None]:
    return [article_text(wikitext, title, namespaces) for title, wikitext, namespaces in pages]


def read_dump(path: Path, counts: DumpCounts | None = None, processes: int = 1) -> Iterator[str]:
    """The clean prose of every article of a dump (``.xml`` or ``.xml.bz2``), in order.

    Parsing wikitext costs far more than tokenizing the prose that comes out of it, so with
    ``processes > 1`` articles are converted by that many spawned processes, a few chunks ahead
    of the caller (memory stays bounded however large the dump).
    """
    mw = _require_parser(path)
    counts = counts if counts is not None else DumpCounts()

    def articles() -> Iterator[tuple[str, str, Namespaces]]:
        for namespaces, title, ns, redirect, wikitext in iter_pages(path):
            namespace = ns if ns is not None else namespaces.of(title)
            if namespace != 0:
                counts.other_namespaces += 1
            elif redirect or wikitext.lstrip()[:9].upper() == "#REDIRECT":
                counts.redirects += 1
            else:
                yield title, wikitext, namespaces

    def kept(texts: list[str | None]) -> Iterator[str]:
        for text in texts:
            if text is None:
                counts.disambiguation += 1
            else:
                counts.articles += 1
                yield text

    if processes <= 1:
        for title, wikitext, namespaces in articles():
            yield from kept([article_text(wikitext, title, namespaces, mw)])
        return
    import multiprocessing
    from concurrent.futures import Future, ProcessPoolExecutor

    pending: deque[Future] = deque()
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            chunk: list[tuple[str, str, Namespaces]] = []
            size = 0
            for page in articles():
                chunk.append(page)
                size += len(page[1])
                if size >= _CHUNK_CHARS:
                    pending.append(pool.submit(_convert_chunk, chunk))
                    chunk, size = [], 0
                    while len(pending) > 2 * processes:
                        yield from kept(pending.popleft().result())
            if chunk:
                pending.append(pool.submit(_convert_chunk, chunk))
            while pending:
                yield from kept(pending.popleft().result())
        finally:
            for future in pending:
                future.cancel()
