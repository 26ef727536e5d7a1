"""Sentence segmentation and tokenization of a batch of documents."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import blingfire
import numpy as np

from data_prep.vocab import WordPieceEncoder

# blingfire does not end a sentence at a blank line, but always does at U+2029 (paragraph separator).
_PARAGRAPH = "\u2029"


def split_sentences(document: str) -> list[str]:
    """Sentences of one document; a paragraph break ("\\n\\n") always ends a sentence."""
    found = blingfire.text_to_sentences(document.replace("\n\n", _PARAGRAPH))
    if not found and document.strip():
        # blingfire answers "" when it fails; paragraphs as sentences beat losing the document.
        found = document
    # U+2029 is whitespace to BERT; a space keeps the words on either side apart.
    return [s for s in found.replace(_PARAGRAPH, " ").split("\n") if s and not s.isspace()]


@dataclass(frozen=True)
class TokenizedBatch:
    """Documents as sentences of WordPiece ids, stored flat (CSR style, no Python lists per sentence).

    Sentence ``i`` is ``tokens[sentence_offsets[i]:sentence_offsets[i + 1]]``; document ``d`` is
    sentences ``document_offsets[d]`` to ``document_offsets[d + 1]``. Every sentence has at least
    one token and every document at least one sentence.
    """

    tokens: np.ndarray  # int32
    sentence_offsets: np.ndarray  # int64, len = sentences + 1
    document_offsets: np.ndarray  # int64, len = documents + 1

    @property
    def num_documents(self) -> int:
        return len(self.document_offsets) - 1

    @property
    def num_sentences(self) -> int:
        return len(self.sentence_offsets) - 1

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)


def tokenize_documents(documents: Sequence[str], encoder: WordPieceEncoder) -> TokenizedBatch:
    """Split documents into sentences and encode them; sentences and documents left empty are dropped."""
    sentences: list[str] = []
    per_document = np.zeros(len(documents), dtype=np.int64)
    for d, document in enumerate(documents):
        found = split_sentences(document)
        per_document[d] = len(found)
        sentences.extend(found)
    tokens, lengths = encoder.encode(sentences)
    keep = lengths > 0
    # Documents keep the sentences of theirs that survived; documents with none disappear.
    document_of_sentence = np.repeat(np.arange(len(documents)), per_document)
    kept_per_document = np.bincount(document_of_sentence[keep], minlength=len(documents))
    kept_per_document = kept_per_document[kept_per_document > 0]
    return TokenizedBatch(
        tokens=tokens,
        sentence_offsets=np.concatenate(([0], np.cumsum(lengths[keep]))).astype(np.int64),
        document_offsets=np.concatenate(([0], np.cumsum(kept_per_document))).astype(np.int64),
    )
