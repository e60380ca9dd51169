"""ktm: K-Token Merging, latent-space prompt compression for Hugging Face causal LMs.

A small encoder merges every block of K prompt-token embeddings into one; a LoRA-adapted
causal LM reads the K-times shorter prefix and answers in its normal vocabulary.
"""

__version__ = "0.1.0"

from .model.encoder import MergeEncoder  # noqa: E402
from .model import CheckpointError, KTokenMerging  # noqa: E402

__all__ = ["MergeEncoder", "KTokenMerging", "CheckpointError", "__version__"]
