import argparse

import pytest

from ktm.config import ModelConfig, TrainConfig, from_dict, to_dict
from ktm.arguments import add_arguments, overrides
from ktm.train.recipes import DEFAULT_RECIPE, RECIPES, get_recipe


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_builds_valid_configs(name):
    r = get_recipe(name)
    assert isinstance(r.model_config(k=4), ModelConfig)
    assert isinstance(r.train_config(), TrainConfig)
    assert r.description


def test_paper_recipe_is_the_release():
    m, t = get_recipe("paper").model_config(), get_recipe("paper").train_config()
    assert (m.lora_r, m.lora_alpha, m.lora_dropout, m.encoder_init) == (4, 16, 0.05, "paper")
    assert m.lora_targets == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert t.lr == 1e-4 and t.warmup_steps == 0


def test_explicit_options_override_the_recipe():
    r = get_recipe(None)
    assert r.name == DEFAULT_RECIPE
    assert r.train_config(lr=5e-5).lr == 5e-5
    assert r.model_config(k=2, lora_r=32).lora_r == 32


def test_unknown_recipe():
    with pytest.raises(ValueError, match="unknown recipe"):
        get_recipe("magic")


def test_cli_bridge_uses_the_field_names():
    p = argparse.ArgumentParser()
    add_arguments(p, ModelConfig)
    add_arguments(p, TrainConfig)
    args = p.parse_args(["--k", "8", "--lora-targets", "q_proj", "v_proj", "--no-balance", "--lr", "3e-4"])
    assert overrides(args, ModelConfig) == {"k": 8, "lora_targets": ["q_proj", "v_proj"]}
    assert overrides(args, TrainConfig) == {"lr": 3e-4, "balance": False}


def test_train_help_shows_the_default_recipes_values(capsys):
    from ktm.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    fast = get_recipe(DEFAULT_RECIPE)
    assert f"defaults shown: recipe '{DEFAULT_RECIPE}'" in text
    assert f"AdamW learning rate for LoRA (default: {fast.train_config().lr})" in text
    assert f"linear warm-up steps (default: {fast.train_config().warmup_steps})" in text
    assert "(default: None)" not in text


def test_config_round_trips_through_json_dicts():
    cfg = ModelConfig(k=3, lora_r=2)
    assert from_dict(ModelConfig, to_dict(cfg)) == cfg
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        from_dict(ModelConfig, {"k": 2, "colour": "red"})
    with pytest.raises(ValueError, match="K must be >= 1"):
        ModelConfig(k=0)


def test_dense_recipe_turns_on_the_auxiliary_losses_and_fast_stays_plain():
    m, t = get_recipe("dense").model_config(), get_recipe("dense").train_config()
    assert m.encoder_norm and t.distill == 0.5 and t.reconstruct == 0.5 and t.reconstruct_rows == 4
    f = get_recipe("fast").train_config()
    assert (f.distill, f.reconstruct, f.align, f.teacher) == (0.0, 0.0, 0.0, None)
    assert not get_recipe("fast").model_config().encoder_norm


def test_teacher_recipe_trains_its_own_k1_teacher_and_aligns():
    r = get_recipe("teacher")
    m, t = r.model_config(k=2), r.train_config()
    assert m.encoder_norm and m.encoder_init == "mean" and m.lora_r == 8
    assert (t.teacher, t.teacher_steps, t.align, t.distill, t.reconstruct) == ("auto", 250, 1.0, 0.5, 0.0)
    assert t.lr == get_recipe("fast").train_config().lr


def test_encoder_stages_must_multiply_to_k():
    assert ModelConfig(k=4, encoder_stages=[2, 2]).encoder_stages == (2, 2)
    assert from_dict(ModelConfig, to_dict(ModelConfig(k=8, encoder_stages=(2, 4)))).encoder_stages == (2, 4)
    with pytest.raises(ValueError, match=r"multiply to 4, not K = 8"):
        ModelConfig(k=8, encoder_stages=(2, 2))
    with pytest.raises(ValueError, match="block sizes >= 1"):
        ModelConfig(k=4, encoder_stages=(4, 1, 0))


def test_hierarchical_recipe_and_default_stages():
    from ktm.train.phases import with_default_stages

    t = get_recipe("hierarchical").train_config()
    assert (t.teacher, t.grow_from, t.align) == ("auto", "auto", 1.0)
    assert with_default_stages(ModelConfig(k=4)).encoder_stages == (2, 2)
    assert with_default_stages(ModelConfig(k=8)).encoder_stages == (2, 2, 2)
    assert with_default_stages(ModelConfig(k=6, encoder_stages=(3, 2))).encoder_stages == (3, 2)
    with pytest.raises(ValueError, match="give --encoder-stages for K = 6"):
        with_default_stages(ModelConfig(k=6))
    with pytest.raises(ValueError, match="at least two encoder stages"):
        with_default_stages(ModelConfig(k=4, encoder_stages=(4,)))
