"""Every field of ModelConfig and TrainConfig is type-checked on construction and on load."""

import json
import typing

import pytest

from ktm.config import ModelConfig, TrainConfig, from_dict, to_dict


@pytest.mark.parametrize("cls,field,value,message", [
    (ModelConfig, "encoder_norm", "false", "ModelConfig.encoder_norm must be a bool, got 'false' (str)"),
    (ModelConfig, "encoder_norm", 0, "ModelConfig.encoder_norm must be a bool, got 0 (int)"),
    (ModelConfig, "lora_lm_head", None, "ModelConfig.lora_lm_head must be a bool, got None (NoneType)"),
    (ModelConfig, "k", True, "ModelConfig.k must be an int, got True (bool)"),
    (ModelConfig, "k", 4.0, "ModelConfig.k must be an int, got 4.0 (float)"),
    (ModelConfig, "k", "4", "ModelConfig.k must be an int, got '4' (str)"),
    (ModelConfig, "lora_alpha", True, "ModelConfig.lora_alpha must be a number (int or float), got True (bool)"),
    (ModelConfig, "lora_dropout", "0.1", "ModelConfig.lora_dropout must be a number (int or float), got '0.1' (str)"),
    (ModelConfig, "encoder_hidden", "64", "ModelConfig.encoder_hidden must be an int or None, got '64' (str)"),
    (ModelConfig, "encoder_stages", "22", "ModelConfig.encoder_stages must be a list or tuple of ints or None, "
                                          "got '22' (str)"),
    (ModelConfig, "encoder_stages", [2, "2"], "ModelConfig.encoder_stages[1] must be an int, got '2' (str)"),
    (ModelConfig, "lora_targets", "q_proj", "ModelConfig.lora_targets must be a list or tuple of strings, "
                                            "got 'q_proj' (str)"),
    (ModelConfig, "lora_targets", ["q_proj", 3], "ModelConfig.lora_targets[1] must be a str, got 3 (int)"),
    (TrainConfig, "balance", "true", "TrainConfig.balance must be a bool, got 'true' (str)"),
    (TrainConfig, "steps", 10.0, "TrainConfig.steps must be an int, got 10.0 (float)"),
    (TrainConfig, "lr", "1e-3", "TrainConfig.lr must be a number (int or float), got '1e-3' (str)"),
    (TrainConfig, "max_grad_norm", False, "TrainConfig.max_grad_norm must be a number (int or float) or None, "
                                          "got False (bool)"),
    (TrainConfig, "teacher", 1, "TrainConfig.teacher must be a str or None, got 1 (int)"),
    (TrainConfig, "grow_steps", 2.5, "TrainConfig.grow_steps must be an int or None, got 2.5 (float)"),
])
def test_a_wrong_type_is_a_type_error_naming_the_field(cls, field, value, message):
    with pytest.raises(TypeError) as e:
        cls(**{field: value})
    assert str(e.value) == message
    with pytest.raises(TypeError, match="must be"):  # on load, too
        from_dict(cls, {**to_dict(cls()), field: value})


@pytest.mark.parametrize("cls,field,value,message", [
    (ModelConfig, "encoder_init", "avg", "ModelConfig.encoder_init must be one of 'mean', 'paper', 'random', "
                                         "got 'avg' (str)"),
    (ModelConfig, "encoder_init", None, "ModelConfig.encoder_init must be one of 'mean', 'paper', 'random', "
                                        "got None (NoneType)"),
    (TrainConfig, "decay", "linear", "TrainConfig.decay must be one of 'constant', 'cosine', got 'linear' (str)"),
    (TrainConfig, "align_mode", ["cosine"], "TrainConfig.align_mode must be one of 'cosine', 'standardized', "
                                            "got ['cosine'] (list)"),
])
def test_a_literal_takes_only_its_values(cls, field, value, message):
    with pytest.raises(ValueError) as e:
        cls(**{field: value})
    assert str(e.value) == message


def test_right_types_pass_and_lists_become_tuples():
    import numpy as np

    m = ModelConfig(k=4, encoder_stages=[2, 2], lora_targets=["q_proj", "v_proj"], lora_alpha=16,
                    encoder_hidden=np.int64(8), encoder_norm=True)
    assert m.encoder_stages == (2, 2) and m.lora_targets == ("q_proj", "v_proj")
    assert m.lora_alpha == 16 and type(m.encoder_hidden) is int  # ints are numbers; numpy ints become int
    t = TrainConfig(lr=1, encoder_lr=2e-3, max_grad_norm=None, teacher="auto", phase_threshold=1)
    assert (t.lr, t.max_grad_norm, t.phase_threshold) == (1, None, 1)
    assert from_dict(ModelConfig, json.loads(json.dumps(to_dict(m)))) == m
    assert from_dict(TrainConfig, json.loads(json.dumps(to_dict(t)))) == t


def test_every_field_is_checked():
    """A field whose annotation the checker does not know fails loudly, not silently."""
    import dataclasses

    for cls in (ModelConfig, TrainConfig):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            wrong = object()
            with pytest.raises((TypeError, ValueError), match=rf"{cls.__name__}\.{f.name} must be"):
                cls(**{f.name: wrong})
            assert hints[f.name] is not None


def test_from_dict_rejects_a_non_object():
    with pytest.raises(TypeError, match="ModelConfig settings must be a JSON object"):
        from_dict(ModelConfig, ["k", 4])


def test_cli_lists_still_work():
    """argparse's nargs='+' gives lists for the tuple fields."""
    from ktm.cli import build_parser
    from ktm.arguments import overrides
    from ktm.train.recipes import get_recipe

    args = build_parser().parse_args(["train", "--out", "x", "--k", "4", "--encoder-stages", "2", "2",
                                      "--lora-targets", "q_proj", "v_proj", "--no-encoder-norm"])
    cfg = get_recipe("fast").model_config(**overrides(args, ModelConfig))
    assert cfg.encoder_stages == (2, 2) and cfg.lora_targets == ("q_proj", "v_proj") and cfg.encoder_norm is False


@pytest.mark.parametrize("field,value", [("encoder_norm", "false"), ("k", "4"), ("lora_targets", "q_proj"),
                                         ("encoder_init", "avg")])
def test_a_checkpoint_with_a_wrong_type_is_a_checkpoint_error(make_model, tmp_path, field, value):
    from ktm import KTokenMerging
    from ktm.checkpoint import CheckpointError

    make_model(k=4).save_pretrained(tmp_path / "ck")
    cfg = tmp_path / "ck" / "ktm_config.json"
    meta = json.loads(cfg.read_text())
    meta["model"][field] = value
    cfg.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as e:
        KTokenMerging.from_pretrained(tmp_path / "ck")
    assert str(e.value).startswith(f"{cfg} holds invalid model settings: ModelConfig.{field}")
    assert repr(value) in str(e.value)


def test_the_cli_reports_a_checkpoint_with_a_wrong_type_in_one_line(make_model, tmp_path, capsys):
    from ktm.cli import main

    make_model(k=4).save_pretrained(tmp_path / "ck")
    cfg = tmp_path / "ck" / "ktm_config.json"
    meta = json.loads(cfg.read_text())
    meta["model"]["encoder_norm"] = "false"
    cfg.write_text(json.dumps(meta))
    assert main(["generate", "--checkpoint", str(tmp_path / "ck"), "abc"]) == 2
    err = capsys.readouterr().err
    assert "ktm: error:" in err and "ModelConfig.encoder_norm must be a bool, got 'false' (str)" in err
