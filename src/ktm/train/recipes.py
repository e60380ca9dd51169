"""Named training recipes: documented settings for the model and the optimiser.

A recipe is a pair of overrides, one for :class:`ktm.config.ModelConfig` and one for
:class:`ktm.config.TrainConfig`. Options given explicitly (CLI flags, keyword arguments)
win over the recipe. ``docs/RECIPES.md`` records the measurements behind each.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import ModelConfig, TrainConfig


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    model: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)

    def model_config(self, **overrides) -> ModelConfig:
        return ModelConfig(**{**self.model, **overrides})

    def train_config(self, **overrides) -> TrainConfig:
        return TrainConfig(**{**self.train, **overrides})


#: 'fast' settings, which the later recipes extend
_FAST_MODEL = dict(lora_r=8, lora_alpha=16, lora_dropout=0.05, encoder_init="mean")
_FAST_TRAIN = dict(lr=1e-3, encoder_lr=1e-3, warmup_steps=20, decay="constant")
#: 'teacher' additions: norm matching, alignment and distillation to an automatic K = 1 teacher
_TEACHER_MODEL = dict(_FAST_MODEL, encoder_norm=True)
_TEACHER_TRAIN = dict(_FAST_TRAIN, align=1.0, distill=0.5, teacher="auto", teacher_steps=250)

RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in [
        Recipe(
            "paper",
            "The authors' release: LoRA r 4 / alpha 16 / dropout 0.05, encoder = block mean + "
            "randomly initialised MLP, AdamW lr 1e-4 for everything, no warm-up.",
            model=dict(lora_r=4, lora_alpha=16, lora_dropout=0.05, encoder_init="paper"),
            train=dict(lr=1e-4, warmup_steps=0, decay="constant"),
        ),
        Recipe(
            "fast",
            "ktm's default: exact-mean encoder init, LoRA r 8 / alpha 16, AdamW lr 1e-3 for LoRA "
            "and encoder with 20 warm-up steps (the setting with which K = 1 learns the tree task "
            "in ~200 CPU steps).",
            model=_FAST_MODEL,
            train=_FAST_TRAIN,
        ),
        Recipe(
            "dense",
            "An experiment, not yet better than 'fast' on the tree task (docs/RECIPES.md): 'fast' "
            "plus norm-matched merged embeddings and two label-free auxiliary losses with the base "
            "model as teacher: dense self-distillation at every block end (weight 0.5) and "
            "reconstruction of the prompt from its merged embeddings on 4 rows per batch (weight "
            "0.5). About 3-4x the step time of 'fast' on CPU.",
            model=dict(_FAST_MODEL, encoder_norm=True),
            train=dict(_FAST_TRAIN, distill=0.5, reconstruct=0.5, reconstruct_rows=4),
        ),
        Recipe(
            "teacher",
            "Two phases: `ktm train` first trains a K = 1 model on the same task (250 steps, "
            "'fast' settings) in OUT/teacher, then trains the merged model as 'fast' plus "
            "norm-matched merged embeddings, hidden-state alignment with that teacher at every "
            "block end and layer (weight 1.0) and distillation of its next-token distributions "
            "(weight 0.5). The recipe with which K = 2 learns the tree task on CPU "
            "(docs/RECIPES.md); it needs several hundred steps and about 2.5x the step time of "
            "'fast'.",
            model=_TEACHER_MODEL,
            train=_TEACHER_TRAIN,
        ),
        Recipe(
            "hierarchical",
            "'teacher' plus hierarchical merging: the encoder works in stages of 2 (2 2 for "
            "K = 4) and each K is grown from the one below it, trained first with the same "
            "settings and steps in OUT/grow-k<K'> (K = 4: a K = 1 teacher, then K = 2, then "
            "K = 4). The recipe with which K = 4 learns the tree task on CPU (docs/RECIPES.md); "
            "it costs the teacher's steps plus --steps for every K on the way.",
            model=_TEACHER_MODEL,
            train=dict(_TEACHER_TRAIN, grow_from="auto"),
        ),
    ]
}
DEFAULT_RECIPE = "fast"


def get_recipe(name: str | None) -> Recipe:
    name = name or DEFAULT_RECIPE
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES)}")
    return RECIPES[name]
