"""Auxiliary training objectives that give merged prompts a dense learning signal.

A classification answer carries about one bit per example, which is enough for the
uncompressed model (it already reads the prompt) but not for teaching the LLM to *read*
merged embeddings. Three auxiliary losses add a signal at every block:

* **Reconstruction** (``reconstruct``): after the merged prompt, a short plain cue
  (:data:`RECON_CUE`) and then the prompt's own tokens, teacher-forced: the LLM must
  recover every token of the prompt, in order, from the merged embeddings. This forces
  the encoder + LoRA to keep token identity and order rather than a bag of words.
* **Dense self-distillation** (``distill``): the frozen base model reading the *plain*
  prompt is the teacher. After merged block ``j`` the student has seen exactly the
  tokens up to the end of that block, ``(j + 1) K - 1``; there the teacher's next-token
  distribution is the target (KL(teacher || student)) for the student's output at merged
  position ``j``. No labels are needed, so this works on any text; at K = 1 with LoRA
  switched off the student *is* the teacher and the loss is zero.
* **Answer distillation** (``distill_answer``): at every answer position the teacher reads
  the plain prompt and the answer so far, and its next-token distribution is the target
  for the student reading the merged prompt and the same answer tokens. On plain text cut
  into a prompt and its continuation (:class:`ktm.tasks.text.TextTask`) this is
  ``ktm pretrain``'s loss: the merged prompt must let the model continue the text as the
  plain model would.
* **Hidden-state distillation on the answer** (``distill_hidden``): at the same answer
  positions as ``distill_answer``, the student's hidden states at chosen layers move towards
  the teacher's (cosine distance): a signal of the model's width at every position rather
  than one distribution over the vocabulary.
* **Hidden-state alignment** (``align``): at the same pairs of positions, the student's
  hidden states at every layer move towards the teacher's (cosine distance). Distillation
  and alignment can use a K = 1 model trained on the task as the teacher
  (:func:`ktm.model.load_teacher`).

The position arithmetic is in small pure functions (:func:`distill_positions`,
:func:`answer_distill_positions`, :func:`reconstruction_targets`); the losses take a :class:`ktm.model.KTokenMerging`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..model.blocks import answer_targets, check_k, concat_right_padded, num_blocks, pad_sequences
from ..config import ALIGN_MODES, LossWeights

RECON_CUE = "\nRepeat:\n"


def distill_positions(lengths: Sequence[int], k: int, include_last: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student/teacher position pairs for dense distillation.

    For a prompt of ``n`` tokens (``M = ceil(n / K)`` blocks), merged position ``j`` for
    ``j = 0 .. M - 2`` is paired with plain position ``(j + 1) K - 1``, the last token of
    block ``j``: both have read the same tokens and predict token ``(j + 1) K``. The last
    block (paired with position ``n - 1``) is left out unless ``include_last``: what
    follows it is the answer, which the task loss handles.

    Returns ``(rows, student_cols, teacher_cols)`` long tensors.

    >>> r, s, t = distill_positions([9, 4], 4)
    >>> r.tolist(), s.tolist(), t.tolist()
    ([0, 0], [0, 1], [3, 7])
    >>> distill_positions([3], 1)[2].tolist()
    [0, 1]
    >>> distill_positions([9], 4, include_last=True)[2].tolist()
    [3, 7, 8]
    """
    check_k(k)
    rows, s_cols, t_cols = [], [], []
    for i, n in enumerate(lengths):
        m = num_blocks(n, k) - (0 if include_last else 1)
        rows += [i] * m
        s_cols += list(range(m))
        t_cols += [min((j + 1) * k, n) - 1 for j in range(m)]
    as_long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return as_long(rows), as_long(s_cols), as_long(t_cols)


def answer_distill_positions(prompt_lengths: Sequence[int], target_counts: Sequence[int], ends: bool = True
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher/student pairs for answer distillation.

    Row ``i`` has a plain prompt of ``n_i`` tokens and ``target_counts[i]`` targets in the
    forward pass (its answer tokens, then the end token when ``ends``). The end token is left
    out: the teacher, reading plain text, has no reason to end there. Answer token ``j`` is
    predicted by the teacher at position ``n_i - 1 + j`` of [prompt][answer] and by the
    student at index ``first_i + j`` of the forward pass's flat targets.

    Returns ``(rows, teacher_cols, student_index)`` long tensors.

    >>> r, t, s = answer_distill_positions([3, 2], [3, 2])
    >>> r.tolist(), t.tolist(), s.tolist()
    ([0, 0, 1], [2, 3, 1], [0, 1, 3])
    >>> answer_distill_positions([3], [2], ends=False)[1].tolist()
    [2, 3]
    """
    rows, t_cols, s_idx, first = [], [], [], 0
    for i, (n, count) in enumerate(zip(prompt_lengths, target_counts)):
        real = count - 1 if ends else count
        rows += [i] * real
        t_cols += [n - 1 + j for j in range(real)]
        s_idx += [first + j for j in range(real)]
        first += count
    as_long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return as_long(rows), as_long(t_cols), as_long(s_idx)


def answer_teacher_ids(out) -> list[list[int]]:
    """What the teacher reads for answer distillation: each plain prompt of the forward
    pass ``out`` followed by its answer tokens but the last (the end token is never read)."""
    counts = torch.bincount(out.rows.cpu(), minlength=len(out.prompt_ids)).tolist()
    answers = out.targets.cpu().split(counts)
    seqs = []
    for p, a in zip(out.prompt_ids, answers):
        real = a.tolist()[:-1] if out.ends else a.tolist()
        seqs.append(p + real[:-1])  # the answer's last token is predicted, never read
    return seqs


def answer_distillation_loss(model, out, teacher_last: torch.Tensor, teacher=None) -> torch.Tensor:
    """KL(teacher || student) per answer token (the end token left out), averaged.

    ``out``: the forward pass (its vocabulary logits at the answer positions are the
    student's); ``teacher_last``: the teacher's last hidden state for
    :func:`answer_teacher_ids` (right-padded), whose output layer gives the targets.
    """
    counts = torch.bincount(out.rows.cpu(), minlength=len(out.prompt_ids)).tolist()
    rows, t_cols, s_idx = answer_distill_positions([len(p) for p in out.prompt_ids], counts, out.ends)
    if rows.numel() == 0:
        return out.logits.new_zeros(())
    dev = model.device
    owner, ctx = _as_teacher(model, teacher)
    with torch.no_grad(), ctx:
        target = F.log_softmax(owner.logits(teacher_last[rows.to(dev), t_cols.to(dev)]), -1)
    student = F.log_softmax(out.logits[s_idx.to(out.logits.device)], -1)
    return F.kl_div(student, target, log_target=True, reduction="batchmean")


def reconstruction_targets(
    merged_lengths: Sequence[int], cue_length: int, prompt_lengths: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where a ``[merged prompt][cue][prompt tokens][end]`` row predicts its prompt tokens.

    The LLM reads ``m_i`` merged embeddings, then the cue and the prompt (inputs end one
    token before the end token). Prompt token ``t`` and then the end token are targets;
    the cue is read but never predicted.

    Returns ``(rows, cols)``: for each of the ``sum(n_i + 1)`` targets, in order.

    >>> r, c = reconstruction_targets([1, 2], 2, [2, 1])
    >>> r.tolist(), c.tolist()
    ([0, 0, 0, 1, 1], [2, 3, 4, 3, 4])
    """
    plain = [cue_length + n + 1 for n in prompt_lengths]
    rows, cols, _ = answer_targets(merged_lengths, plain)
    first = torch.tensor([0, *plain], dtype=torch.long).cumsum(0)[:-1]
    j = torch.arange(rows.numel()) - first[rows]
    keep = j >= cue_length
    return rows[keep], cols[keep]


def _as_teacher(model, teacher):
    """``(module, context)``: the teacher to run and the context to run it in (the base
    model is ``model`` itself with its adapters disabled)."""
    if teacher is None:
        return model, model.lm.disable_adapter()
    return teacher, contextlib.nullcontext()


def teacher_hidden(model, prompt_ids: list[list[int]], teacher=None, all_layers: bool = False):
    """The teacher's hidden states for the plain prompts (right-padded), without gradients.

    ``teacher`` None: the base model itself (``model``'s adapters disabled). Otherwise a
    K = 1 :class:`~ktm.model.KTokenMerging` (e.g. one trained on the task). Returns the
    last hidden state (B, T, d), or the tuple of every layer's with ``all_layers``.
    """
    dev = model.device
    plain = [torch.tensor(x, dtype=torch.long, device=dev)[:, None] for x in prompt_ids]
    ids, mask = pad_sequences(plain, side="right")
    owner, ctx = _as_teacher(model, teacher)
    with torch.no_grad(), ctx:
        out = owner.decode(owner.embed(ids[..., 0]), mask, all_layers=all_layers)
    return out.hidden_states if all_layers else out.last_hidden_state


def distillation_loss(model, prompt_ids: list[list[int]], student_hidden: torch.Tensor,
                      teacher_last: torch.Tensor, teacher=None) -> torch.Tensor:
    """KL(teacher || student) per position, averaged over all block-end positions.

    ``student_hidden``: the decoder's last hidden state for the right-padded batch whose
    rows start with the merged prompts (as in :meth:`KTokenMerging.forward`);
    ``teacher_last``: the teacher's last hidden state for the plain prompts
    (:func:`teacher_hidden`), whose output layer gives the targets.
    """
    rows, s_cols, t_cols = distill_positions([len(x) for x in prompt_ids], model.k)
    if rows.numel() == 0:  # every prompt fits in one block
        return student_hidden.new_zeros(())
    dev = model.device
    rows, s_cols, t_cols = rows.to(dev), s_cols.to(dev), t_cols.to(dev)
    owner, ctx = _as_teacher(model, teacher)
    with torch.no_grad(), ctx:
        target = F.log_softmax(owner.logits(teacher_last[rows, t_cols]), -1)
    student = F.log_softmax(model.logits(student_hidden[rows, s_cols]), -1)
    return F.kl_div(student, target, log_target=True, reduction="batchmean")




def alignment_loss(model, prompt_ids: list[list[int]], student_states: Sequence[torch.Tensor],
                   teacher_states: Sequence[torch.Tensor], mode: str = "cosine") -> torch.Tensor:
    """Mean distance between the student's and the teacher's hidden states, over every layer
    and every block end, the last block included.

    After merged block ``j`` the student should carry what the teacher carries after the
    last token of that block (``min((j + 1) K, n) - 1``), layer by layer: with a teacher
    trained on the task this hands over its intermediate computation, not just its answer.
    Both state tuples are as returned with ``output_hidden_states`` (embeddings first).

    ``mode="cosine"``: 1 - cosine similarity of the raw states (not squared error, so a few
    massive activations do not dominate). ``mode="standardized"``: the same on states
    standardised per dimension by the teacher's mean and standard deviation over the
    batch's aligned positions, and without the first merged position. Raw states share a
    large common component, so a small raw cosine distance can still miss the directions
    in which examples differ, which are the ones that carry the answer; standardising
    weighs those. The first merged position is the attention sink (its hidden state is
    huge at every K) and its teacher position, ``K - 1``, is not, so it is left alone.
    """
    if mode not in ALIGN_MODES:
        raise ValueError(f"alignment mode must be one of {ALIGN_MODES}, got {mode!r}")
    rows, s_cols, t_cols = distill_positions([len(x) for x in prompt_ids], model.k, include_last=True)
    if mode == "standardized":
        keep = s_cols > 0
        rows, s_cols, t_cols = rows[keep], s_cols[keep], t_cols[keep]
        if rows.numel() < 2:  # no statistics from fewer than two positions
            return student_states[-1].new_zeros(())
    dev = model.device
    rows, s_cols, t_cols = rows.to(dev), s_cols.to(dev), t_cols.to(dev)
    if len(teacher_states) != len(student_states):
        raise ValueError(f"teacher has {len(teacher_states) - 1} layers, student {len(student_states) - 1}")
    terms = []
    for s, t in zip(student_states[1:], teacher_states[1:]):
        s, t = s[rows, s_cols].float(), t[rows, t_cols].float()
        if mode == "standardized":
            mu, sd = t.mean(0), t.std(0)
            sd = sd.clamp_min(1e-3 * float(sd.mean()) + 1e-8)
            s, t = (s - mu) / sd, (t - mu) / sd
        terms.append(cosine_distance(s, t))
    return torch.stack(terms).mean()


def cosine_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean ``1 - cos`` between matching rows of two (N, d) state tensors, in float32 (not
    squared error, so that a few massive activations do not dominate)."""
    return 1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1).mean()


def layer_indices(layers: Sequence[int], num_layers: int) -> list[int]:
    """Indices into a ``hidden_states`` tuple (embeddings first) of ``layers`` counted from 1
    (the first layer) or from -1 (the last).

    >>> layer_indices([1, -1, 15], 30)
    [1, 30, 15]
    """
    out = []
    for layer in layers:
        if not (1 <= layer <= num_layers or -num_layers <= layer <= -1):
            raise ValueError(f"layer {layer} does not exist: the model has layers 1..{num_layers} "
                             f"(or -1..-{num_layers} from the last)")
        out.append(layer if layer > 0 else num_layers + 1 + layer)
    return out


def hidden_distillation_loss(model, out, teacher_states: Sequence[torch.Tensor],
                             layers: Sequence[int]) -> torch.Tensor:
    """Mean cosine distance between the student's and the teacher's hidden states at
    ``layers``, over every answer position (the end token left out), as
    :func:`answer_distillation_loss` pairs them.

    ``out``: the forward pass with every layer's states (``all_layers=True``);
    ``teacher_states``: the teacher's states for :func:`answer_teacher_ids` (every layer)."""
    if out.hidden_states is None or out.cols is None:
        raise ValueError("hidden-state distillation needs every layer's hidden states: call the model "
                         "with all_layers=True")
    if len(teacher_states) != len(out.hidden_states):
        raise ValueError(f"teacher has {len(teacher_states) - 1} layers, student {len(out.hidden_states) - 1}")
    counts = torch.bincount(out.rows.cpu(), minlength=len(out.prompt_ids)).tolist()
    rows, t_cols, s_idx = answer_distill_positions([len(p) for p in out.prompt_ids], counts, out.ends)
    if rows.numel() == 0:
        return out.logits.new_zeros(())
    dev = model.device
    rows, t_cols, s_idx = rows.to(dev), t_cols.to(dev), s_idx.to(dev)
    s_rows, s_cols = out.rows[s_idx], out.cols[s_idx]
    terms = [cosine_distance(out.hidden_states[i][s_rows, s_cols], teacher_states[i][rows, t_cols].detach())
             for i in layer_indices(layers, len(out.hidden_states) - 1)]
    return torch.stack(terms).mean()


def reconstruction_loss(model, prompt_ids: list[list[int]], merged: list[torch.Tensor],
                        max_rows: int | None = None) -> torch.Tensor:
    """Cross-entropy of recovering each prompt's tokens (and an end token) after its merged
    embeddings and :data:`RECON_CUE`; only the first ``max_rows`` prompts when given (a
    reconstruction row is ~4x the cost of a task row at K = 4)."""
    if max_rows:
        prompt_ids, merged = prompt_ids[:max_rows], merged[:max_rows]
    cue = model.tokenizer(RECON_CUE, add_special_tokens=False)["input_ids"]
    eos = model.tokenizer.eos_token_id
    plain = [cue + x + [eos] for x in prompt_ids]
    embeds, mask = concat_right_padded(merged, model.embed_each([x[:-1] for x in plain]))
    hidden = model.decode(embeds, mask).last_hidden_state
    rows, cols = reconstruction_targets([m.shape[0] for m in merged], len(cue), [len(x) for x in prompt_ids])
    targets = torch.tensor([t for x in prompt_ids for t in x + [eos]], dtype=torch.long, device=model.device)
    logits = model.logits(hidden[rows.to(model.device), cols.to(model.device)])
    return F.cross_entropy(logits, targets)


def add_auxiliary(model, out, weights: LossWeights, teacher=None):
    """``out`` (a forward pass's :class:`~ktm.model.core.LossOutput`) with the auxiliary terms of
    ``weights`` (a :class:`~ktm.config.LossWeights`) added to its loss and to its ``parts``.

    ``distill``, ``distill_answer``, ``distill_hidden`` and ``align`` learn from ``teacher`` (a
    K = 1 model reading the plain prompts; default: the base model, ``model``'s adapters off),
    whose one pass serves all of them (with ``distill_answer`` or ``distill_hidden`` it reads the
    prompts and the answers: its states at the prompt positions are those of the prompts alone);
    ``align`` and ``distill_hidden`` need the forward's ``all_layers=True``
    (``weights.all_layers``). ``reconstruct`` runs on the first ``reconstruct_rows`` rows (all when
    0). ``task_loss`` weighs the forward's own cross-entropy (its ``parts["task"]`` stays
    unweighted, for the logs).
    """
    import dataclasses

    w = weights
    if not w.auxiliary and w.task_loss == 1.0:
        return out
    if w.all_layers and out.hidden_states is None:
        raise ValueError("alignment and hidden-state distillation need every layer's hidden states: "
                         "call the model with all_layers=True")
    loss, parts = w.task_loss * out.loss, dict(out.parts)
    if w.distill or w.align or w.distill_answer or w.hidden:
        seqs = answer_teacher_ids(out) if (w.distill_answer or w.hidden) else out.prompt_ids
        t_states = teacher_hidden(model, seqs, teacher, all_layers=w.all_layers)
        t_last = t_states[-1] if w.all_layers else t_states
    terms = []
    if w.distill_answer:
        terms.append(("distill_answer", w.distill_answer, answer_distillation_loss(model, out, t_last, teacher)))
    if w.distill:
        terms.append(("distill", w.distill, distillation_loss(model, out.prompt_ids, out.hidden, t_last, teacher)))
    if w.hidden:
        terms.append(("distill_hidden", w.distill_hidden_weight,
                      hidden_distillation_loss(model, out, t_states, w.distill_hidden)))
    if w.align:
        terms.append(("align", w.align, alignment_loss(model, out.prompt_ids, out.hidden_states, t_states,
                                                       w.align_mode)))
    if w.reconstruct:
        terms.append(("reconstruct", w.reconstruct,
                      reconstruction_loss(model, out.prompt_ids, out.merged, w.reconstruct_rows or None)))
    for name, weight, term in terms:
        parts[name] = term.detach()
        loss = loss + weight * term
    return dataclasses.replace(out, loss=loss, parts=parts)
