"""ktm.train.phases.train_run: one training run from Python, chains included, resumable."""

import pytest
import torch
from safetensors.torch import load_file

from ktm.config import ModelConfig, TrainConfig
from ktm.train.phases import train_run
from ktm.tasks import TreeTask




TASK = TreeTask("small", num_trees=40, seed=0)


def _configs(**train):
    model = ModelConfig(k=2, lora_r=4, lora_dropout=0.1)  # dropout: the RNG state must resume too
    cfg = dict(steps=4, batch_size=4, eval_examples=4, eval_every=2, save_every=1, lr=1e-3,
               teacher="auto", teacher_steps=3, align=1.0, distill=0.5)
    return model, TrainConfig(**{**cfg, **train})


def _weights(folder):
    return {**load_file(str(folder / "encoder.safetensors")),
            **load_file(str(folder / "adapter" / "adapter_model.safetensors"))}


def test_teacher_auto_works_from_python(tmp_path, base_dir):
    run = train_run(*_configs(), TASK, tmp_path / "run", base=base_dir, device="cpu", log=lambda line: None)
    assert run.trainer.teacher is not None and run.model.k == 2
    assert (tmp_path / "run" / "teacher" / "model" / "ktm_config.json").is_file()
    assert run.path == tmp_path / "run" / "model" and run.trainer.history[-1]["step"] == 4
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        train_run(*_configs(), TASK, tmp_path / "run", base=base_dir, device="cpu", log=lambda line: None)


class Stop(Exception):
    pass


def test_a_resumed_chain_equals_an_uninterrupted_one(tmp_path, base_dir):
    whole = train_run(*_configs(), TASK, tmp_path / "whole", base=base_dir, device="cpu", log=lambda line: None)
    seen = []

    def stop_in_the_main_phase(line):  # the teacher logs "teacher: ..." when it is done
        seen.append(line)
        if any(s.startswith("teacher: held-out") for s in seen) and line.startswith("step 2:"):
            raise Stop

    with pytest.raises(Stop):
        train_run(*_configs(), TASK, tmp_path / "cut", base=base_dir, device="cpu", log=stop_in_the_main_phase)
    assert not (tmp_path / "cut" / "model").exists() and (tmp_path / "cut" / "checkpoint").is_dir()
    lines = []
    resumed = train_run(*_configs(), TASK, tmp_path / "cut", base=base_dir, device="cpu", resume=True,
                        log=lines.append)
    assert any("teacher: reusing" in s for s in lines) and any("resumed from" in s for s in lines)
    a, b = _weights(whole.path), _weights(resumed.path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["value"] for r in resumed.trainer.history] == [r["value"] for r in whole.trainer.history]


def test_trust_remote_code_reaches_the_teacher_and_the_growth_phase(tmp_path, base_dir, monkeypatch):
    """A Runtime's trust_remote_code goes to every model the run loads: the K = 1 teacher it
    trains and loads, the smaller model it grows from, and the main model."""
    import ktm.model.core
    import ktm.model.io
    from ktm.config import Runtime

    calls = []
    for module in (ktm.model.core, ktm.model.io):
        def spy(*args, _real=module.load_base, _where=module.__name__, **kw):
            calls.append((_where, kw.get("trust_remote_code")))
            return _real(*args, **kw)

        monkeypatch.setattr(module, "load_base", spy)
    model, train = _configs(steps=2, teacher_steps=1, grow_from="auto", grow_steps=1, eval_every=0)
    run = train_run(ModelConfig(k=4, lora_r=4), train, TASK, tmp_path / "run",
                    runtime=Runtime(base=base_dir, device="cpu", trust_remote_code=True), log=lambda line: None)
    assert (tmp_path / "run" / "teacher" / "model").is_dir() and (tmp_path / "run" / "grow-k2" / "model").is_dir()
    # built: teacher, smaller K = 2, main K = 4; loaded: the teacher for the growth phase and for the main run
    assert sorted(calls) == [("ktm.model.core", True)] * 3 + [("ktm.model.io", True)] * 2
    assert run.trainer.teacher is not None and run.model.k == 4


def test_train_run_refuses_options_that_init_from_would_ignore(tmp_path, base_dir):
    """The check ktm train makes is train_run's own: from Python too, explicit model options
    that differ from the saved model's settings are refused before anything trains."""
    from ktm.model import KTokenMerging

    KTokenMerging.from_base(base_dir, k=2, lora_r=4, device="cpu").save_pretrained(tmp_path / "saved")
    with pytest.raises(ValueError, match="would be ignored: lora_r = 8"):
        train_run(ModelConfig(k=2, lora_r=8), TrainConfig(steps=1), TASK, tmp_path / "run", base=base_dir,
                  device="cpu", init_from=tmp_path / "saved", given={"lora_r": 8}, log=lambda line: None)
    assert not (tmp_path / "run" / "checkpoint").exists()
