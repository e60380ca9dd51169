"""The trainer: schedule and data order arithmetic, resume == uninterrupted, learning."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ktm.config import TrainConfig
from ktm.train.evaluate import evaluate
from ktm.model import CheckpointError
from ktm.tasks.base import Example
from ktm.train.batches import batch_indices, group_lr_factors, lr_factor
from ktm.train.state import compute_of
from ktm.train.trainer import Trainer
from toy_tasks import LastChar


def test_lr_schedule():
    cfg = TrainConfig(steps=100, warmup_steps=10, decay="cosine")
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(100, cfg) == pytest.approx(0.1)
    assert lr_factor(55, TrainConfig(steps=100)) == 1.0


@settings(max_examples=60, deadline=None)
@given(steps=st.integers(2, 400), cooldown=st.integers(1, 400), warmup=st.integers(0, 30),
       decay=st.sampled_from(["constant", "cosine"]), restart=st.one_of(st.none(), st.integers(0, 399)))
def test_cooldown_anneals_the_last_steps_to_zero(steps, cooldown, warmup, decay, restart):
    """``cooldown=N`` multiplies the schedule by a line that is 1 before the last N steps and falls
    by the same amount each step towards 0 at ``steps`` (never negative, never above the schedule)."""
    cooldown = min(cooldown, steps)
    base = TrainConfig(steps=steps, warmup_steps=warmup, decay=decay)
    cooled = TrainConfig(steps=steps, warmup_steps=warmup, decay=decay, cooldown=cooldown)
    restart = None if restart is None else min(restart, steps - 1)
    for s in range(steps):
        plain, annealed = lr_factor(s, base, restart=restart), lr_factor(s, cooled, restart=restart)
        left = steps - s
        expected = 1.0 if left > cooldown else left / (cooldown + 1)
        assert annealed == pytest.approx(plain * expected)
    assert lr_factor(steps, cooled) == 0.0  # a step past the end (a longer continuation) does not train
    assert lr_factor(steps - 1, cooled) == pytest.approx(lr_factor(steps - 1, base) / (cooldown + 1))


def test_cosine_restarts_each_curriculum_round(make_model):
    """The cosine horizon is a round, not the whole run: a later stage starts at the full
    rate instead of training at the floor (the bug: it spanned cfg.steps only)."""
    from ktm.train.phases import train_curriculum

    cfg = TrainConfig(steps=4, batch_size=2, eval_examples=4, eval_every=0, lr=1e-2, warmup_steps=0,
                      decay="cosine")
    trainer = Trainer(make_model(k=2), cfg, progress=False, log=lambda line: None)
    seen, step = [], trainer.optimizer.step

    def record(*a, **kw):
        seen.append(trainer.optimizer.param_groups[0]["lr"] / 1e-2)
        return step(*a, **kw)

    trainer.optimizer.step = record
    train_curriculum(trainer, [(LastChar(), None), (LastChar(), None)], steps_per_round=4)
    cycle = [lr_factor(s, cfg) for s in range(4)]
    assert cycle[0] == 1.0 and cycle[3] < 0.4
    assert seen == pytest.approx(cycle + cycle)


def test_batches_are_a_pure_function_of_seed_and_step():
    ex = [Example(str(i), "true" if i % 4 == 0 else "false") for i in range(100)]
    cfg = TrainConfig(batch_size=8, seed=3)
    assert batch_indices(ex, 5, cfg, None) == batch_indices(ex, 5, cfg, None)
    assert batch_indices(ex, 5, cfg, None) != batch_indices(ex, 6, cfg, None)
    assert len(set(batch_indices(ex, 5, cfg, None))) == 8
    bal = TrainConfig(batch_size=400, seed=0, balance=True)
    picked = [ex[i].answer for i in batch_indices(ex, 0, bal, ["false", "true"])]
    assert 0.4 < picked.count("true") / len(picked) < 0.6  # 25% in the data


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of grad_accum"):
        TrainConfig(batch_size=6, grad_accum=4)
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="decay"):
        TrainConfig(decay="linear")
    with pytest.raises(ValueError, match="grow_steps"):
        TrainConfig(grow_steps=0)


def test_training_learns_a_tiny_task(make_model):
    m = make_model(k=2, lora_r=8)
    before = evaluate(m, LastChar(), progress=False)["value"]
    Trainer(m, TrainConfig(steps=150, batch_size=16, lr=3e-3), progress=False).fit(LastChar())
    after = evaluate(m, LastChar(), progress=False)
    assert after["value"] >= 0.95 > before
    assert after["majority_rate"] < 0.4


def _weights(m):
    return {k: v.clone() for k, v in m.state_dict().items() if "lora_" in k or k.startswith("encoder.")}


def test_resume_equals_uninterrupted(make_model, tmp_path):
    cfg = TrainConfig(steps=6, batch_size=4, grad_accum=2, lr=2e-3, warmup_steps=2, decay="cosine",
                      eval_examples=8)
    straight = make_model(k=3, lora_r=4)
    Trainer(straight, cfg, output_dir=tmp_path / "a", progress=False).fit(LastChar())

    first = make_model(k=3, lora_r=4)
    Trainer(first, cfg, output_dir=tmp_path / "b", progress=False).fit(LastChar(), steps=3)
    assert json.loads((tmp_path / "b" / "checkpoint" / "trainer_state.json").read_text())["step"] == 3
    resumed = make_model(k=3, lora_r=4)  # a fresh process would build the model anew
    t = Trainer(resumed, cfg, output_dir=tmp_path / "b", progress=False)
    assert t.resume() and t.step == 3
    t.fit(LastChar())
    elapsed = [row["elapsed_s"] for row in t.history]
    assert elapsed == sorted(elapsed) and len(elapsed) == 2  # wall time counts on after a resume
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7, msg=k)


def test_merger_warmup_schedule():
    cfg = TrainConfig(steps=20, lr=1e-3, encoder_lr=2e-3, warmup_steps=4, merger_warmup=5, merger_warmup_lr=6e-3)
    f = [group_lr_factors(s, cfg) for s in range(12)]
    assert [x["lora"] for x in f[:5]] == [0.0] * 5  # LoRA frozen during the merger warm-up
    assert [x["encoder"] for x in f[:5]] == pytest.approx([0.75, 1.5, 2.25, 3.0, 3.0])  # 3x its rate, warmed up
    assert [x["lora"] for x in f[5:10]] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])  # then LoRA warms up
    assert all(x["encoder"] == 1.0 for x in f[5:])
    plain = TrainConfig(steps=20, warmup_steps=4)
    assert all(group_lr_factors(s, plain) == {"lora": lr_factor(s, plain)} | {"encoder": lr_factor(s, plain)}
               for s in range(8))
    with pytest.raises(ValueError, match="merger_warmup"):
        TrainConfig(merger_warmup=-1)
    with pytest.raises(ValueError, match="learning rates"):
        TrainConfig(merger_warmup=2, merger_warmup_lr=0.0)


def test_merger_warmup_trains_the_encoder_alone_first(make_model):
    m = make_model(k=2, lora_r=4)
    cfg = TrainConfig(steps=3, batch_size=4, lr=1e-2, merger_warmup=2, eval_examples=4)
    t = Trainer(m, cfg, progress=False, log=lambda line: None)
    start = _weights(m)
    t.fit(LastChar(), steps=2)
    mid = _weights(m)
    lora = [k for k in start if "lora_" in k]
    assert lora and all(torch.equal(start[k], mid[k]) for k in lora)
    assert any(not torch.equal(start[k], mid[k]) for k in start if k.startswith("encoder."))
    t.fit(LastChar())
    assert any(not torch.equal(mid[k], v) for k, v in _weights(m).items() if "lora_" in k)


def test_max_minutes_stops_a_piece_with_a_checkpoint_and_resume_finishes_it(make_model, tmp_path, monkeypatch):
    """A machine lent for N minutes: the run stops at the first step past them, checkpointed and
    evaluated, and a resumed run without the limit trains on to ``steps``."""
    import time

    clock = iter(range(0, 10**6, 10))  # every perf_counter call advances 10 s
    monkeypatch.setattr(time, "perf_counter", lambda: float(next(clock)))
    cfg = TrainConfig(steps=50, batch_size=2, eval_examples=4, save_every=100, max_minutes=1.0)
    lines = []
    t = Trainer(make_model(k=2), cfg, output_dir=tmp_path, progress=False, log=lines.append)
    t.fit(LastChar())
    assert 0 < t.step < 10 and t.history[-1]["step"] == t.step
    assert any(f"stopping at step {t.step}" in line for line in lines)
    again = Trainer(make_model(k=2), TrainConfig(**{**cfg.__dict__, "max_minutes": None}), output_dir=tmp_path,
                    progress=False, log=lambda line: None)
    assert again.resume() and again.step == t.step
    again.fit(LastChar())
    assert again.step == 50
    with pytest.raises(ValueError, match="max_minutes"):
        TrainConfig(max_minutes=0)


def test_compute_counts_each_piece_at_its_own_threads(make_model, tmp_path, monkeypatch):
    """The card's CPU hours: thread-seconds summed over resumed pieces, each at the threads it
    ran with (not the whole run's wall time times the threads of whoever publishes it)."""
    import time

    clock = iter(range(0, 10**6, 10))  # every perf_counter call advances 10 s
    monkeypatch.setattr(time, "perf_counter", lambda: float(next(clock)))
    cfg = TrainConfig(steps=4, batch_size=2, eval_examples=4, eval_every=2, save_every=2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    first = Trainer(make_model(k=2), cfg, output_dir=tmp_path, progress=False, log=lambda line: None)
    first.fit(LastChar(), steps=2)
    one = first.compute.before(first.history)["cpu_thread_s"]
    assert one > 0 and first.compute.before(first.history)["gpu_s"] == 0.0
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    second = Trainer(make_model(k=2), cfg, output_dir=tmp_path, progress=False, log=lambda line: None)
    assert second.resume() and second.compute.before(second.history)["cpu_thread_s"] >= one
    second.fit(LastChar())
    wall = second.history[-1]["elapsed_s"] - first.history[-1]["elapsed_s"]
    assert wall > 0 and second.history[-1]["cpu_thread_s"] == pytest.approx(one + 3 * wall, abs=31)
    state = json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())
    assert state["cpu_thread_s"] >= second.history[-1]["cpu_thread_s"]
    # a checkpoint from before ktm counted compute: its wall time, at one thread
    assert compute_of({"elapsed_s": 7.5}) == {"elapsed_s": 7.5, "cpu_thread_s": 7.5, "gpu_s": 0.0}


def test_resume_rejects_a_checkpoint_for_another_k(make_model, tmp_path):
    cfg = TrainConfig(steps=2, batch_size=2, eval_examples=4)
    Trainer(make_model(k=2), cfg, output_dir=tmp_path, progress=False).fit(LastChar())
    with pytest.raises(CheckpointError, match="K = 2"):
        Trainer(make_model(k=4), cfg, output_dir=tmp_path, progress=False).resume()


def test_history_is_written_at_every_evaluation(make_model, tmp_path):
    """A run stopped between checkpoints still has its curve on disk."""
    seen = []

    def log(line):  # called right after each evaluation
        if line.startswith("step "):
            seen.append([r["step"] for r in json.loads((tmp_path / "history.json").read_text())["history"]])

    cfg = TrainConfig(steps=4, batch_size=2, eval_examples=4, eval_every=2, save_every=0)
    Trainer(make_model(k=2), cfg, output_dir=tmp_path, progress=False, log=log).fit(LastChar())
    assert seen == [[2], [2, 4]]


def test_checkpoint_is_whole_or_absent(make_model, tmp_path):
    cfg = TrainConfig(steps=2, batch_size=2, eval_examples=4, save_every=1)
    Trainer(make_model(k=2), cfg, output_dir=tmp_path, progress=False).fit(LastChar())
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["checkpoint", "history.json"]  # no temporary folders left behind
    ck = sorted(p.name for p in (tmp_path / "checkpoint").iterdir())
    assert ck == ["README.md", "adapter", "encoder.safetensors", "ktm_config.json", "optimizer.safetensors",
                  "tokenizer", "trainer_state.json"]


def test_curriculum_repeats_a_stage_until_its_threshold_and_resumes(make_model, tmp_path):
    from ktm.train.phases import train_curriculum

    cfg = TrainConfig(steps=2, batch_size=4, eval_examples=8, lr=1e-4)
    t = Trainer(make_model(k=2), cfg, output_dir=tmp_path, progress=False, log=lambda s: None)
    # an unreachable threshold: the first stage runs its 2 rounds, the second its 1 round
    train_curriculum(t, [(LastChar(), 1.01), (LastChar(), 0.0)], steps_per_round=2, max_rounds=2)
    assert [h["step"] for h in t.history] == [2, 4, 6]
    assert t.extra_state["curriculum"] == {"stage": 2, "round": 0}
    again = Trainer(make_model(k=2), cfg, output_dir=tmp_path, progress=False, log=lambda s: None)
    assert again.resume() and again.extra_state["curriculum"]["stage"] == 2
    train_curriculum(again, [(LastChar(), 1.01), (LastChar(), 0.0)], steps_per_round=2)
    assert again.step == 6  # nothing left to do


def test_curriculum_finishes_an_interrupted_round(make_model, tmp_path):
    from ktm.train.phases import train_curriculum

    cfg = TrainConfig(steps=4, batch_size=4, eval_examples=8, lr=1e-4)
    t = Trainer(make_model(k=2), cfg, output_dir=tmp_path, progress=False, log=lambda s: None)
    # as if a round of 4 steps had been interrupted after a checkpoint at step 2
    t.extra_state["curriculum"] = {"stage": 0, "round": 0, "end": 4}
    t.fit(LastChar(), steps=2)
    again = Trainer(make_model(k=2), cfg, output_dir=tmp_path, progress=False, log=lambda s: None)
    assert again.resume() and again.step == 2
    train_curriculum(again, [(LastChar(), None)], steps_per_round=4)
    assert again.step == 4  # the round's remaining 2 steps, not a new round of 4
    assert again.extra_state["curriculum"] == {"stage": 1, "round": 0}


def test_curriculum_threshold_needs_an_accuracy_task(make_model):
    from ktm.train.phases import train_curriculum

    class Perplexity(LastChar):
        metric = "perplexity"

    t = Trainer(make_model(k=2), TrainConfig(steps=2), progress=False)
    with pytest.raises(ValueError, match="held-out accuracy"):
        train_curriculum(t, [(Perplexity(), 0.5)], steps_per_round=2)
    assert t.step == 0


def test_auxiliary_losses_train_and_are_logged(make_model):
    teacher = make_model(k=1, seed=1)
    m = make_model(k=2)
    before = [p.detach().clone() for p in m.encoder.parameters()]
    cfg = TrainConfig(steps=3, batch_size=4, lr=1e-3, reconstruct=0.5, reconstruct_rows=2,
                      distill=0.5, align=1.0, eval_examples=8)
    hist = Trainer(m, cfg, progress=False, teacher=teacher).fit(LastChar())
    row = hist[-1]
    for name in ("train_reconstruct_loss", "train_distill_loss", "train_align_loss"):
        assert row[name] > 0
    assert row["train_loss"] > 0 and row["elapsed_s"] >= 0
    assert any(not torch.equal(a, b) for a, b in zip(before, m.encoder.parameters()))


@pytest.mark.parametrize("values, steps, warned", [
    ([0.96], 2, False),              # reached after the first round: no more
    ([0.5, 0.7, 0.97], 6, False),    # reached in round 3
    ([0.5, 0.6, 0.7, 0.99], 6, True),  # never reached within 3 rounds: warns, goes on
])
def test_phase_trains_more_rounds_until_its_threshold(make_model, tmp_path, monkeypatch, values, steps, warned):
    import ktm.train.phases as phases_mod
    import ktm.train.trainer as trainer_mod

    scripted = iter(values)
    monkeypatch.setattr(trainer_mod, "evaluate",
                        lambda model, task, **kw: {"metric": "accuracy", "value": next(scripted), "n": 1})
    lines = []
    cfg = TrainConfig(steps=2, batch_size=4, phase_threshold=0.95, phase_rounds=3)
    _, trainer = phases_mod.train_phase(make_model(k=2), cfg, tmp_path / "phase", [LastChar()], 2,
                                          lines.append, "teacher")
    assert trainer.step == steps
    assert [row["step"] for row in trainer.history] == list(range(2, steps + 1, 2))
    assert any("WARNING" in line for line in lines) == warned
    assert sum("one more round" in line for line in lines) == steps // 2 - 1


def test_phase_threshold_needs_an_accuracy_task(make_model, tmp_path):
    import ktm.train.phases as phases_mod

    class Perplexity(LastChar):
        metric = "perplexity"

    with pytest.raises(ValueError, match="held-out accuracy"):
        phases_mod.train_phase(make_model(k=2), TrainConfig(steps=2, phase_threshold=0.9), tmp_path,
                                 [Perplexity()], 2, print)
    with pytest.raises(ValueError, match="phase_threshold"):
        TrainConfig(phase_threshold=1.5)
    with pytest.raises(ValueError, match="phase_rounds"):
        TrainConfig(phase_rounds=0)


def test_on_evaluate_sees_every_evaluation(make_model):
    rows = []
    cfg = TrainConfig(steps=4, batch_size=2, eval_examples=4, eval_every=2)
    trainer = Trainer(make_model(k=2), cfg, progress=False, log=lambda line: None, on_evaluate=rows.append)
    trainer.fit(LastChar())
    assert [r["step"] for r in rows] == [2, 4] and rows == trainer.history


@pytest.mark.parametrize("setting, autocast", [("no", False), ("bf16", True)])
def test_evaluations_run_in_the_runs_precision(make_model, monkeypatch, setting, autocast):
    """--mixed-precision bf16: the evaluations read the model under the same autocast as the
    training steps (2.8x faster on this CPU's AVX-512 BF16); 'no' leaves them in float32."""
    import ktm.train.trainer as trainer_module

    seen = []
    real = trainer_module.evaluate

    def spy(*args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "evaluate", spy)
    from accelerate.state import AcceleratorState

    cfg = TrainConfig(steps=2, batch_size=2, eval_examples=4, eval_every=1, mixed_precision=setting)
    AcceleratorState._reset_state(True)  # accelerate keeps one precision per process
    try:
        trainer = Trainer(make_model(k=2), cfg, progress=False, log=lambda line: None)
        trainer.fit(LastChar())
    finally:
        AcceleratorState._reset_state(True)
    assert seen == [autocast, autocast] and len(trainer.history) == 2
    assert 0.0 <= trainer.history[-1]["value"] <= 1.0


def test_batches_doctests():
    import doctest

    import ktm.train.batches

    assert doctest.testmod(ktm.train.batches).failed == 0
