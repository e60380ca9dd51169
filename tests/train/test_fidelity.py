"""ktm fidelity: the merged model against the plain base model, no task training; and the
hidden-state distillation objective that pretraining can add."""

import json

import pytest
import torch

from ktm.config import LossWeights, TrainConfig
from ktm.train.fidelity import FidelityOptions, compare_answers, fidelity, fidelity_line, plain_answer_logits, \
    merged_answer_logits, prose_windows
from ktm.train.objectives import add_auxiliary, hidden_distillation_loss, layer_indices
from ktm.tasks.amazon import review_example

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread

TEXT = "the cat sat on a mat and then ran to see the dog who likes fish in the sun "


def write_prose(path, n=6, bad_tail=False):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"text": f"{i} " + TEXT * 2}) + "\n")
        if bad_tail:
            f.write("{not json\n")
    return path


def reviews(n=6):
    return [review_example(f"r:{i}", {"rating": 5 if i % 2 else 1, "text": f"nice {i} " * 5}) for i in range(n)]


def test_windows_are_exact_one_per_text_and_read_lazily(tokenizer, tmp_path):
    path = write_prose(tmp_path / "dev.jsonl", bad_tail=True)
    wins = prose_windows(path, tokenizer, prompt_tokens=40, continuation_tokens=8, windows=4)
    assert len(wins) == 4  # the corrupt last line is never read
    for i, w in enumerate(wins):
        assert w.prompt.startswith(f"{i} ") and len(w.prompt) == 40 and len(w.answer) == 8
    with pytest.raises(ValueError, match="no text has 500"):
        prose_windows(write_prose(tmp_path / "b.jsonl"), tokenizer, prompt_tokens=500, windows=2)


def test_untrained_k1_reads_exactly_like_the_plain_model(make_model, tokenizer, tmp_path):
    m = make_model(k=1)  # LoRA B is zero at initialisation and the K = 1 encoder is the identity
    wins = prose_windows(write_prose(tmp_path / "dev.jsonl"), tokenizer, prompt_tokens=30, continuation_tokens=6)
    r = fidelity(m, wins, reviews(), batch_size=4, progress=False)
    assert r["perplexity_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert r["top1_agreement"] == 1.0 and r["kl_per_token"] == pytest.approx(0.0, abs=1e-6)
    assert r["tokens"] == 6 * len(wins) and r["amazon"]["answer_agreement"] == 1.0
    assert "1.000x" in fidelity_line(r)


def test_merging_departs_from_plain_and_numbers_match_a_direct_computation(make_model, tokenizer, tmp_path):
    m = make_model(k=4)
    wins = prose_windows(write_prose(tmp_path / "dev.jsonl"), tokenizer, prompt_tokens=32, continuation_tokens=5)
    r = fidelity(m, wins, batch_size=3, progress=False)
    assert r["kl_per_token"] > 0 and r["perplexity_ratio"] != pytest.approx(1.0, abs=1e-4)
    # the same numbers one window at a time, from the two logit functions
    agree, nll = 0, 0.0
    for w in wins:
        lp = plain_answer_logits(m, [w.prompt], [w.answer])[0]
        lm = merged_answer_logits(m, [w.prompt], [w.answer])[0]
        target = torch.tensor(tokenizer(w.answer, add_special_tokens=False)["input_ids"])
        agree += int((lp.argmax(-1) == lm.argmax(-1)).sum())
        nll += torch.nn.functional.cross_entropy(lm, target, reduction="sum").item()
    assert r["top1_agreement"] == pytest.approx(agree / r["tokens"])
    assert r["merged_perplexity"] == pytest.approx(float(torch.tensor(nll / r["tokens"]).exp()), rel=1e-4)


def test_the_plain_reading_of_reviews_does_not_depend_on_the_merger(make_model):
    a2 = compare_answers(make_model(k=2), reviews(8), batch_size=3, progress=False)
    a1 = compare_answers(make_model(k=1), reviews(8), batch_size=5, progress=False)  # same base (seed 0)
    assert a2["reviews"] == 8 and 0 <= a2["answer_agreement"] <= 1
    assert a2["plain_accuracy"] == a1["plain_accuracy"] == a1["merged_accuracy"]
    assert a2["plain_positive_rate"] == a1["plain_positive_rate"]


def test_options_are_checked():
    with pytest.raises(ValueError, match="windows must be >= 1"):
        FidelityOptions(windows=0)
    with pytest.raises(TypeError, match="prompt_tokens"):
        FidelityOptions(prompt_tokens="256")


# ---------------------------------------------------------------- hidden-state distillation
def test_layer_indices():
    assert layer_indices([1, -1, -2], 4) == [1, 4, 3]
    with pytest.raises(ValueError, match="layer 5 does not exist"):
        layer_indices([5], 4)
    with pytest.raises(ValueError, match="counts layers from 1"):
        TrainConfig(distill_hidden=(0,))


def test_hidden_distillation_is_zero_for_the_teacher_itself_and_trains(make_model):
    prompts, answers = ["abcdefgh", "hello there"], ["xyz", "ok"]
    m = make_model(k=1)  # student == teacher at initialisation
    out = add_auxiliary(m, m(prompts, answers, all_layers=True, end_token=False), LossWeights(distill_hidden=(1, -1)))
    assert float(out.parts["distill_hidden"]) == pytest.approx(0.0, abs=1e-5)
    m4 = make_model(k=4).train()
    out = m4(prompts, answers, all_layers=True, end_token=False)
    out = add_auxiliary(m4, out, LossWeights(task_loss=0.0, distill_hidden=(-1,), distill_hidden_weight=2.0))
    assert float(out.parts["distill_hidden"]) > 0
    assert float(out.loss.detach()) == pytest.approx(2.0 * float(out.parts["distill_hidden"]))
    out.loss.backward()
    grads = [p.grad for p in m4.trainable_parameters()["encoder"]]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    with pytest.raises(ValueError, match="all_layers=True"):
        hidden_distillation_loss(m4, m4(prompts, answers, end_token=False), (), (1,))


# ---------------------------------------------------------------- the command
def test_the_command_prints_and_saves_the_numbers_of_the_library(base_dir, tmp_path, capsys):
    from conftest import trained_checkpoint
    from ktm import KTokenMerging
    from ktm.cli import main

    trained_checkpoint(tmp_path / "ckpt", base_dir, k=2)
    text = write_prose(tmp_path / "dev.jsonl")
    revs = tmp_path / "reviews.jsonl"
    revs.write_text("".join(json.dumps({"rating": r, "text": f"fine {r} " * 4}) + "\n" for r in (1, 5, 4)))
    args = ["fidelity", "--checkpoint", str(tmp_path / "ckpt"), "--text", str(text), "--windows", "3",
            "--prompt-tokens", "30", "--continuation-tokens", "5", "--reviews", str(revs), "--review-windows", "2",
            "--json", str(tmp_path / "f.json"), "--model", base_dir, "--device", "cpu", "--dtype", "float32",
            "--threads", "1"]
    assert main(args) == 0
    saved = json.loads((tmp_path / "f.json").read_text())
    assert "continuation perplexity" in capsys.readouterr().out
    m = KTokenMerging.from_pretrained(tmp_path / "ckpt", base=base_dir, device="cpu", dtype="float32")
    want = fidelity(m, prose_windows(text, m.tokenizer, 30, 5, 3), reviews_of(revs)[:2], progress=False)
    assert saved["windows"] == 3 and saved["amazon"]["reviews"] == 2
    for key in ("merged_perplexity", "plain_perplexity", "top1_agreement", "kl_per_token"):
        assert saved[key] == pytest.approx(want[key], rel=1e-5)
    assert main(args[:-2] + ["--threads", "0"]) == 2  # a one-line argparse error
    assert main(["fidelity", "--checkpoint", str(tmp_path / "nothing"), "--text", str(text)]) == 2


def reviews_of(path):
    from ktm.tasks.amazon import read_reviews

    return read_reviews(path)
