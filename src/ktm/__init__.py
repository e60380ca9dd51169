"""ktm: K-Token Merging, latent-space prompt compression for Hugging Face causal LMs.

A small encoder merges every block of K prompt-token embeddings into one; a LoRA-adapted
causal LM reads the K-times shorter prefix and answers in its normal vocabulary.

The package is one folder per layer (``cli`` -> ``experiments`` -> ``train`` / ``serve`` ->
``tasks`` / ``model`` -> ``config``, ``arguments``, ``checkpoint``, ``loading``); the names
below are its public surface.
"""

__version__ = "0.1.0"

from .checkpoint import CheckpointError  # noqa: E402
from .config import LossWeights, ModelConfig, Runtime, TrainConfig  # noqa: E402
from .model import KTokenMerging, PromptError, PromptTooLong  # noqa: E402
from .model.encoder import MergeEncoder  # noqa: E402
from .serve.serving import PromptEncoder  # noqa: E402
from .tasks import TASKS, TreeTask  # noqa: E402
from .train.evaluate import evaluate  # noqa: E402
from .train.phases import train_run  # noqa: E402
from .train.recipes import get_recipe  # noqa: E402

__all__ = ["KTokenMerging", "MergeEncoder", "CheckpointError", "PromptError", "PromptTooLong", "ModelConfig",
           "TrainConfig", "LossWeights", "Runtime", "train_run", "get_recipe", "evaluate", "TASKS", "TreeTask", "PromptEncoder",
           "__version__"]
