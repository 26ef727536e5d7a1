"""WordPiece vocabulary: load or train one, and encode sentences with it quickly.

Encoding gives exactly the ids of HF ``tokenizers``' ``BertWordPieceTokenizer`` (the test suite
checks this on real text) at about three times the speed of its ``encode_batch`` on one core
(measured on Wikipedia text): sentences are normalised and split into words with C-level string
operations, and only words not seen before go through ``encode_batch`` (not even those, when the
word is itself a vocabulary entry); a word's pieces never depend on its neighbours, so they are cached.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.errors import PrepError

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
VOCAB_FILE = "vocab.txt"

# ASCII punctuation as BERT's pre-tokenizer defines it; non-ASCII punctuation is padded with spaces
# by the per-character table, so this class can stay ASCII-only.
_ASCII_PUNCT = r"!-/:-@\[-`{-~"
# "\n" separates sentences and comes back as its own item, to mark where each one ends.
_WORD = re.compile(rf"\n|[{_ASCII_PUNCT}]|[^\s{_ASCII_PUNCT}]+")
# Characters that need the per-character table: all non-ASCII ones, and the ASCII control
# characters, which BERT's text cleaning drops (tab, LF and CR are whitespace instead).
_SPECIAL = re.compile(r"[^\t\n\r\x20-\x7e]+")
_ASCII_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# New words encoded per call to HF.
_WORDS_PER_CALL = 4096
# Unique words kept per process before the cache starts over (memory stays around 100 MB).
_CACHE_LIMIT = 1_000_000


@dataclass(frozen=True)
class Vocab:
    """A validated vocab.txt: what the instance builder and the manifest need to know of it."""

    path: Path
    size: int
    sha256: str
    lowercase: bool
    pad_id: int
    cls_id: int
    sep_id: int
    mask_id: int


def load_vocab(path: Path, lowercase: bool, flag: str = "--vocab") -> Vocab:
    """Read and check a BERT ``vocab.txt`` (one token per line, the line number is the id)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise PrepError(f"{flag} {path}: cannot read ({e.strerror})") from e
    try:
        tokens = data.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise PrepError(f"{flag} {path}: not UTF-8 (expected a BERT vocab.txt)") from e
    ids: dict[str, int] = {}
    for i, token in enumerate(tokens):
        ids.setdefault(token, i)
    missing = [t for t in ("[UNK]", "[CLS]", "[SEP]", "[MASK]") if t not in ids]
    if missing:
        raise PrepError(
            f"{flag} {path}: missing {' '.join(missing)} "
            "(expected a BERT vocab.txt with [PAD] [UNK] [CLS] [SEP] [MASK], one token per line)"
        )
    return Vocab(
        path=Path(path),
        size=len(tokens),
        sha256=hashlib.sha256(data).hexdigest(),
        lowercase=lowercase,
        # NVIDIA pads with id 0 whatever token it is; [PAD] is id 0 in every BERT vocab.
        pad_id=0,
        cls_id=ids["[CLS]"],
        sep_id=ids["[SEP]"],
        mask_id=ids["[MASK]"],
    )


def train_vocab(documents: Iterable[str], size: int, lowercase: bool) -> list[str]:
    """Train a WordPiece vocabulary of at most ``size`` tokens; returns the tokens in id order."""
    from tokenizers import BertWordPieceTokenizer  # imported where needed: pld-prep's parent rarely does

    tokenizer = BertWordPieceTokenizer(lowercase=lowercase)
    tokenizer.train_from_iterator(
        documents,
        vocab_size=size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
    )
    vocab = tokenizer.get_vocab()
    return sorted(vocab, key=vocab.__getitem__)


class WordPieceEncoder:
    """Sentence -> WordPiece ids, identical to ``BertWordPieceTokenizer.encode(s, add_special_tokens=False)``."""

    def __init__(self, vocab: Vocab) -> None:
        from tokenizers import BertWordPieceTokenizer

        tokenizer = BertWordPieceTokenizer(str(vocab.path), lowercase=vocab.lowercase)
        self._tokenizer = tokenizer._tokenizer  # the Rust Tokenizer; the wrapper adds nothing here
        self._lowercase = vocab.lowercase
        # A word that is itself a vocabulary entry is that one piece: WordPiece takes the longest
        # entry that starts the word, here the whole word. HF's normaliser leaves an ASCII word as it
        # is (our split has already lowercased it and cut out punctuation and control characters), so
        # ASCII entries within WordPiece's length limit give HF's own answer without asking it; about
        # half of the new words in Wikipedia text, which a worker meets mostly in its first batch.
        limit = self._tokenizer.model.max_input_chars_per_word
        self._whole_words = {
            token: i
            for token, i in self._tokenizer.get_vocab(with_added_tokens=False).items()
            if token.isascii() and len(token) <= limit
        }
        self._char_map: dict[int, str] = {}
        self._reset_cache()

    def _reset_cache(self) -> None:
        # Word i's pieces are pieces[starts[i]:starts[i] + counts[i]]; word 0 is the sentence
        # separator, with no pieces. Arrays grow by doubling; only the first `_words` are in use.
        self._word_ids: dict[str, int] = {"\n": 0}
        self._words = 1
        self._used_pieces = 0
        self._starts = np.zeros(1 << 16, dtype=np.int64)
        self._counts = np.zeros(1 << 16, dtype=np.int64)
        self._pieces = np.zeros(1 << 18, dtype=np.int32)

    def encode(self, sentences: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids of all sentences back to back (int32) and the token count of each (int64)."""
        if not sentences:
            return np.zeros(0, np.int32), np.zeros(0, np.int64)
        text = "\n".join(sentences)
        if text.count("\n") != len(sentences) - 1:  # "\n" separates sentences, so none may hold one
            text = "\n".join(s.replace("\n", " ") for s in sentences)
        words = self._split(text)
        word_ids = self._lookup(words)
        per_word = self._counts[word_ids]
        ends = np.cumsum(per_word)
        total = int(ends[-1]) if len(ends) else 0
        # Expand each word into its run of pieces: position p of word w reads pieces[start_w + p].
        offsets = np.repeat(self._starts[word_ids] - (ends - per_word), per_word)
        tokens = self._pieces[offsets + np.arange(total, dtype=np.int64)]
        separators = np.flatnonzero(word_ids == 0)
        # One separator between each pair of sentences, so len(lengths) == len(sentences).
        lengths = np.diff(np.append(ends[separators], total), prepend=0)
        return tokens, lengths

    def _split(self, text: str) -> list[str]:
        if not text.isascii() or _ASCII_CONTROL.search(text):
            text = _SPECIAL.sub(self._map_run, text)
        if self._lowercase:
            text = text.lower()
        return _WORD.findall(text)

    def _map_run(self, match: re.Match[str]) -> str:
        run = match.group()
        table = self._char_map
        for char in set(run):
            if ord(char) not in table:
                table[ord(char)] = "" if char.isascii() else self._normalize_char(char)
        return run.translate(table)

    def _normalize_char(self, char: str) -> str:
        # BERT normalisation is per character (clean, pad CJK, strip accents, lowercase), so HF's
        # own normaliser applied to one character gives that character's exact replacement.
        # Whitespace becomes a space and punctuation is padded, as BERT's pre-tokenizer splits there.
        out = []
        for c in self._tokenizer.normalizer.normalize_str(char):
            if c.isascii():
                out.append(c)
                continue
            parts = self._tokenizer.pre_tokenizer.pre_tokenize_str(f"a{c}a")
            if len(parts) == 2:
                out.append(" ")
            elif len(parts) == 3:
                out.append(f" {c} ")
            else:
                out.append(c)
        return "".join(out)

    def _lookup(self, words: list[str]) -> np.ndarray:
        unique = set(words)
        new = unique.difference(self._word_ids)
        if new:
            if len(self._word_ids) + len(new) > _CACHE_LIMIT:
                self._reset_cache()
                new = unique.difference(self._word_ids)
            # Set order varies between processes; sorting keeps the cache layout reproducible.
            self._add_words(sorted(new))
        index = self._word_ids
        return np.fromiter(map(index.__getitem__, words), dtype=np.int64, count=len(words))

    def _add_words(self, words: list[str]) -> None:
        whole = self._whole_words
        known: list[str] = []
        others: list[str] = []
        for word in words:
            (known if word in whole else others).append(word)
        if known:
            ids = np.fromiter(map(whole.__getitem__, known), dtype=np.int32, count=len(known))
            self._append_words(known, np.ones(len(known), dtype=np.int64), ids)
        if others:
            pieces, counts = self._encode_words(others)
            self._append_words(others, counts, pieces)

    def _encode_words(self, words: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Pieces of ``words`` from HF, back to back (int32), and the piece count of each word (int64)."""
        # Words go to HF a few thousand at a time, space-separated: one Encoding per chunk instead
        # of one per word. Spaces never join words, so each word gets exactly its own pieces back;
        # the character offsets tell which word each piece came from.
        piece_chunks, count_chunks = [], []
        for first in range(0, len(words), _WORDS_PER_CALL):
            chunk = words[first : first + _WORDS_PER_CALL]
            lengths = np.fromiter(map(len, chunk), dtype=np.int64, count=len(chunk))
            word_starts = np.cumsum(lengths + 1) - lengths - 1
            (encoding,) = self._tokenizer.encode_batch([" ".join(chunk)], add_special_tokens=False)
            piece_starts = np.fromiter((o[0] for o in encoding.offsets), dtype=np.int64, count=len(encoding.ids))
            owner = np.searchsorted(word_starts, piece_starts, side="right") - 1
            piece_chunks.append(np.array(encoding.ids, dtype=np.int32))
            count_chunks.append(np.bincount(owner, minlength=len(chunk)))
        return np.concatenate(piece_chunks), np.concatenate(count_chunks).astype(np.int64)

    def _append_words(self, words: list[str], counts: np.ndarray, pieces: np.ndarray) -> None:
        first_word, first_piece = self._words, self._used_pieces
        self._words += len(words)
        self._used_pieces += len(pieces)
        self._starts = _grown(self._starts, self._words)
        self._counts = _grown(self._counts, self._words)
        self._pieces = _grown(self._pieces, self._used_pieces)
        self._starts[first_word : self._words] = first_piece + np.cumsum(counts) - counts
        self._counts[first_word : self._words] = counts
        self._pieces[first_piece : self._used_pieces] = pieces
        self._word_ids.update(zip(words, range(first_word, self._words), strict=True))


def _grown(array: np.ndarray, needed: int) -> np.ndarray:
    if needed <= len(array):
        return array
    bigger = np.zeros(max(needed, 2 * len(array)), dtype=array.dtype)
    bigger[: len(array)] = array
    return bigger
