"""GLUE fine-tuning of pld_ds checkpoints and exported Hugging Face models (pld-finetune)."""

from pld_ds.finetune.glue import TASKS, Example, Task, get_task, read_split, task_metrics

__all__ = ["TASKS", "Example", "Task", "get_task", "read_split", "task_metrics"]
