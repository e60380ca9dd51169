"""The model layer: one :class:`KTokenMerging` owns tokenizer, LoRA-adapted LLM and merge encoder.

``core`` is the model (build, the LLM's pieces, forward, ``with_k``); ``prompts`` tokenises and
merges prompts (:class:`PromptMerger`, also what the client-side encoder of ``ktm.serve`` runs);
``generation`` is the decoding loop and sampling; ``io`` saves and loads its folders. Its pieces:
``blocks`` (block / padding / mask arithmetic), ``encoder`` (the merge encoder), ``segments``
(merge / keep spans), ``methods`` (the baselines' token selection), ``compiled`` (static shapes).
"""

from ..checkpoint import CheckpointError
from ..checkpoint import read_config as read_checkpoint_config  # the name before ktm.checkpoint existed
from .core import KTokenMerging, LossOutput
from .generation import check_sampling
from .io import load_teacher
from .prompts import EmptyPrompt, PromptError, PromptMerger, PromptTooLong

__all__ = ["KTokenMerging", "LossOutput", "CheckpointError", "PromptMerger", "PromptError", "PromptTooLong",
           "EmptyPrompt", "check_sampling", "load_teacher", "read_checkpoint_config"]
