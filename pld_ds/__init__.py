"""pld_ds: PreLN BERT pretraining with Progressive Layer Dropping on DeepSpeed."""

__version__ = "0.1.0"
