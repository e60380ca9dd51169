"""merge_ids without a Python step per token: lists, 1-D tensors and one (B, L) tensor give the
same merged embeddings, and the fill rule on partial blocks only equals it on every block."""

import numpy as np
import pytest
import torch

from ktm.model.blocks import block_slots, fill_blocks
from ktm.model.prompts import fill_partial


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_ids_as_lists_tensors_and_a_matrix_merge_alike(make_model, k):
    model = make_model(k=k, init="paper")
    gen = torch.Generator().manual_seed(k)
    matrix = torch.randint(3, 90, (3, 11), generator=gen)
    lists = matrix.tolist()
    want = model.merger.merge_ids(lists)
    for ids in (list(matrix), [np.asarray(x) for x in lists], matrix):
        got = model.merger.merge_ids(ids)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    flat, lengths = model.merger.flat_ids([[5, 6], [7]])
    assert flat.tolist() == [5, 6, 7] and lengths == [2, 1]


@pytest.mark.parametrize("lengths, k", [([5, 8, 1], 4), ([4, 8], 4), ([7, 3, 2], 3), ([1], 2)])
def test_fill_partial_equals_fill_blocks(lengths, k):
    index, valid, _ = block_slots(lengths, k)
    emb = torch.randn(sum(lengths), 6)
    blocks = emb[index]
    assert torch.equal(fill_partial(blocks.clone(), valid), fill_blocks(blocks, valid))
    leaf = blocks.clone().requires_grad_(True)  # training: out of place, gradients flow
    fill_partial(leaf * 1.0, valid).sum().backward()
    assert leaf.grad is not None
