"""Tests for data_prep (pld-prep): readers, tokenization, instances, shards, resumption, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_prep import cli, instances, pipeline, sources
from data_prep.instances import InstanceConfig
from data_prep.segment import TokenizedBatch, split_sentences, tokenize_documents
from data_prep.vocab import WordPieceEncoder, load_vocab
from pld_ds.data import schema

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "pe", "du", "ba", "fo"]
WORDS = [a + b for a in SYLLABLES for b in SYLLABLES]
WORDS += [a + b + c for a in SYLLABLES[:6] for b in SYLLABLES for c in "nr"]


# ---------------------------------------------------------------------------------------------
# Fixtures: a tiny vocabulary and corpus, written fresh for every test that needs them.


def write_vocab(path: Path) -> Path:
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = SPECIALS + [f"[unused{i}]" for i in range(5)] + list(".,!?;:'\"()-")
    tokens += letters + ["##" + c for c in letters] + WORDS
    path.write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
    return path


def sentence(rng: np.random.Generator) -> str:
    words = [WORDS[i] for i in rng.integers(0, len(WORDS), rng.integers(4, 12))]
    return " ".join(words).capitalize() + rng.choice([".", "!", "?"])


def document(rng: np.random.Generator, paragraphs: int = 3, per_paragraph: int = 5) -> list[str]:
    return [" ".join(sentence(rng) for _ in range(per_paragraph)) for _ in range(paragraphs)]


def write_wiki(path: Path, docs: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    parts = []
    for i in range(docs):
        title = f"Kalo {i}"
        body = "\n".join(document(rng, 6, 6))
        parts.append(f'<doc id="{i}" url="https://example.org/?id={i}" title="{title}">\n{title}\n\n{body}\n</doc>\n')
    path.write_text("".join(parts), encoding="utf-8")
    return path


def write_book(path: Path, seed: int = 1) -> Path:
    rng = np.random.default_rng(seed)
    header = "The Project Gutenberg EBook of Test\r\n\r\nLicence words here.\r\n\r\n"
    start = "*** START OF THIS PROJECT GUTENBERG EBOOK TEST ***\r\n\r\n"
    paragraphs = []
    for _ in range(30):
        text = " ".join(sentence(rng) for _ in range(4))
        # Hard-wrap at ~40 characters, as Gutenberg texts are.
        lines, line = [], ""
        for word in text.split():
            if len(line) + len(word) > 40:
                lines.append(line)
                line = ""
            line = f"{line} {word}".strip()
        lines.append(line)
        paragraphs.append("\r\n".join(lines))
    end = "\r\n\r\n*** END OF THIS PROJECT GUTENBERG EBOOK TEST ***\r\n\r\nFooter licence text.\r\n"
    path.write_bytes((header + start + "\r\n\r\n".join(paragraphs) + end).encode("utf-8"))
    return path


def write_jsonl(path: Path, docs: int, seed: int = 2) -> Path:
    rng = np.random.default_rng(seed)
    lines = [json.dumps({"id": i, "text": "\n".join(document(rng, 2, 4))}) for i in range(docs)]
    lines.append(json.dumps({"id": "no text field"}))
    lines.append("{not json")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def vocab(tmp_path: Path) -> Path:
    return write_vocab(tmp_path / "vocab.txt")


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    folder = tmp_path / "corpus"
    (folder / "wiki").mkdir(parents=True)
    write_wiki(folder / "wiki" / "wiki_00", 60)
    write_book(folder / "book.txt")
    write_jsonl(folder / "docs.jsonl", 20)
    (folder / "empty.txt").write_bytes(b"")
    (folder / "latin1.txt").write_bytes("Caf\xe9 na\xefve r\xe9sum\xe9 kalo mine.\n".encode("latin-1") * 3)
    return folder


def prep(inputs: list[Path], output: Path, vocab: Path | None, **overrides: object) -> pipeline.Summary:
    settings_ = {"workers": 1, "seed": 7, "validation_fraction": 0.05}
    settings_.update(overrides)
    cfg = pipeline.PrepConfig(inputs=tuple(map(str, inputs)), output=output, vocab=vocab, **settings_)  # type: ignore[arg-type]
    return pipeline.run(cfg)


def read_split(output: Path, split: str) -> dict[str, np.ndarray]:
    """All shards of a split, concatenated, read the way NVIDIA's loader does (f[key][:])."""
    arrays: dict[str, list[np.ndarray]] = {}
    for path in sorted((output / split).glob("*" + schema.SHARD_SUFFIX)):
        with h5py.File(path, "r") as f:
            for key in f:
                arrays.setdefault(key, []).append(f[key][:])
    return {k: np.concatenate(v) for k, v in arrays.items()}


def vocab_ids(path: Path) -> dict[str, int]:
    return {t: i for i, t in enumerate(path.read_text(encoding="utf-8").splitlines())}


# ---------------------------------------------------------------------------------------------
# Readers.


def docs_of(path: Path, fmt: str = "auto", text_key: str = "text") -> tuple[list[str], sources.SourceStats]:
    reader = sources.CorpusReader(sources.resolve_inputs([str(path)], fmt), text_key)
    return list(reader), reader.stats[0]


def test_wikiextractor_drops_title_and_splits_documents(tmp_path: Path) -> None:
    path = tmp_path / "wiki_00"
    path.write_text(
        '<doc id="1" url="u" title="Tom &amp; Jerry">\nTom & Jerry\n\nFirst paragraph of the cartoon.\n'
        "Second paragraph, still about it.\n</doc>\n"
        '<doc id="2" url="u" title="Stub">\nStub\n\n</doc>\n',
        encoding="utf-8",
    )
    assert sources.detect_format(path) == "wikiextractor"
    docs, stats = docs_of(path)
    assert docs == ["First paragraph of the cartoon.\n\nSecond paragraph, still about it."]
    assert (stats.documents, stats.skipped_documents) == (1, 1)


def test_book_strips_gutenberg_boilerplate_and_joins_lines(tmp_path: Path) -> None:
    path = write_book(tmp_path / "book.txt")
    assert sources.detect_format(path) == "books"
    docs, stats = docs_of(path)
    assert len(docs) == 1 and stats.documents == 1
    text = docs[0]
    assert "Licence" not in text and "Footer" not in text and "GUTENBERG" not in text
    assert "\r" not in text
    paragraphs = text.split("\n\n")
    assert len(paragraphs) == 30 and all("\n" not in p for p in paragraphs)


def test_plain_text_blank_lines_separate_documents(tmp_path: Path) -> None:
    path = tmp_path / "sample.txt"
    path.write_text("First doc line one.\nFirst doc line two.\n\n\nSecond doc, a single line.\n", encoding="utf-8")
    assert sources.detect_format(path) == "plain"
    docs, _ = docs_of(path)
    assert docs == ["First doc line one.\n\nFirst doc line two.", "Second doc, a single line."]


def test_jsonl_reads_text_key_and_counts_bad_lines(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "docs.jsonl", 3)
    assert sources.detect_format(path) == "jsonl"
    docs, stats = docs_of(path)
    assert len(docs) == 3 and stats.skipped_documents == 2
    _, stats = docs_of(path, text_key="body")
    assert stats.documents == 0 and stats.skipped_documents == 5


def test_non_utf8_bytes_are_replaced_and_counted_and_empty_files_skipped(corpus: Path) -> None:
    docs, stats = docs_of(corpus / "latin1.txt")
    assert stats.replaced_bytes == 12  # four non-UTF-8 bytes per line, three lines
    assert "\ufffd" in docs[0]
    docs, stats = docs_of(corpus / "empty.txt")
    assert docs == [] and stats.files == 1 and stats.bytes == 0


def test_directories_are_walked_recursively_in_sorted_order(corpus: Path) -> None:
    found = [f.relative_to(corpus).as_posix() for f, _ in sources.resolve_inputs([str(corpus)])[0].files]
    assert found == ["book.txt", "docs.jsonl", "empty.txt", "latin1.txt", "wiki/wiki_00"]


WIKI_XML = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10">
<page><title>Kalo</title><ns>0</ns><id>1</id><revision><id>1</id>
<text xml:space="preserve">'\'\'Kalo\'\'\' is a [[mine|toru]] sane.
Second line of the article text.</text></revision></page>
<page><title>Old</title><ns>0</ns><id>2</id><redirect title="Kalo" />
<revision><text>#REDIRECT [[Kalo]]</text></revision></page>
<page><title>Talk:Kalo</title><ns>1</ns><id>3</id>
<revision><text>A talk page, which is not an article at all.</text></revision></page>
</mediawiki>
"""


def test_missing_optional_readers_are_one_line_errors(
    tmp_path: Path, vocab: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for module in ("mwparserfromhell", "pyarrow", "pyarrow.parquet"):
        monkeypatch.setitem(sys.modules, module, None)  # makes the import fail
    (tmp_path / "dump.xml").write_text(WIKI_XML, encoding="utf-8")
    (tmp_path / "docs.parquet").write_bytes(b"PAR1")
    for name, package in (("dump.xml", "mwparserfromhell"), ("docs.parquet", "pyarrow")):
        code, err = run_cli(
            capsys, "--input", str(tmp_path / name), "--output", str(tmp_path / "o"), "--vocab", str(vocab)
        )
        assert code == 2 and len(err.splitlines()) == 1
        assert name in err and f"pip install {package}" in err


# ---------------------------------------------------------------------------------------------
# Tokenization.

TRICKY = [
    "Héllo WÖRLD ΣΑΣ ὈΔΥΣΣΕΎΣ İstanbul ǅemal ﬁne ½ ² 中文字符 テスト 한국어 \u200bzero\u00a0nb\u2028ls\x85nel",
    "\x00ctl\x7fdel \ufffd naïve café — “quotes” ‘single’ … • ¶ § © ™ € ° ± × → ∞ ≠ 🙂 👍🏽 e\u0301 a\u0308 Å Ω K",
    "tab\there\rcr\x0bvt\x0cff\x1cfs " + "x" * 150 + " short ＡＢＣ　ｆｕｌｌ",
    "",
    "   ",
    'Kalo mine, toru! (sane) vi-pe\'s "duba"; fo.',
]


@pytest.mark.parametrize("lowercase", [True, False])
def test_encoder_matches_hf_bert_wordpiece(vocab: Path, lowercase: bool) -> None:
    from tokenizers import BertWordPieceTokenizer

    rng = np.random.default_rng(3)
    sentences = TRICKY + [sentence(rng) for _ in range(200)]
    encoder = WordPieceEncoder(load_vocab(vocab, lowercase))
    hf = BertWordPieceTokenizer(str(vocab), lowercase=lowercase)
    for _ in range(2):  # the second pass runs from the word cache
        tokens, lengths = encoder.encode(sentences)
        assert len(lengths) == len(sentences)
        ends = np.cumsum(lengths)
        for i, reference in enumerate(hf.encode_batch(sentences, add_special_tokens=False)):
            assert tokens[ends[i] - lengths[i] : ends[i]].tolist() == reference.ids, sentences[i]


def test_tokenize_documents_drops_empty_sentences_and_documents(vocab: Path) -> None:
    encoder = WordPieceEncoder(load_vocab(vocab, True))
    batch = tokenize_documents(["Kalo mine.\n\n\x00\x01\n\nToru sane.", "\u200b\u200b", "Duba fo."], encoder)
    assert batch.num_documents == 2 and batch.num_sentences == 3
    assert np.all(np.diff(batch.sentence_offsets) > 0)


# ---------------------------------------------------------------------------------------------
# Instance building against NVIDIA's reference semantics.


def nvidia_pairs(batch: TokenizedBatch, cfg: InstanceConfig, uniform) -> list[tuple[int, int, int, int, int]]:
    """NVIDIA's sentence-by-sentence loop, drawing from the same uniform stream in the same order."""
    sent, docs = batch.sentence_offsets.tolist(), batch.document_offsets.tolist()
    n_docs, max_tokens, out = batch.num_documents, cfg.max_seq_length - 3, []
    for _ in range(cfg.dupe_factor):
        for d in range(n_docs):
            document = [sent[i + 1] - sent[i] for i in range(docs[d], docs[d + 1])]
            target = max_tokens
            if uniform() < cfg.short_seq_prob:
                target = 2 + int(uniform() * (max_tokens - 1))
            chunk, length, i = [], 0, 0
            while i < len(document):
                chunk.append(docs[d] + i)
                length += document[i]
                if i == len(document) - 1 or length >= target:
                    a_end = 1 if len(chunk) < 2 else 1 + int(uniform() * (len(chunk) - 1))
                    a_lo, a_hi = sent[chunk[0]], sent[chunk[a_end - 1] + 1]
                    if len(chunk) == 1 or uniform() < 0.5:
                        other = d
                        for _ in range(10):
                            other = int(uniform() * n_docs)
                            if other != d:
                                break
                        start = docs[other] + int(uniform() * (docs[other + 1] - docs[other]))
                        b_lo = b_hi = sent[start]
                        for j in range(start, docs[other + 1]):
                            b_hi = sent[j + 1]
                            if b_hi - b_lo >= target - (a_hi - a_lo):
                                break
                        out.append((a_lo, a_hi, b_lo, b_hi, 1))
                        i -= len(chunk) - a_end
                    else:
                        out.append((a_lo, a_hi, a_hi, sent[chunk[-1] + 1], 0))
                    chunk, length = [], 0
                i += 1
    return out


def small_cfg(**kw: object) -> InstanceConfig:
    base = {
        "max_seq_length": 32,
        "max_predictions_per_seq": 5,
        "short_seq_prob": 0.3,
        "masked_lm_prob": 0.15,
        "dupe_factor": 2,
        "dynamic_masking": False,
        "vocab_size": 100,
        "cls_id": 2,
        "sep_id": 3,
        "mask_id": 4,
    }
    base.update(kw)
    return InstanceConfig(**base)  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.lists(st.integers(1, 40), min_size=1, max_size=12), min_size=1, max_size=6),
    seed=st.integers(0, 2**16),
)
def test_pair_planning_equals_nvidia_loop(lengths: list[list[int]], seed: int) -> None:
    sentence_lengths = [x for doc in lengths for x in doc]
    batch = TokenizedBatch(
        tokens=np.arange(sum(sentence_lengths), dtype=np.int32),
        sentence_offsets=np.concatenate(([0], np.cumsum(sentence_lengths))).astype(np.int64),
        document_offsets=np.concatenate(([0], np.cumsum([len(d) for d in lengths]))).astype(np.int64),
    )
    cfg = small_cfg()
    mine = instances._plan_pairs(batch, cfg, instances._uniform_stream(np.random.default_rng(seed)))
    reference = nvidia_pairs(batch, cfg, instances._uniform_stream(np.random.default_rng(seed)))
    assert [tuple(p) for p in mine.tolist()] == reference


@settings(max_examples=200, deadline=None)
@given(la=st.integers(1, 300), lb=st.integers(1, 300), max_tokens=st.integers(2, 200))
def test_truncation_matches_one_token_at_a_time(la: int, lb: int, max_tokens: int) -> None:
    a, b = la, lb
    while a + b > max_tokens:
        if a > b:
            a -= 1
        else:
            b -= 1
    pairs = np.array([[100, 100 + la, 1000, 1000 + lb, 0]], dtype=np.int64)
    a_lo, a_len, b_lo, b_len, _ = instances._truncate(pairs, max_tokens, np.random.default_rng(0))
    assert (int(a_len[0]), int(b_len[0])) == (a, b)
    assert 100 <= a_lo[0] and a_lo[0] + a_len[0] <= 100 + la
    assert 1000 <= b_lo[0] and b_lo[0] + b_len[0] <= 1000 + lb


def test_random_subsets_are_uniform() -> None:
    rows = 120_000
    chosen = instances._random_subsets(np.full(rows, 5), np.full(rows, 2), 3, np.random.default_rng(0))
    assert np.all(chosen[:, 2] == 5) and np.all(chosen[:, 0] < chosen[:, 1])
    _, counts = np.unique(chosen[:, 0] * 5 + chosen[:, 1], return_counts=True)
    assert len(counts) == 10 and counts.min() > 0.9 * rows / 10


# ---------------------------------------------------------------------------------------------
# End to end: shards.


def test_shards_follow_the_schema_exactly(corpus: Path, vocab: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = prep([corpus], out, vocab, max_seq_length=64, max_predictions_per_seq=10)
    manifest = json.loads((out / schema.MANIFEST_NAME).read_text())
    assert summary.instances["train"] > 0 and summary.instances["validation"] > 0
    for split in pipeline.SPLITS:
        for shard in manifest["splits"][split]["shards"]:
            path = out / shard["file"]
            assert path.name.startswith(f"{split}_") and path.suffix == schema.SHARD_SUFFIX
            with h5py.File(path, "r") as f:
                assert set(f.keys()) == {field.name for field in schema.ALL_FIELDS}
                for field in schema.ALL_FIELDS:
                    dataset = f[field.name]
                    assert dataset.dtype == field.dtype, field.name
                    assert dataset.shape == schema.expected_shape(field, shard["samples"], 64, 10)
                    assert dataset.compression == schema.COMPRESSION
    (source,) = manifest["sources"]
    assert source["files"] == 5 and source["replaced_bytes"] == 12
    assert source["documents"] == 60 + 1 + 20 + 1 and source["skipped_documents"] == 2
    assert manifest["vocab"]["size"] == len(vocab.read_text().splitlines())
    assert manifest["total_tokens"] == sum(manifest["splits"][s]["tokens"] for s in pipeline.SPLITS)
    assert not list(out.rglob("*.tmp")) and not (out / pipeline.SPILL_DIR).exists()


def test_instance_layout_masking_and_nsp(corpus: Path, vocab: Path, tmp_path: Path) -> None:
    ids = vocab_ids(vocab)
    # Same seed with and without static masking: the same instances, masked and unmasked.
    prep([corpus], tmp_path / "static", vocab, dupe_factor=10)
    prep([corpus], tmp_path / "dynamic", vocab, dupe_factor=10, dynamic_masking=True)
    static = read_split(tmp_path / "static", "train")
    dynamic = read_split(tmp_path / "dynamic", "train")
    assert set(dynamic) == {f.name for f in schema.BASE_FIELDS}

    n, seq = static["input_ids"].shape
    mask = static["input_mask"].astype(bool)
    lengths = mask.sum(axis=1)
    positions = np.arange(seq)
    # input_mask covers exactly the real tokens, which come first.
    assert np.array_equal(mask, positions[None, :] < lengths[:, None])
    assert np.all(static["input_ids"][~mask] == 0)
    original = dynamic["input_ids"]
    rows = np.arange(n)
    assert np.all(original[:, 0] == ids["[CLS]"])
    assert np.all(original[rows, lengths - 1] == ids["[SEP]"])
    segments = static["segment_ids"]
    b_start = np.argmax(segments, axis=1)
    assert np.all(original[rows, b_start - 1] == ids["[SEP]"])
    assert np.array_equal(segments, (positions[None, :] >= b_start[:, None]) & mask)
    assert np.sum(original == ids["[SEP]"]) == 2 * n and np.sum(original == ids["[CLS]"]) == n
    assert np.array_equal(static["segment_ids"], dynamic["segment_ids"])
    assert np.array_equal(static["next_sentence_labels"], dynamic["next_sentence_labels"])

    # Masking: count, positions, labels = the unmasked tokens, 80/10/10.
    mpos, mids = static["masked_lm_positions"], static["masked_lm_ids"]
    used = mpos > 0
    expected = np.minimum(20, np.maximum(1, np.round(lengths * 0.15).astype(int)))
    assert np.array_equal(used.sum(axis=1), expected)
    assert np.all(used[:, :-1] >= used[:, 1:])  # padding last
    assert np.all(np.diff(np.where(used, mpos, seq + np.arange(20)), axis=1) > 0)  # sorted, distinct
    assert np.all(mids[~used] == 0)
    r, c = np.nonzero(used)
    where = mpos[r, c]
    assert np.all(original[r, where] == mids[r, c])
    assert not np.any(np.isin(original[r, where], [ids["[CLS]"], ids["[SEP]"], 0]))
    restored = static["input_ids"].copy()
    restored[r, where] = mids[r, c]
    assert np.array_equal(restored, original)  # nothing outside the masked positions changed
    shown = static["input_ids"][r, where]
    total = len(shown)
    assert total > 20_000
    as_mask = np.mean(shown == ids["[MASK]"])
    kept = np.mean(shown == mids[r, c])
    assert abs(as_mask - 0.8) < 0.015 and abs(kept - 0.1) < 0.015 and abs(1 - as_mask - kept - 0.1) < 0.015

    nsp = static["next_sentence_labels"]
    assert set(np.unique(nsp)) == {schema.IS_NEXT, schema.IS_RANDOM_NEXT}
    assert 0.45 < nsp.mean() < 0.58


def test_extreme_settings_keep_the_invariants(corpus: Path, vocab: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    extreme = {"max_seq_length": 8, "max_predictions_per_seq": 8, "short_seq_prob": 1.0, "masked_lm_prob": 1.0}
    prep([corpus], out, vocab, dupe_factor=1, **extreme)
    train = read_split(out, "train")
    lengths = train["input_mask"].sum(axis=1)
    assert train["input_ids"].shape[1] == 8 and lengths.min() >= 5
    # Every candidate (all but [CLS] and the two [SEP]s) is masked when masked_lm_prob is 1.
    assert np.array_equal((train["masked_lm_positions"] > 0).sum(axis=1), lengths - 3)


def test_nvidia_style_reader_round_trip(corpus: Path, vocab: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    prep([corpus], out, vocab, num_shards=2)
    keys = ["input_ids", "input_mask", "segment_ids", "masked_lm_positions", "masked_lm_ids", "next_sentence_labels"]
    path = sorted((out / "train").glob("*.hdf5"))[0]
    with h5py.File(path, "r") as f:
        inputs = [np.asarray(f[key][:]) for key in keys]
    input_ids, input_mask, segment_ids, positions, masked_ids, nsp = (x[0].astype(np.int64) for x in inputs)
    # NVIDIA's pretraining_dataset.__getitem__: labels up to the first 0 position.
    labels = np.full(input_ids.shape, schema.IGNORE_INDEX)
    zeros = np.nonzero(positions == 0)[0]
    index = zeros[0] if len(zeros) else len(positions)
    labels[positions[:index]] = masked_ids[:index]
    assert 0 < (labels != schema.IGNORE_INDEX).sum() <= 20
    assert np.all(input_mask[labels != schema.IGNORE_INDEX] == 1)
    assert nsp.shape == () and input_ids.shape == segment_ids.shape == (128,)


def test_shards_are_balanced(corpus: Path, vocab: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = prep([corpus], out, vocab, num_shards=7)
    manifest = json.loads((out / schema.MANIFEST_NAME).read_text())
    counts = [s["samples"] for s in manifest["splits"]["train"]["shards"]]
    assert len(counts) == 7 and max(counts) - min(counts) <= 1
    assert sum(counts) == summary.instances["train"]
    for shard in manifest["splits"]["train"]["shards"]:
        with h5py.File(out / shard["file"], "r") as f:
            assert len(f["next_sentence_labels"]) == shard["samples"]


def test_same_seed_same_output_for_any_worker_count(corpus: Path, vocab: Path, tmp_path: Path) -> None:
    # A small batch size gives several batches, so two workers really split the work.
    original = pipeline.BATCH_CHARS
    pipeline.BATCH_CHARS = 20_000
    try:
        prep([corpus], tmp_path / "a", vocab, num_shards=3)
        prep([corpus], tmp_path / "b", vocab, num_shards=3, workers=2)
        prep([corpus], tmp_path / "c", vocab, num_shards=3, seed=8)
    finally:
        pipeline.BATCH_CHARS = original
    for split in pipeline.SPLITS:
        a, b = read_split(tmp_path / "a", split), read_split(tmp_path / "b", split)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    other_seed = read_split(tmp_path / "c", "train")["input_ids"]
    assert not np.array_equal(read_split(tmp_path / "a", "train")["input_ids"], other_seed)


def test_rerun_skips_finished_shards_and_resumes_after_interrupt(
    corpus: Path, vocab: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    prep([corpus], out, vocab, num_shards=4)
    shards = sorted(out.rglob("*.hdf5"))
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shards}
    content = {p: p.read_bytes() for p in shards}

    assert prep([corpus], out, vocab, num_shards=4).already_complete
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shards} == before

    # Lose the manifest and one shard: only that shard is written again, identical.
    (out / schema.MANIFEST_NAME).unlink()
    shards[1].unlink()
    summary = prep([corpus], out, vocab, num_shards=4)
    assert summary.shards_reused == len(shards) - 1
    for p in shards:
        assert p.read_bytes() == content[p]
        if p != shards[1]:
            assert (p.stat().st_ino, p.stat().st_mtime_ns) == before[p]

    # Ctrl-C in the middle of writing shards: no half files, no manifest, and a re-run resumes.
    fresh = tmp_path / "fresh"
    real_write = pipeline.write_shard
    calls = []

    def interrupted(path: Path, *args: object) -> None:
        calls.append(path)
        if len(calls) == 2:
            path.with_name(path.name + ".tmp").write_bytes(b"half a shard")
            raise KeyboardInterrupt
        real_write(path, *args)

    monkeypatch.setattr(pipeline, "write_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prep([corpus], fresh, vocab, num_shards=4)
    assert not list(fresh.rglob("*.tmp")) and not (fresh / schema.MANIFEST_NAME).exists()
    assert len(list(fresh.rglob("*.hdf5"))) == 1
    monkeypatch.setattr(pipeline, "write_shard", real_write)
    summary = prep([corpus], fresh, vocab, num_shards=4)
    assert summary.batches_reused > 0 and summary.shards_reused == 1
    for p in shards:
        assert (fresh / p.relative_to(out)).read_bytes() == content[p]


def test_validation_split(tmp_path: Path, vocab: Path) -> None:
    two = tmp_path / "two.txt"
    rng = np.random.default_rng(5)
    two.write_text("\n\n".join(" ".join(sentence(rng) for _ in range(20)) for _ in range(2)) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    summary = prep([two], out, vocab, validation_fraction=0.01)
    manifest = json.loads((out / schema.MANIFEST_NAME).read_text())
    assert manifest["splits"]["validation"]["documents"] == 1 and summary.instances["validation"] > 0
    summary = prep([two], tmp_path / "none", vocab, validation_fraction=0.0)
    assert summary.instances["validation"] == 0 and summary.shards["validation"] == 0
    assert pipeline._is_validation(1, 10_000, 1_000_000)
    picked = [i for i in range(1000) if pipeline._is_validation(i, 10_000, 1_000_000)]
    assert len(picked) == 10


def test_one_long_book_still_has_validation_text(tmp_path: Path, vocab: Path) -> None:
    """A corpus of one Gutenberg book is one document: it is cut into parts at paragraph breaks before the
    split, so validation gets a part (and no part is shorter than PART_CHARS, but the last)."""
    rng = np.random.default_rng(6)
    paragraphs = [" ".join(sentence(rng) for _ in range(8)) for _ in range(700)]
    book = tmp_path / "book.txt"
    body = "\n\n".join(paragraphs)
    book.write_text("*** START OF THE PROJECT GUTENBERG EBOOK A BOOK ***\n\n" + body
                    + "\n\n*** END OF THE PROJECT GUTENBERG EBOOK A BOOK ***\n", encoding="utf-8")
    parts = list(pipeline._parts(body, 20_000))
    assert "\n\n".join(parts) == body and len(body) // 25_000 <= len(parts) <= len(body) // 20_000 + 1
    assert all(len(p) >= 20_000 for p in parts[:-1]) and len(parts[-1]) <= 30_000 + len(paragraphs[0]) * 2
    assert list(pipeline._parts("short", 20_000)) == ["short"]
    out = tmp_path / "out"
    summary = prep([book], out, vocab, validation_fraction=0.01)
    manifest = json.loads((out / schema.MANIFEST_NAME).read_text())
    assert manifest["splits"]["validation"]["documents"] == 1 and summary.instances["validation"] > 0
    assert summary.instances["train"] > 0  # two parts of about PART_CHARS: the second is the validation one


def test_train_vocab_writes_vocab_and_shards(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = cli.main(["--input", str(corpus), "--output", str(out), "--train-vocab", "120", "--workers", "1"])
    assert code == 0
    tokens = (out / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert tokens[:5] == SPECIALS and len(tokens) <= 120
    manifest = json.loads((out / schema.MANIFEST_NAME).read_text())
    assert manifest["vocab"]["trained"] and manifest["vocab"]["size"] == len(tokens)
    assert read_split(out, "train")["input_ids"].max() < len(tokens)


def test_given_vocab_is_copied_beside_the_shards_for_training(corpus: Path, vocab: Path, tmp_path: Path) -> None:
    """A --vocab from elsewhere is copied byte for byte into the output: the training reader finds the [MASK]
    id there for dynamic-masking shards, from any working directory, and a re-run is still complete."""
    from pld_ds.pretrain import data_vocabulary

    crlf = tmp_path / "crlf_vocab.txt"
    crlf.write_bytes(vocab.read_bytes().replace(b"\n", b"\r\n"))
    out = tmp_path / "out"
    prep([corpus], out, crlf, dynamic_masking=True)
    assert (out / "vocab.txt").read_bytes() == crlf.read_bytes()
    manifest = json.loads((out / schema.MANIFEST_NAME).read_text())
    assert manifest["vocab"]["file"] == "vocab.txt" and manifest["vocab"]["source"] == str(crlf)
    size, masking = data_vocabulary(str(out), None)
    assert size == manifest["vocab"]["size"] and masking is not None and masking.mask_id == SPECIALS.index("[MASK]")
    assert prep([corpus], out, crlf, dynamic_masking=True).already_complete


def test_output_inside_input_folder_is_not_read(corpus: Path, vocab: Path) -> None:
    out = corpus / "shards"
    prep([corpus], out, vocab)
    files = [f.relative_to(corpus).as_posix() for f, _ in sources.resolve_inputs([str(corpus)], exclude=out)[0].files]
    assert not any(f.startswith("shards/") for f in files)


# ---------------------------------------------------------------------------------------------
# Command line errors: exit code 2 and one line naming the file or flag.


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    try:
        code = cli.main(list(args))
    except SystemExit as e:  # argparse
        code = int(e.code or 0)
    err = capsys.readouterr().err
    return code, err


BASE = ["--input", "{corpus}", "--output", "{tmp}/o", "--vocab", "{vocab}"]


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--input", "{tmp}/missing.txt", "--output", "{tmp}/o", "--vocab", "{vocab}"], "missing.txt"),
        (["--input", "{corpus}", "--output", "{tmp}/o"], "--vocab"),
        ([*BASE, "--train-vocab", "100"], "--vocab"),
        ([*BASE, "--max-seq-length", "abc"], "--max-seq-length"),
        ([*BASE, "--masked-lm-prob", "2"], "--masked-lm-prob"),
        ([*BASE, "--workers", "0"], "--workers"),
        ([*BASE, "--validation-fraction", "0.9"], "--validation-fraction"),
        ([*BASE, "--max-predictions-per-seq", "200", "--max-seq-length", "64"], "--max-predictions-per-seq"),
        (["--input", "{corpus}/empty.txt", "--output", "{tmp}/o", "--vocab", "{vocab}"], "empty.txt"),
        (["--input", "{corpus}/empty.txt", "--output", "{tmp}/o", "--train-vocab", "100"], "empty.txt"),
        (["--input", "{corpus}", "--output", "{tmp}/o", "--vocab", "{tmp}/bad_vocab.txt"], "bad_vocab.txt"),
        (["--input", "{corpus}", "--output", "{corpus}/book.txt", "--vocab", "{vocab}"], "book.txt"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    args: list[str], named: str, corpus: Path, vocab: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "bad_vocab.txt").write_text("[PAD]\n[UNK]\nhello\n", encoding="utf-8")
    filled = [a.format(tmp=tmp_path, corpus=corpus, vocab=vocab) for a in args]
    code, err = run_cli(capsys, *filled)
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pld-prep: error: ") and named in lines[0], err


def test_module_entry_point_reports_errors_without_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "data_prep",
            "--input",
            str(tmp_path / "nope"),
            "--output",
            str(tmp_path / "o"),
            "--vocab",
            str(tmp_path / "v.txt"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"pld-prep: error: --input {tmp_path / 'nope'}: no such file or directory"]


# ---------------------------------------------------------------------------------------------
# Real data, when the shared corpus sits beside the project.


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="shared data not present")
def test_real_wiki_and_book(tmp_path: Path) -> None:
    from tokenizers import BertWordPieceTokenizer

    wiki = sorted((SHARED_DATA / "wiki").iterdir())[0]
    book = sorted((SHARED_DATA / "books").iterdir())[8]
    bert_vocab = SHARED_DATA / "bert-uncased-vocab" / "vocab.txt"
    out = tmp_path / "out"
    summary = prep([wiki, book, SHARED_DATA / "pretrain-sample" / "sample_text.txt"], out, bert_vocab, dupe_factor=1)
    assert summary.documents > 10 and summary.instances["train"] > 1000
    manifest = json.loads((out / schema.MANIFEST_NAME).read_text())
    assert [s["formats"] for s in manifest["sources"]] == [["wikiextractor"], ["books"], ["plain"]]
    train = read_split(out, "train")
    assert 0.4 < train["next_sentence_labels"].mean() < 0.65
    # The fast encoder gives HF's ids on real text too.
    docs, _ = docs_of(book)
    sentences = [s for d in docs for s in split_sentences(d)][:3000]
    encoder = WordPieceEncoder(load_vocab(bert_vocab, True))
    tokens, lengths = encoder.encode(sentences)
    hf = BertWordPieceTokenizer(str(bert_vocab), lowercase=True)
    assert tokens.tolist() == [i for r in hf.encode_batch(sentences, add_special_tokens=False) for i in r.ids]


def test_progress_line_estimates_the_rest_at_the_rate_so_far(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline.time, "perf_counter", lambda: 100.0)
    assert pipeline._progress(40.0, 0.25) == "25%, ETA 0:03:00"  # 60 s for a quarter: 180 s left
    assert pipeline._progress(100.0 - 3725, 0.5) == "50%, ETA 1:02:05"
    assert pipeline._progress(90.0, 0.0) == "0%"
    assert pipeline._progress(90.0, 1.7).startswith("99%")  # decompressed bytes can pass the file sizes
