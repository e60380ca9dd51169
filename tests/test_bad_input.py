"""Bad input that used to end in a traceback or an unlocated error (issue 28 item 9): bytes
that are not UTF-8 in a prompt, JSON nested thousands deep or with a 5,000-digit number, a
checkpoint's state or config with a missing or null entry, an export's string format version,
and non-finite numbers in the options."""

import io
import json
import sys

import pytest

from conftest import save_tiny_base, write_seq_task
from ktm.checkpoint import CheckpointError
from ktm.cli import main
from ktm.config import ModelConfig, TrainConfig
from ktm.tasks import JsonlTask
from ktm.tasks.base import read_jsonl


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(base folder, data folder, run folder) of a 2-step K = 2 run."""
    from ktm.train.phases import train_run

    root = tmp_path_factory.mktemp("run")
    base = save_tiny_base(root / "base", max_positions=128)
    write_seq_task(root / "data")
    train_run(ModelConfig(k=2, lora_r=2), TrainConfig(steps=2, batch_size=2, eval_examples=4, eval_every=0),
              JsonlTask(root / "data"), root / "run", base=base, device="cpu", log=lambda line: None)
    return str(base), root / "data", root / "run"


class _Stdin:
    def __init__(self, data: bytes):
        self.buffer = io.BytesIO(data)


def test_bytes_that_are_not_utf8_in_a_prompt_are_named(trained, monkeypatch, capsys):
    base, _, run = trained
    common = ["generate", "--checkpoint", str(run / "model"), "--model", base, "--device", "cpu"]
    # a shell argument's undecodable bytes reach Python as lone surrogates (os.fsdecode)
    assert main([*common, "fine", "bad \udcff byte"]) == 2
    assert "ktm: error: prompt argument 2: not UTF-8 text (character 4)" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", _Stdin(b"first line\nsecond \xff line\n"))
    assert main([*common, "--batch-size", "1"]) == 2
    captured = capsys.readouterr()
    assert "ktm: error: input line 2: not UTF-8 text (byte 7: b'\\xff')" in captured.err
    assert len(captured.out.splitlines()) == 1  # the line before it was answered (batches of 1)


@pytest.mark.parametrize("line,message", [
    ('{"prompt": "a", "answer": "b", "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
     r"x.jsonl:2: the JSON is nested too deeply to read"),
    ('{"prompt": "a", "answer": "b", "n": ' + "7" * 5000 + "}",
     r"x.jsonl:2: not usable JSON \(Exceeds the limit \(4300 digits\)"),
])
def test_json_too_deep_or_with_a_huge_number_is_located(tmp_path, line, message):
    (tmp_path / "x.jsonl").write_text('{"prompt": "a", "answer": "b"}\n' + line + "\n")
    with pytest.raises(ValueError, match=message):
        read_jsonl(tmp_path / "x.jsonl")


def test_a_state_without_step_or_a_config_with_null_files_is_a_checkpoint_error(trained, tmp_path):
    import shutil

    from ktm import KTokenMerging
    from ktm.train.phases import train_run

    base, data, run = trained
    out = shutil.copytree(run, tmp_path / "run")
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    del state["step"]
    (out / "checkpoint" / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=r"checkpoint .*checkpoint is unreadable \(trainer_state.json has "
                                              r"no integer 'step', 'history' and 'param_groups' "
                                              r"\(missing: \['step'\]\)\); move it away to start over"):
        train_run(ModelConfig(k=2, lora_r=2), TrainConfig(steps=3, batch_size=2, eval_examples=4, eval_every=0),
                  JsonlTask(data), out, base=base, device="cpu", resume=True, log=lambda line: None)
    config = json.loads((out / "model" / "ktm_config.json").read_text())
    (out / "model" / "ktm_config.json").write_text(json.dumps({**config, "files": None}))
    with pytest.raises(CheckpointError, match=r"ktm_config.json is corrupt or not a ktm config \('files' must be "
                                              r"a JSON object of file: SHA-256, got null\)"):
        KTokenMerging.from_pretrained(out / "model", base=base, device="cpu")


def test_an_export_with_a_string_format_version_is_refused(trained, tmp_path):
    from ktm.serve.export import ExportError, export_model, read_export

    base, _, run = trained
    export_model(run / "model", tmp_path / "exp", base=base)
    meta = json.loads((tmp_path / "exp" / "ktm_serving.json").read_text())
    (tmp_path / "exp" / "ktm_serving.json").write_text(json.dumps({**meta, "format_version": "1"}))
    with pytest.raises(ExportError, match=r"ktm_serving.json is corrupt: format_version must be an integer, "
                                          r'got "1"'):
        read_export(tmp_path / "exp")


@pytest.mark.parametrize("flag,value", [("--lr", "nan"), ("--weight-decay", "inf"), ("--encoder-lr", "-inf")])
def test_non_finite_numbers_are_refused_before_training(trained, tmp_path, capsys, flag, value):
    base, data, _ = trained
    assert main(["train", "--task", "jsonl", "--data", str(data), "--model", base, "--device", "cpu",
                 "--steps", "1", "--batch-size", "2", "--out", str(tmp_path / "r"), f"{flag}={value}"]) == 2
    name = flag[2:].replace("-", "_")
    assert f"ktm: error: TrainConfig.{name} must be a finite number, got {value} (float)" in capsys.readouterr().err
    assert not (tmp_path / "r" / "checkpoint").exists()
    with pytest.raises(ValueError, match="must be a finite number"):
        ModelConfig(lora_alpha=float("nan"))


@pytest.mark.parametrize("dataset,row", [
    ("amazon", {"prompt": "Review: good, Label:", "answer": "positive", "rating": 5.0}),
    ("commits", {"prompt": "x", "answer": "y", "old_contents": "a", "new_contents": "b", "subject": "s"}),
])
def test_ktm_data_refuses_an_out_that_is_its_source(tmp_path, capsys, dataset, row):
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for _ in range(6)))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for source in (tmp_path, tmp_path / "train.jsonl"):
        assert main(["data", dataset, "--source", str(source), "--out", str(tmp_path)]) == 2
        assert (f"ktm: error: --out {tmp_path} would overwrite the source data it is made from ("
                f"{tmp_path / 'train.jsonl'} is read from --source {source}): choose another --out"
                in capsys.readouterr().err)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
