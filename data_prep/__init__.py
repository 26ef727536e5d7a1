"""pld-prep: BERT pretraining shards (NVIDIA's HDF5 format) from raw text corpora.

Run ``pld-prep --help`` (or ``python -m data_prep --help``) for usage.
"""

__version__ = "0.1.0"
