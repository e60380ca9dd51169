"""Auxiliary objectives: position arithmetic, zero distillation at K = 1, hand-checked losses."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from ktm.config import LossWeights
from ktm.model.blocks import num_blocks
from ktm.train.objectives import (
    RECON_CUE,
    add_auxiliary,
    distill_positions,
    distillation_loss,
    reconstruction_loss,
    reconstruction_targets,
    teacher_hidden,
)

PROMPTS = ["abcdefghij", "xyz", "hello world!"]
ANSWERS = ["yes", "no", "maybe"]


def run(model, teacher=None, **aux):
    """A forward pass on PROMPTS / ANSWERS with the auxiliary terms added, as the trainer does."""
    out = model(PROMPTS, ANSWERS, all_layers=bool(aux.get("align")))
    return add_auxiliary(model, out, LossWeights(**aux), teacher=teacher)


@given(st.lists(st.integers(1, 40), min_size=1, max_size=6), st.integers(1, 9))
def test_distill_pairs_see_the_same_tokens(lengths, k):
    rows, s, t = distill_positions(lengths, k)
    assert rows.numel() == sum(num_blocks(n, k) - 1 for n in lengths)
    for r, sc, tc in zip(rows.tolist(), s.tolist(), t.tolist()):
        # merged position sc has read blocks 0..sc, i.e. tokens 0..(sc+1)K-1 = tc
        assert tc == (sc + 1) * k - 1
        assert tc + 1 < lengths[r]  # the token both predict exists in the prompt
        assert sc < num_blocks(lengths[r], k) - 1


@given(st.lists(st.integers(1, 20), min_size=1, max_size=5), st.integers(0, 4), st.data())
def test_reconstruction_targets_follow_the_cue(lengths, cue, data):
    merged = [data.draw(st.integers(1, 10)) for _ in lengths]
    rows, cols = reconstruction_targets(merged, cue, lengths)
    assert rows.numel() == sum(n + 1 for n in lengths)
    for i, (m, n) in enumerate(zip(merged, lengths)):
        c = cols[rows == i].tolist()
        # the output after the last cue token predicts prompt token 0, and so on
        assert c == list(range(m + cue - 1, m + cue + n))


def test_distillation_is_zero_when_student_and_teacher_read_the_same_input(make_model):
    m = make_model(k=1)  # fresh LoRA adapters are zero: student == teacher
    m.train()
    out = run(m, distill=1.0)
    assert out.parts["distill"].abs().item() < 1e-5
    torch.testing.assert_close(out.loss, out.parts["task"] + out.parts["distill"])


def test_distillation_is_positive_for_merged_prompts_and_has_gradients(make_model):
    m = make_model(k=4)
    m.train()
    out = run(m, distill=1.0)
    assert out.parts["distill"].item() > 1e-4
    out.loss.backward()
    enc = [p.grad for p in m.encoder.parameters() if p.grad is not None]
    assert enc and any(g.abs().sum() > 0 for g in enc)


def test_distillation_equals_a_hand_computed_kl(make_model):
    m = make_model(k=3)
    ids = m.tokenize(PROMPTS)
    merged = m.merge_ids(ids)
    terms = []
    for x, e in zip(ids, merged):
        s_h = m.decode(e[None], torch.ones(1, e.shape[0], dtype=torch.long)).last_hidden_state[0]
        with m.lm.disable_adapter():
            t_h = m.decode(m.embed(torch.tensor([x])), torch.ones(1, len(x), dtype=torch.long)).last_hidden_state[0]
        for j in range(e.shape[0] - 1):
            p = F.log_softmax(m.logits(t_h[(j + 1) * 3 - 1]), -1)
            q = F.log_softmax(m.logits(s_h[j]), -1)
            terms.append((p.exp() * (p - q)).sum())
    want = torch.stack(terms).mean()
    from ktm.model.blocks import pad_sequences

    hidden = m.decode(*pad_sequences(merged, side="right")).last_hidden_state
    got = distillation_loss(m, ids, hidden, teacher_hidden(m, ids))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_reconstruction_equals_per_prompt_cross_entropy(make_model):
    m = make_model(k=4)
    ids = m.tokenize(PROMPTS)
    merged = m.merge_ids(ids)
    cue = m.tokenizer(RECON_CUE, add_special_tokens=False)["input_ids"]
    eos = m.tokenizer.eos_token_id
    nll, count = 0.0, 0
    for x, e in zip(ids, merged):
        plain = torch.tensor(cue + x)
        embeds = torch.cat([e, m.embed(plain)], 0)[None]
        logits = m.logits(m.decode(embeds, torch.ones(embeds.shape[:2], dtype=torch.long)).last_hidden_state[0])
        start = e.shape[0] + len(cue) - 1
        targets = torch.tensor(x + [eos])
        nll = nll + F.cross_entropy(logits[start:start + len(targets)], targets, reduction="sum")
        count += len(targets)
    torch.testing.assert_close(reconstruction_loss(m, ids, merged), nll / count, rtol=1e-4, atol=1e-5)


def test_forward_adds_weighted_terms(make_model):
    m = make_model(k=2)
    plain = m(PROMPTS, ANSWERS)
    out = run(m, reconstruct=0.5, distill=0.25)
    assert set(out.parts) == {"task", "reconstruct", "distill"}
    torch.testing.assert_close(out.parts["task"], plain.loss)
    torch.testing.assert_close(
        out.loss, out.parts["task"] + 0.5 * out.parts["reconstruct"] + 0.25 * out.parts["distill"])


@pytest.mark.parametrize("field", ["reconstruct", "distill"])
def test_negative_weights_are_rejected(field):
    from ktm.config import TrainConfig

    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: -1.0})


def test_reconstruction_on_the_first_rows_only(make_model):
    m = make_model(k=4)
    ids = m.tokenize(PROMPTS)
    merged = m.merge_ids(ids)
    torch.testing.assert_close(reconstruction_loss(m, ids, merged, max_rows=2),
                               reconstruction_loss(m, ids[:2], merged[:2]))


def test_alignment_is_zero_at_k1_and_positive_when_merged(make_model):
    same = make_model(k=1)
    out = run(same, align=1.0)
    assert out.parts["align"].abs().item() < 1e-5
    merged = make_model(k=4)
    out = run(merged, align=1.0)
    assert out.parts["align"].item() > 1e-4
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in merged.encoder.parameters())
    assert _align_after_training(merged, "cosine") < 0.9 * out.parts["align"].item()


def _align_after_training(model, mode, steps=8):
    """The alignment term after a few AdamW steps that minimise it (weighted 1000 against
    the task loss, whose gradient is then negligible): its gradient points downhill."""
    params = [p for group in model.trainable_parameters().values() for p in group]
    opt = torch.optim.AdamW(params, lr=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        run(model, align=1000.0, align_mode=mode).loss.backward()
        opt.step()
    return run(model, align=1.0, align_mode=mode).parts["align"].item()


def test_explicit_teacher_reading_the_same_input_gives_zero(make_model):
    student, teacher = make_model(k=1), make_model(k=1)  # same seed: identical weights
    out = run(student, distill=1.0, align=1.0, teacher=teacher)
    assert out.parts["distill"].abs().item() < 1e-5
    assert out.parts["align"].abs().item() < 1e-5


def test_a_trained_teacher_changes_the_targets(make_model):
    student, teacher = make_model(k=1), make_model(k=1)
    with torch.no_grad():
        for name, p in teacher.lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    out = run(student, distill=1.0, align=1.0, teacher=teacher)
    assert out.parts["distill"].item() > 1e-4 and out.parts["align"].item() > 1e-4


def test_load_teacher_checks_k_and_base(make_model, tokenizer, tmp_path):
    from conftest import tiny_llama

    from ktm.model import CheckpointError
    from ktm.model import load_teacher

    student = make_model(k=4)
    make_model(k=4).save_pretrained(tmp_path / "k4")
    with pytest.raises(CheckpointError, match="K = 1"):
        load_teacher(tmp_path / "k4", student)
    make_model(k=1, seed=3).save_pretrained(tmp_path / "other")
    with pytest.raises(CheckpointError, match="another base"):
        load_teacher(tmp_path / "other", student)
    make_model(k=1).save_pretrained(tmp_path / "k1")
    teacher = load_teacher(tmp_path / "k1", student, base=tiny_llama(len(tokenizer)))
    assert teacher.k == 1 and not any(p.requires_grad for p in teacher.parameters())
    out = run(make_model(k=1), distill=1.0, teacher=teacher)
    assert out.parts["distill"].abs().item() < 1e-5


def test_distillation_is_the_same_with_or_without_alignment(make_model):
    m = make_model(k=3)
    alone = run(m, distill=1.0).parts["distill"]
    both = run(m, distill=1.0, align=1.0).parts["distill"]
    torch.testing.assert_close(both, alone)


@pytest.mark.parametrize("mode", ["cosine", "standardized"])
def test_alignment_modes_zero_when_teacher_reads_the_same_input(make_model, mode):
    student, teacher = make_model(k=1), make_model(k=1)
    out = run(student, align=1.0, align_mode=mode, teacher=teacher)
    assert out.parts["align"].abs().item() < 1e-5
    merged = make_model(k=2)
    out = run(merged, align=1.0, align_mode=mode, teacher=teacher)
    assert out.parts["align"].item() > 1e-4


def test_standardized_alignment_by_hand_and_without_the_sink(make_model):
    from ktm.train.objectives import alignment_loss

    m = make_model(k=2)
    ids = m.tokenize(PROMPTS)
    g = torch.Generator().manual_seed(0)
    t_states = [torch.randn(3, 12, 32, generator=g) for _ in range(3)]
    s_states = [torch.randn(3, 6, 32, generator=g) for _ in range(3)]
    rows, s_cols, t_cols = distill_positions([len(x) for x in ids], 2, include_last=True)
    keep = s_cols > 0
    rows, s_cols, t_cols = rows[keep], s_cols[keep], t_cols[keep]
    want = []
    for s, t in zip(s_states[1:], t_states[1:]):
        t_, s_ = t[rows, t_cols], s[rows, s_cols]
        mu, sd = t_.mean(0), t_.std(0)
        want.append(1 - F.cosine_similarity((s_ - mu) / sd, (t_ - mu) / sd, dim=-1).mean())
    got = alignment_loss(m, ids, s_states, t_states, "standardized")
    torch.testing.assert_close(got, torch.stack(want).mean())
    # the first merged position (the attention sink) is left out, unlike in cosine mode
    cosine = alignment_loss(m, ids, s_states, t_states, "cosine")
    for s in s_states:
        s[:, 0] = 1e4
    torch.testing.assert_close(alignment_loss(m, ids, s_states, t_states, "standardized"), got)
    assert not torch.allclose(alignment_loss(m, ids, s_states, t_states, "cosine"), cosine)
    with pytest.raises(ValueError, match="alignment mode"):
        alignment_loss(m, ids, s_states, t_states, "l2")


def test_forward_returns_the_task_loss_and_the_auxiliary_terms_add_to_it(make_model):
    m = make_model(k=2)
    out = m(PROMPTS, ANSWERS, all_layers=True)
    assert out.parts == {"task": out.loss.detach()} and len(out.hidden_states) == 3  # embeddings + 2 layers
    assert [len(x) for x in out.prompt_ids] == [len(p) for p in PROMPTS] and len(out.merged) == 3
    both = add_auxiliary(m, out, LossWeights(distill=0.5, align=2.0))
    total = out.loss + 0.5 * both.parts["distill"] + 2.0 * both.parts["align"]
    torch.testing.assert_close(both.loss, total)
    assert add_auxiliary(m, out, LossWeights()) is out
    with pytest.raises(ValueError, match="all_layers=True"):
        add_auxiliary(m, m(PROMPTS, ANSWERS), LossWeights(align=1.0))
