"""ktm.checkpoint: one compatibility check, atomic folders, adapters loaded exactly or not at all."""

import json

import pytest
from safetensors.torch import load_file, save_file

from ktm.checkpoint import ADAPTER_DIR, ADAPTER_FILE, CheckpointError, check_compatible, read_config, write_dir
from ktm.config import TrainConfig
from ktm.train.trainer import Trainer


@pytest.mark.parametrize("field,options", [
    ("lora_alpha", {"lora_alpha": 32.0}),
    ("encoder_norm", {"encoder_norm": True}),
    ("encoder_layernorm", {"encoder_layernorm": True}),
    ("encoder_init", {"init": "paper"}),
    ("lora_r", {"lora_r": 8}),
])
def test_a_field_that_changes_the_function_is_refused(make_model, tmp_path, field, options):
    make_model(k=2).save_pretrained(tmp_path / "ck")
    other = make_model(k=2, **options)
    with pytest.raises(CheckpointError, match=f"saved with {field} = .*this model has {field} = "):
        other.load_trained(tmp_path / "ck")


def test_dropout_does_not_change_the_function(make_model, tmp_path):
    make_model(k=2).save_pretrained(tmp_path / "ck")
    make_model(k=2, lora_dropout=0.3).load_trained(tmp_path / "ck")  # no error


def test_an_adapter_only_load_compares_the_adapter_alone(make_model, tmp_path):
    make_model(k=1).save_pretrained(tmp_path / "k1")
    make_model(k=4, encoder_norm=True).load_trained(tmp_path / "k1", adapter_only=True)  # other K and encoder
    with pytest.raises(CheckpointError, match="lora_alpha"):
        make_model(k=4, lora_alpha=2.0).load_trained(tmp_path / "k1", adapter_only=True)


def _forget_hashes(folder):
    """A folder saved before weight hashes were recorded: only the tensor names can tell."""
    cfg = folder / "ktm_config.json"
    meta = json.loads(cfg.read_text())
    meta.pop("files")
    cfg.write_text(json.dumps(meta))


@pytest.mark.parametrize("drop", ["some", "all"])
def test_an_adapter_missing_tensors_is_refused(make_model, tmp_path, drop):
    make_model(k=2).save_pretrained(tmp_path / "ck")
    _forget_hashes(tmp_path / "ck")
    file = tmp_path / "ck" / ADAPTER_DIR / ADAPTER_FILE
    tensors = load_file(str(file))
    kept = dict(list(tensors.items())[: len(tensors) // 2]) if drop == "some" else {}
    save_file(kept, str(file))
    with pytest.raises(CheckpointError, match="does not hold this model's LoRA weights: [1-9][0-9]* missing"):
        make_model(k=2).load_trained(tmp_path / "ck")


def test_an_adapter_with_foreign_tensors_is_refused(make_model, tmp_path):
    import torch

    make_model(k=2).save_pretrained(tmp_path / "ck")
    _forget_hashes(tmp_path / "ck")
    file = tmp_path / "ck" / ADAPTER_DIR / ADAPTER_FILE
    save_file({**load_file(str(file)), "base_model.model.extra.lora_A.weight": torch.zeros(2, 2)}, str(file))
    with pytest.raises(CheckpointError, match="0 missing .* 1 unexpected"):
        make_model(k=2).load_trained(tmp_path / "ck")


def test_resume_refuses_flags_that_change_the_function(make_model, tmp_path):
    from toy_tasks import LastChar

    cfg = TrainConfig(steps=2, batch_size=2, eval_examples=4)
    Trainer(make_model(k=2), cfg, output_dir=tmp_path, progress=False, log=lambda line: None).fit(LastChar())
    changed = Trainer(make_model(k=2, lora_alpha=64.0), cfg, output_dir=tmp_path, progress=False)
    with pytest.raises(CheckpointError, match="lora_alpha"):
        changed.resume()


def test_check_compatible_names_the_difference(make_model, tmp_path):
    m = make_model(k=2)
    m.save_pretrained(tmp_path / "ck")
    meta = read_config(tmp_path / "ck")
    check_compatible(meta, "ck", fingerprint=m.base_fingerprint, config=m.config, k=2)
    with pytest.raises(CheckpointError, match="K = 2, not K = 3"):
        check_compatible(meta, "ck", k=3)
    with pytest.raises(CheckpointError, match="another base model"):
        check_compatible(meta, "ck", fingerprint="0" * 32)
    # an older folder without a field counts as having its default
    meta["model"].pop("lora_lm_head")
    check_compatible(meta, "ck", config=m.config)


def test_write_dir_is_all_or_nothing(tmp_path):
    write_dir(tmp_path / "d", lambda tmp: (tmp / "a.json").write_text(json.dumps(1)))

    def broken(tmp):
        (tmp / "b.json").write_text("2")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_dir(tmp_path / "d", broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temporary folder left
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["a.json"]  # the old folder intact


@pytest.mark.parametrize("name", ["encoder.safetensors", "adapter/adapter_model.safetensors"])
def test_a_flipped_byte_in_the_weights_is_caught_by_its_hash(make_model, tmp_path, name):
    m = make_model(k=2)
    m.save_pretrained(tmp_path / "ck")
    assert set(read_config(tmp_path / "ck")["files"]) == {"encoder.safetensors", "adapter/adapter_model.safetensors"}
    file = tmp_path / "ck" / name
    data = bytearray(file.read_bytes())
    data[-3] ^= 0x01  # inside the tensor data: safetensors' header check cannot see it
    file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256 differs"):
        make_model(k=2).load_trained(tmp_path / "ck")
