"""The model layer: one :class:`KTokenMerging` owns tokenizer, LoRA-adapted LLM and merge encoder.

``blocks`` (block / padding / mask arithmetic), ``encoder`` (the merge encoder), ``segments``
(merge / keep spans), ``methods`` (the baselines' token selection) and ``compiled`` (static-shape
decoding) are its pieces; ``core`` is the model itself.
"""

from .core import CheckpointError, KTokenMerging, LossOutput, check_sampling, load_teacher

__all__ = ["KTokenMerging", "LossOutput", "CheckpointError", "check_sampling", "load_teacher"]
