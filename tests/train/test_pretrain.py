"""ktm pretrain: plain text cut into prompt + continuation windows (ktm.tasks.text), answer
distillation from the base model (ktm.train.objectives), and the run on the one trainer."""

import itertools
import json
import random
import sys
import types

import pytest
import torch

from ktm.cli import main
from ktm.config import LossWeights, TrainConfig
from ktm.model import KTokenMerging
from ktm.train.objectives import add_auxiliary, answer_teacher_ids
from ktm.train.pretrain import pretrain_configs
from ktm.tasks.text import TextOptions, TextTask, cut_windows

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


WORDS = "the cat sat on a mat and then ran to see the dog who likes fish in the sun".split()


def write_texts(folder, n=60, seed=0, words=14):
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "train.jsonl", "w") as f:
        for i in range(n):
            row = {"text": " ".join(rng.choice(WORDS) for _ in range(words))}
            if i % 5 == 0:  # a commit-like line: the text under another field
                row = {"new_contents": row["text"] + "\n", "subject": "x"}
            f.write(json.dumps(row) + "\n")
    (folder / "dev.jsonl").write_text(json.dumps({"text": "HELD OUT " * 20}) + "\n")
    return folder


# ---------------------------------------------------------------- cutting
@pytest.mark.parametrize("n,p,c,low,cap", itertools.product([1, 5, 9, 10, 23], [1, 3, 4], [1, 2], [1, 2], [0, 2]))
def test_windows_are_contiguous_and_sized(n, p, c, low, cap):
    if low > p:
        return
    offsets = [(i, i + 1) for i in range(n)]  # one character per token
    wins = cut_windows(offsets, TextOptions(prompt_tokens=p, continuation_tokens=c, min_prompt_tokens=low,
                                            windows_per_text=cap))
    end = 0
    for a, b, e in wins:
        assert a == end and a < b < e  # each window starts where the last one ended
        assert e - b == c and (b - a == p or (e == n and low <= b - a < p))
        end = e
    full = n // (p + c)
    rest = n - full * (p + c)
    expected = full + (1 if rest - c >= low else 0)
    assert len(wins) == (min(expected, cap) if cap else expected)


def test_a_text_task_reads_files_fields_and_folders(tokenizer, tmp_path):
    folder = write_texts(tmp_path / "data")
    (tmp_path / "notes.txt").write_text("a text file is a single text " * 4)
    opts = TextOptions(text_field=("text", "new_contents"), prompt_tokens=20, continuation_tokens=6,
                       min_prompt_tokens=10, windows_per_text=0, test_fraction=0.2)
    task = TextTask([folder, tmp_path / "notes.txt"], tokenizer, opts)
    train, test = task.examples("train"), task.examples("test")
    assert task.metric == "perplexity" and task.answer_end is False
    assert train and test and not {e.meta["text"] for e in train} & {e.meta["text"] for e in test}
    every = train + test
    assert not any("HELD OUT" in e.prompt for e in every)  # dev.jsonl is never read
    assert any(e.source.startswith(str(tmp_path / "notes.txt")) for e in every)
    assert any(e.meta["text"].endswith("train.jsonl:1") for e in every)  # a new_contents line
    for e in every:  # one token per character
        assert len(e.answer) == 6 and 10 <= len(e.prompt) <= 20
    with pytest.raises(ValueError, match=r"train.jsonl:1: no string field 'text'"):
        TextTask(folder, tokenizer, text_field=("text",)).examples("train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .jsonl or .txt"):
        TextTask(tmp_path / "empty", tokenizer).examples("train")


def test_one_text_is_split_by_windows(tokenizer, tmp_path):
    (tmp_path / "one.txt").write_text("word " * 400)
    task = TextTask(tmp_path / "one.txt", tokenizer, prompt_tokens=16, continuation_tokens=4, windows_per_text=0)
    assert task.examples("train") and task.examples("test")


def test_a_hub_dataset_id_is_streamed_with_datasets(tokenizer, monkeypatch):
    calls = []

    def load_dataset(repo, split, streaming):
        calls.append((repo, split, streaming))
        return ({"content": f"text number {i} " * 6} for i in itertools.count())

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    task = TextTask("someone/texts", tokenizer, text_field=("text", "content"), max_texts=30, prompt_tokens=20,
                    continuation_tokens=8, min_prompt_tokens=8)
    every = task.examples("train") + task.examples("test")
    assert calls == [("someone/texts", "train", True)]
    assert {e.meta["text"] for e in every} <= {f"someone/texts:{i}" for i in range(30)}
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(ValueError, match=r"pip install 'k-token-merging\[datasets\]'"):
        TextTask("someone/texts", tokenizer).examples("train")


def test_text_options_are_checked():
    with pytest.raises(ValueError, match="min_prompt_tokens"):
        TextOptions(prompt_tokens=8, min_prompt_tokens=9)
    with pytest.raises(ValueError, match="test_fraction"):
        TextOptions(test_fraction=0.0)
    with pytest.raises(TypeError, match="prompt_tokens must be an int"):
        TextOptions(prompt_tokens="8")


# ---------------------------------------------------------------- losses
PROMPTS = ["the cat sat on the mat and", "a dog ran to"]
CONTS = [" then it slept", " the sun"]


def test_without_the_end_token_the_answer_tokens_are_the_targets(make_model):
    m = make_model(k=4)
    out = m(PROMPTS, CONTS, end_token=False)
    assert out.targets.tolist() == [t for a in m.tokenize(CONTS, what="answer") for t in a]
    assert out.ends is False and m(PROMPTS, CONTS).targets.numel() == out.targets.numel() + 2
    assert answer_teacher_ids(out) == [p + a[:-1] for p, a in zip(m.tokenize(PROMPTS), m.tokenize(CONTS))]
    with_end = m(PROMPTS, CONTS)
    assert answer_teacher_ids(with_end) == answer_teacher_ids(out)  # the end token is never read


@pytest.mark.parametrize("end", [True, False])
def test_answer_distillation_is_zero_when_the_student_reads_what_the_teacher_reads(make_model, end):
    plain = make_model(k=1)  # K = 1, mean-initialised encoder, LoRA at zero: the base model itself
    out = add_auxiliary(plain, plain(PROMPTS, CONTS, end_token=end), LossWeights(distill_answer=1.0, task_loss=0.0))
    assert float(out.parts["distill_answer"]) == pytest.approx(0.0, abs=1e-5)
    assert float(out.loss.detach()) == pytest.approx(0.0, abs=1e-5)
    merged = make_model(k=4)
    out = add_auxiliary(merged, merged(PROMPTS, CONTS, end_token=end), LossWeights(distill_answer=1.0, task_loss=0.0))
    assert float(out.parts["distill_answer"]) > 1e-3
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in merged.encoder.parameters())


def test_one_teacher_pass_serves_prompt_and_answer_distillation(make_model):
    m = make_model(k=2)
    out = m(PROMPTS, CONTS, end_token=False, all_layers=True)
    alone = add_auxiliary(m, out, LossWeights(distill=1.0, align=1.0))
    both = add_auxiliary(m, out, LossWeights(distill=1.0, align=1.0, distill_answer=0.5, task_loss=0.25))
    for name in ("distill", "align"):
        torch.testing.assert_close(both.parts[name], alone.parts[name], rtol=1e-5, atol=1e-6)
    expected = 0.25 * out.loss + both.parts["distill"] + both.parts["align"] + 0.5 * both.parts["distill_answer"]
    torch.testing.assert_close(both.loss, expected)
    assert both.parts["task"] == out.parts["task"]  # logged unweighted


def test_a_run_needs_some_loss():
    with pytest.raises(ValueError, match="nothing to train"):
        TrainConfig(task_loss=0.0)
    assert pretrain_configs()[1].distill_answer == 1.0 and pretrain_configs()[1].task_loss == 0.0
    assert pretrain_configs(train={"task_loss": 1.0})[1].task_loss == 1.0


# ---------------------------------------------------------------- the run
def pretrain_args(base_dir, text, out, steps, *extra):
    return ["pretrain", "--text", str(text), "--model", base_dir, "--device", "cpu", "--dtype", "float32",
            "--k", "4", "--steps", str(steps), "--batch-size", "4", "--eval-examples", "4",
            "--prompt-tokens", "24", "--continuation-tokens", "8", "--min-prompt-tokens", "8", "--lr", "1e-2",
            "--warmup-steps", "0", "--text-field", "text", "new_contents", "--out", str(out), *extra]


def _weights(m):
    return {k: v.clone() for k, v in m.state_dict().items() if "lora_" in k or k.startswith("encoder.")}


def test_pretrain_learns_and_a_task_starts_from_it(base_dir, tmp_path, capsys):
    text = write_texts(tmp_path / "text")
    run = tmp_path / "pre"
    assert main(pretrain_args(base_dir, text, run, 16, "--eval-every", "4", "--context-layers", "1")) == 0
    printed = capsys.readouterr().out
    assert "held-out continuation perplexity" in printed and "--init-from" in printed
    assert "reading no prompt at all" in printed
    history = json.loads((run / "history.json").read_text())["history"]
    losses = [row["train_distill_answer_loss"] for row in history]
    assert [row["step"] for row in history] == [4, 8, 12, 16] and losses[-1] < 0.8 * losses[0]
    record = json.loads((run / "pretrain.json").read_text())
    assert record["plain_perplexity"] > 1 and record["text"]["prompt_tokens"] == 24
    assert record["no_context_perplexity"] > 1 and record["no_context_perplexity"] != record["plain_perplexity"]
    saved = json.loads((run / "run_config.json").read_text())
    assert saved["train"]["distill_answer"] == 1.0
    assert saved["argv"] == pretrain_args(base_dir, text, run, 16, "--eval-every", "4", "--context-layers", "1")
    pre = KTokenMerging.from_pretrained(run / "model")
    assert pre.config.context_layers == 1 and pre.k == 4
    # a task starts from it: the same weights before its first step
    from ktm.train.phases import build_model

    start = build_model(pretrain_configs(model={"k": 4})[0], init_from=run / "model")
    a, b = _weights(pre), _weights(start)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    data = tmp_path / "task"
    data.mkdir()
    for split in ("train", "test"):
        (data / f"{split}.jsonl").write_text("".join(
            json.dumps({"prompt": f"the {w} sat, Label:", "answer": w}) + "\n" for w in WORDS[:6]))
    assert main(["train", "--task", "jsonl", "--data", str(data), "--model", base_dir, "--k", "4", "--steps", "2",
                 "--batch-size", "2", "--eval-examples", "2", "--init-from", str(run / "model"),
                 "--out", str(tmp_path / "task-run")]) == 0
    # a model option that the saved model overrides is refused, not silently ignored
    capsys.readouterr()
    assert main(["train", "--task", "jsonl", "--data", str(data), "--model", base_dir, "--k", "4", "--steps", "2",
                 "--context-layers", "2", "--init-from", str(run / "model"), "--out", str(tmp_path / "other")]) == 2
    assert "context_layers = 2 (the saved model has 1)" in capsys.readouterr().err


def test_a_resumed_pretraining_equals_an_uninterrupted_one(base_dir, tmp_path):
    text = write_texts(tmp_path / "text")
    assert main(pretrain_args(base_dir, text, tmp_path / "a", 6)) == 0
    assert main(pretrain_args(base_dir, text, tmp_path / "b", 3)) == 0
    assert main(pretrain_args(base_dir, text, tmp_path / "b", 6)) == 2  # a checkpoint is there
    assert main(pretrain_args(base_dir, text, tmp_path / "b", 6, "--resume")) == 0
    a = _weights(KTokenMerging.from_pretrained(tmp_path / "a" / "model"))
    b = _weights(KTokenMerging.from_pretrained(tmp_path / "b" / "model"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_pretrain_without_text_is_an_error(base_dir, tmp_path, capsys):
    assert main(["pretrain", "--model", base_dir, "--out", str(tmp_path / "r")]) == 2
    assert "--text" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    assert "--continuation-tokens" in capsys.readouterr().out
