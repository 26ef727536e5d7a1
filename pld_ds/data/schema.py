"""The one definition of the pretraining shard format.

Shards are HDF5 files in the schema of NVIDIA's ``create_pretraining_data.py``, so shards written
by either pipeline load in both. Static-masking shards carry every field below; dynamic-masking
shards omit the ``masked_lm_*`` fields and are masked at load time. MLM-only shards (``pld-prep
--no-nsp``, RoBERTa's full sentences) omit ``next_sentence_labels``: a model trained on them has no
NSP head, and a reader that expects NSP labels fails on them instead of training on made-up ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Field:
    name: str
    dtype: np.dtype
    # Shape of one sample: "seq" is the sequence length, "pred" is max_predictions_per_seq.
    dims: tuple[str, ...]


INPUT_IDS = Field("input_ids", np.dtype("int32"), ("seq",))
INPUT_MASK = Field("input_mask", np.dtype("int8"), ("seq",))
SEGMENT_IDS = Field("segment_ids", np.dtype("int8"), ("seq",))
MASKED_LM_POSITIONS = Field("masked_lm_positions", np.dtype("int32"), ("pred",))
MASKED_LM_IDS = Field("masked_lm_ids", np.dtype("int32"), ("pred",))
NEXT_SENTENCE_LABELS = Field("next_sentence_labels", np.dtype("int8"), ())

# Always present.
TOKEN_FIELDS = (INPUT_IDS, INPUT_MASK, SEGMENT_IDS)
# Present unless the shard is MLM-only (no next-sentence pairs).
NSP_FIELDS = (NEXT_SENTENCE_LABELS,)
# Present in every shard NVIDIA's script writes.
BASE_FIELDS = TOKEN_FIELDS + NSP_FIELDS
# Present in statically masked shards (NVIDIA's default); absent in dynamic-masking shards.
MASK_FIELDS = (MASKED_LM_POSITIONS, MASKED_LM_IDS)
ALL_FIELDS = BASE_FIELDS + MASK_FIELDS

# NVIDIA writes every dataset gzip-compressed; readers do not depend on it.
COMPRESSION = "gzip"
# next_sentence_labels: 0 = B follows A in the document, 1 = B is a random sentence.
IS_NEXT, IS_RANDOM_NEXT = 0, 1
# Label value for positions that carry no MLM target (torch's cross-entropy default).
IGNORE_INDEX = -100
# Shard file suffix; a folder of shards is every file with this suffix in it.
SHARD_SUFFIX = ".hdf5"
# Name of the dataset description written beside the shards by data_prep.
MANIFEST_NAME = "manifest.json"


def expected_shape(field: Field, num_samples: int, seq_len: int, max_pred: int) -> tuple[int, ...]:
    sizes = {"seq": seq_len, "pred": max_pred}
    return (num_samples, *(sizes[d] for d in field.dims))


def shard_fields(static_masking: bool, nsp: bool) -> tuple[Field, ...]:
    """The datasets of a shard: masked_lm_* when statically masked, next_sentence_labels unless MLM-only."""
    return TOKEN_FIELDS + (NSP_FIELDS if nsp else ()) + (MASK_FIELDS if static_masking else ())
