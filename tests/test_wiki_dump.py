"""Raw Wikipedia XML dumps -> clean prose (data_prep/wiki.py), the markup residue measurement
(data_prep/residue.py) and the real parquet reader. Every dump fragment is written by the test."""

from __future__ import annotations

import bz2
import html
from pathlib import Path

import h5py
import numpy as np
import pytest

from data_prep import pipeline, residue, sources, wiki
from data_prep.errors import PrepError

# The dump and parquet readers are tested for real: mwparserfromhell and pyarrow are the
# pld_ds[wiki] and pld_ds[parquet] extras that scripts/setup.sh installs (a missing one fails here).

PROSE = "Kalo is a mine sane in the north."
PROSE_2 = "It lies near the river and has ten towns."


def clean(wikitext: str, title: str = "Kalo") -> str | None:
    return wiki.article_text(wikitext, title)


def assert_prose_only(text: str | None, *kept: str) -> None:
    assert text is not None
    for piece in kept:
        assert piece in text, (piece, text)
    for marker in ("{{", "}}", "[[", "]]", "{|", "|}", "<", ">", "|", "=", "__", "&nbsp;", "Category:", "thumb", "px"):
        assert marker not in text, (marker, text)


# ---------------------------------------------------------------------------------------------
# One construct per fragment.


def test_templates_are_dropped_inline_text_templates_kept() -> None:
    text = clean(
        "{{Infobox settlement\n| name = Kalo\n| image = Kalo.jpg\n| population = {{formatnum:1234}}\n}}\n"
        "{{Use dmy dates|date=May 2015}}\n"
        "'''Kalo''' ({{lang|fr|Kalô}}; {{IPA-fr|kalo}}) is a mine sane {{citation needed|date=May 2015}} "
        "of {{convert|12|km|mi}} in the north.{{efn|A note.}}\n"
    )
    assert_prose_only(text, "Kalo (Kalô) is a mine sane of 12 km in the north.")


def test_tables_are_dropped() -> None:
    text = clean(
        f"{PROSE}\n\n"
        '{| class="wikitable" style="text-align:center"\n|-\n! Year !! Event\n|-\n'
        "| 1992 || [[1992 Wimbledon Championships|Wimbledon]]\n|-\n| bgcolor=lime | Won || Final\n|}\n\n"
        f"{PROSE_2}\n"
    )
    assert text == f"{PROSE}\n\n{PROSE_2}"


def test_image_and_file_links_with_options_and_captions_are_dropped() -> None:
    text = clean(
        f"[[File:Night sky.ogv|thumb|500px|center|Video of the night sky over [[Kalo]]]]\n{PROSE}"
        "[[Image:Map.svg|upright=1.2|alt=A map|frameless]] [[Media:Song.ogg]]\n\n"
        f"{PROSE_2}\n"
    )
    assert text == f"{PROSE}\n\n{PROSE_2}"


def test_categories_are_dropped() -> None:
    text = clean(f"{PROSE}\n\n[[Category:1885 births]]\n[[Category:1981 deaths|Kalo]]\n")
    assert text == PROSE


def test_refs_are_dropped() -> None:
    text = clean(
        'Kalo is a mine sane.<ref name="a">{{cite web |url=http://www.example.org/x |title=X |accessdate=2015}}</ref> '
        'It has ten towns.<ref name="a" /><ref>Smith, ''Kalo'', p. 12.</ref>\n\n== References ==\n{{reflist}}\n'
    )
    assert text == "Kalo is a mine sane. It has ten towns."


def test_html_tags_comments_and_entities() -> None:
    text = clean(
        "Kalo<!-- a hidden comment --> is a <small>mine</small> sane<br />in the&nbsp;north &amp; "
        "south.<span style=\"color:red\">Red</span> <math>x^2</math><sup>2</sup>\n"
    )
    assert_prose_only(text, "Kalo is a mine sane in the north & south.Red 2")


def test_interwiki_and_interlanguage_links() -> None:
    text = clean(
        "Kalo is a [[mine]]s [[sane (place)|sane]] near [[wikt:river|rivers]] and [[:fr:Kalo|Kalo in French]].\n"
        "[[fr:Kalo]]\n[[de:Kalo]]\n[[zh-yue:Kalo]]\n"
    )
    assert text == "Kalo is a mines sane near rivers and Kalo in French."


def test_magic_words_and_parser_functions() -> None:
    text = clean(
        "__NOTOC__\n{{DISPLAYTITLE:''Kalo''}}\n{{#if: x | yes | no }}" + PROSE + "__NOEDITSECTION__\n"
        "{{DEFAULTSORT:Kalo}}\n{{Authority control}}\n"
    )
    assert text == PROSE


def test_lists_are_dropped() -> None:
    text = clean(
        f"{PROSE}\n* first [[item]]\n** nested item\n# numbered item\n; term : definition\n: indented\n"
        "<ul><li>malanje</li><li>moxico</li></ul>\n<li> malanje <li> moxico\n\n"
        f"{PROSE_2}\n"
    )
    assert text == f"{PROSE}\n\n{PROSE_2}"


def test_non_prose_sections_are_skipped_prose_sections_kept() -> None:
    text = clean(
        f"{PROSE}\n\n== History ==\n{PROSE_2}\n\n=== Early years ===\nThe towns grew.\n\n"
        "== See also ==\n* [[Mine]]\n=== Sub-list ===\nStill part of See also.\n"
        "== Notes ==\n{{notelist}}\n== References ==\n{{reflist|30em}}\n"
        "== Further reading ==\n* {{cite book |title=Kalo}}\n== External links ==\n"
        "* [http://www.example.org Official site]\n== Later history ==\nThe mine closed.\n"
    )
    assert text == f"{PROSE}\n\n{PROSE_2}\n\nThe towns grew.\n\nThe mine closed."


def test_external_links_keep_labels_only() -> None:
    text = clean("Kalo has a [http://www.example.org web site] and http://bare.example.org/page too.\n")
    assert text == "Kalo has a web site and too."


def test_redirects_and_disambiguation_pages_give_nothing() -> None:
    assert clean("#REDIRECT [[Kalo]]") is None
    assert clean("#redirect[[Kalo]] {{R from move}}") is None
    assert clean("'''Kalo''' may refer to:\n* [[Kalo (mine)]]\n{{disambiguation}}") is None
    assert clean("'''Kalo''' may refer to:\n* [[Kalo (mine)]]\n{{Geodis}}") is None
    assert clean("Kalo may be:\n* a mine", title="Kalo (disambiguation)") is None


# ---------------------------------------------------------------------------------------------
# The real XML reader on a .xml.bz2 written here.

SITEINFO = """<siteinfo><sitename>Wikipedia</sitename><namespaces>
<namespace key="0" case="first-letter" /><namespace key="1" case="first-letter">{talk}</namespace>
<namespace key="2" case="first-letter">{user}</namespace><namespace key="6" case="first-letter">{file}</namespace>
<namespace key="10" case="first-letter">Template</namespace>
<namespace key="14" case="first-letter">{category}</namespace>
</namespaces></siteinfo>"""


def page(title: str, text: str, ns: int | None = 0, redirect: str | None = None) -> str:
    ns_xml = "" if ns is None else f"<ns>{ns}</ns>"
    redirect_xml = f'<redirect title="{redirect}" />' if redirect else ""
    return (
        f"<page><title>{html.escape(title)}</title>{ns_xml}<id>1</id>{redirect_xml}<revision><id>2</id>"
        f'<text xml:space="preserve">{html.escape(text)}</text></revision></page>\n'
    )


def write_dump(path: Path, pages: list[str], siteinfo: str | None = None) -> Path:
    head = '<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10" xml:lang="en">\n'
    body = head + (siteinfo or "") + "".join(pages) + "</mediawiki>\n"
    data = body.encode("utf-8")
    path.write_bytes(bz2.compress(data) if path.name.endswith(".bz2") else data)
    return path


def test_dump_reader_keeps_articles_only(tmp_path: Path) -> None:
    names = {"talk": "Talk", "user": "User", "file": "File", "category": "Category"}
    path = write_dump(
        tmp_path / "enwiki-pages-articles.xml.bz2",
        [
            page("Kalo", f"{{{{Infobox|a=b}}}}'''Kalo''' is a [[mine|toru]] sane.<ref>x</ref>\n\n{PROSE_2}"),
            page("Old Kalo", "#REDIRECT [[Kalo]]", redirect="Kalo"),
            page("Older Kalo", "#REDIRECT [[Kalo]]"),  # old dumps: no <redirect> element
            page("Kalo (disambiguation)", "'''Kalo''' may be:\n* [[Kalo]]\n{{dab}}"),
            page("Talk:Kalo", "A talk page, which is not an article at all.", ns=1),
            page("User:Kalo", "A user page.", ns=2),
            page("Template:Kalo", "A template page.", ns=10),
            page("Category:Kalo", "A category page.", ns=None),  # no <ns>: its title's prefix decides
        ],
        SITEINFO.format(**names),
    )
    assert sources.detect_format(path) == "wikixml"
    counts = wiki.DumpCounts()
    assert list(wiki.read_dump(path, counts)) == [f"Kalo is a toru sane.\n\n{PROSE_2}"]
    assert counts == wiki.DumpCounts(articles=1, redirects=2, disambiguation=1, other_namespaces=4)
    reader = sources.CorpusReader(sources.resolve_inputs([str(path)]))
    assert list(reader) == [f"Kalo is a toru sane.\n\n{PROSE_2}"]
    assert reader.stats[0].bytes == path.stat().st_size


def test_dump_namespaces_come_from_siteinfo(tmp_path: Path) -> None:
    # A German dump: file and category links use the names its <siteinfo> gives.
    names = {"talk": "Diskussion", "user": "Benutzer", "file": "Datei", "category": "Kategorie"}
    path = write_dump(
        tmp_path / "dewiki.xml",
        [
            page("Kalo", f"[[Datei:Kalo.jpg|mini|200px|Eine Mine]]{PROSE}\n[[Kategorie:Ort]]\n[[Bild:Alt.png|mini]]"),
            page("Benutzer:Kalo", "Eine Benutzerseite.", ns=None),
        ],
        SITEINFO.format(**names),
    )
    counts = wiki.DumpCounts()
    assert list(wiki.read_dump(path, counts)) == [PROSE]
    assert counts.other_namespaces == 1


def test_damaged_dump_is_a_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "cut.xml.bz2"
    path.write_bytes(bz2.compress(b"<mediawiki><page><title>Kalo</title><revision><text>abc"))
    with pytest.raises(PrepError, match=r"cut\.xml\.bz2: not a readable Wikipedia XML dump"):
        list(wiki.read_dump(path))
    other = tmp_path / "other.xml"
    other.write_text("<rss><channel /></rss>", encoding="utf-8")
    with pytest.raises(PrepError, match=r"other\.xml: not a Wikipedia XML dump .*expected <mediawiki>"):
        list(wiki.read_dump(other))


# ---------------------------------------------------------------------------------------------
# Residue: the detector, and pld-prep on a dump end to end.

RESIDUE_EXAMPLES = [  # decoded the way BERT's tokenizer splits them (the examples)
    "thumb | 500px | center | video of the night sky",
    "< ref > { { cite web | url = http : / / www . example . org",
    '{ | class = " wikitable " style = " text - align : center "',
    "| bgcolor = lime | [ [ 1992 wimbledon championships",
    "category : 1885 births category : 1981 deaths",
    "< li > malanje < li > moxico",
    "_ _ notoc _ _ kalo is a mine",
    "the north & nbsp ; south",
]


@pytest.mark.parametrize("text", RESIDUE_EXAMPLES)
def test_residue_patterns_flag_markup(text: str) -> None:
    assert residue.residue_kinds(text)


def test_residue_patterns_pass_prose() -> None:
    prose = [
        "kalo is a mine sane in the north , and it has ten towns ( 1 , 2 ) .",
        "the ratio was 3 : 1 in 1992 ; the file was lost , and the image : a map of the world .",
        "he said \" yes ! \" and left at 10 : 30 .",
    ]
    assert [residue.residue_kinds(p) for p in prose] == [[], [], []]


def write_vocab(path: Path, words: list[str]) -> Path:
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    punct = list(".,;:!?'\"()-{}[]|<>=/&_#") + [str(d) for d in range(10)]
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *punct, *letters, *("##" + c for c in letters)]
    tokens += ["##" + str(d) for d in range(10)] + words
    path.write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
    return path


WORDS = ["kalo", "is", "a", "mine", "sane", "in", "the", "north", "it", "lies", "near", "river", "and", "has", "ten"]


def article(i: int) -> str:
    rng = np.random.default_rng(i)
    sentences = [" ".join(rng.choice(WORDS, 8)).capitalize() + "." for _ in range(12)]
    linked = " ".join(f"[[{s[:-1]}|{s[:-1]}]]." if k % 3 == 0 else s for k, s in enumerate(sentences[:6]))
    return (
        "{{Infobox mine|name=Kalo|image=Kalo.jpg}}\n__NOTOC__\n"
        f"{linked}<ref>{{{{cite web|url=http://example.org/{i}|title=Kalo}}}}</ref>\n\n"
        "[[File:Kalo.jpg|thumb|220px|left|The [[mine]] at night]]\n"
        f"== History ==\n{' '.join(sentences[6:])}\n\n"
        '{| class="wikitable"\n|-\n| bgcolor=lime | 1992 || [[1992 Wimbledon Championships]]\n|}\n'
        "* a list item\n<li> malanje <li> moxico\n"
        "== References ==\n{{reflist}}\n== External links ==\n* [http://example.org Site]\n"
        "[[Category:1885 births]]\n[[fr:Kalo]]\n"
    )


def prep(inputs: list[Path], output: Path, vocab: Path) -> pipeline.Summary:
    cfg = pipeline.PrepConfig(
        inputs=tuple(map(str, inputs)), output=output, vocab=vocab, workers=1, seed=3, dupe_factor=2,
        validation_fraction=0.1, max_seq_length=64, max_predictions_per_seq=10,
    )
    return pipeline.run(cfg)


def test_dump_through_pld_prep_has_no_residue(tmp_path: Path) -> None:
    vocab = write_vocab(tmp_path / "vocab.txt", WORDS)
    pages = [page(f"Kalo {i}", article(i)) for i in range(40)]
    pages.append(page("Old", "#REDIRECT [[Kalo 1]]", redirect="Kalo 1"))
    dump = write_dump(tmp_path / "dump.xml.bz2", pages)
    summary = prep([dump], tmp_path / "out", vocab)
    assert summary.documents == 40
    report = residue.measure(tmp_path / "out", vocab)
    assert report.samples > 100
    assert report.with_residue == 0, report.lines()
    # The prose survives: every article's 12 sentences of 8 words (one token each, plus the full stop).
    assert summary.tokens == 40 * 12 * 9

    # The same markup as plain text (no parser) is caught by the measurement: it can fail.
    raw = tmp_path / "raw.txt"
    raw.write_text("\n\n".join(article(i).replace("\n", " ") for i in range(40)) + "\n", encoding="utf-8")
    prep([raw], tmp_path / "raw_out", vocab)
    report = residue.measure(tmp_path / "raw_out", vocab)
    assert report.rate > 0.5
    assert report.per_pattern["template braces"] and report.per_pattern["link brackets"]
    assert report.examples


def test_residue_decoding_restores_masked_tokens(tmp_path: Path) -> None:
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "{", "cite", "##s", "kalo"]
    shard = tmp_path / "s.hdf5"
    with h5py.File(shard, "w") as f:
        f["input_ids"] = np.array([[2, 4, 5, 6, 7, 3, 7, 8, 3, 0]], dtype=np.int32)
        f["input_mask"] = np.array([[1] * 9 + [0]], dtype=np.int8)
        f["masked_lm_positions"] = np.array([[1, 0]], dtype=np.int32)
        f["masked_lm_ids"] = np.array([[5, 0]], dtype=np.int32)
    assert list(residue.iter_samples(tmp_path, tokens)) == ["{ { cites ##s kalo"]


# ---------------------------------------------------------------------------------------------
# The real parquet reader.


def test_parquet_reader(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": [1, 2, 3], "text": [f"{PROSE}\n{PROSE_2}", None, "Short"], "body": ["x", "y", "z"]})
    path = tmp_path / "docs.parquet"
    pq.write_table(table, path, row_group_size=2)
    assert sources.detect_format(path) == "parquet"
    reader = sources.CorpusReader(sources.resolve_inputs([str(path)]))
    assert list(reader) == [f"{PROSE}\n\n{PROSE_2}"]
    assert (reader.stats[0].documents, reader.stats[0].skipped_documents) == (1, 2)
    with pytest.raises(PrepError, match=r"docs\.parquet: no column 'content'"):
        list(sources.CorpusReader(sources.resolve_inputs([str(path)]), text_key="content"))
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    with pytest.raises(PrepError, match=r"broken\.parquet: not a readable parquet file"):
        list(sources.CorpusReader(sources.resolve_inputs([str(broken)])))


def test_dump_parsed_by_several_processes_gives_the_same_documents(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pages = [page(f"Kalo {i}", article(i)) for i in range(12)]
    pages[5:5] = [page("Old", "#REDIRECT [[Kalo 1]]"), page("Kalo (disambiguation)", "{{dab}}"), page("T:x", "x", 1)]
    dump = write_dump(tmp_path / "dump.xml.bz2", pages)
    one, two = wiki.DumpCounts(), wiki.DumpCounts()
    alone = list(wiki.read_dump(dump, one))
    monkeypatch.setattr(wiki, "_CHUNK_CHARS", 3000)  # several chunks in flight
    assert list(wiki.read_dump(dump, two, processes=2)) == alone
    assert one == two == wiki.DumpCounts(articles=12, redirects=1, disambiguation=1, other_namespaces=1)
