"""The merge's host-side cost on the CPU (issue 27): B prompts of L tokens -> merged embeddings.

Times, median of --repeats, one process:

* ``flatten_list_s``: the former way of laying ids end to end (a Python list of every token,
  then ``torch.tensor``), for comparison;
* ``flatten_s``: :meth:`PromptMerger.flat_ids` on Python lists (numpy reads them) and
  ``flatten_tensor_s`` on a (B, L) tensor;
* ``layout_s``: the block index (:func:`ktm.model.blocks.block_slots`);
* ``gather_old_s``: the former embedding lookup, block gather and fill rule over every block;
  ``gather_s``: one lookup straight into the block layout, the fill rule on partial blocks only;
* ``encoder_s``: the encoder on all blocks;
* ``merge_s``: :meth:`PromptMerger.merge_ids` end to end (lists in).

The encoder is the paper's default width for K, or ``--hidden``; the table is random (V, d)
(the timing does not depend on its values). Writes one JSON object per K to stdout.

    OMP_NUM_THREADS=2 python benchmarks/merge_host.py --batch 8 --length 8192 --k 1 2 4
"""

import argparse
import json
import statistics
import timeit

import torch

from ktm.config import ModelConfig
from ktm.model.blocks import block_slots, fill_blocks
from ktm.model.encoder import encoder_from_config
from ktm.model.prompts import PromptMerger, fill_partial


def timed(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls of ``fn``."""
    return statistics.median(timeit.repeat(fn, number=1, repeat=repeats))


def measure(b: int, length: int, k: int, vocab: int, dim: int, hidden, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    table = torch.nn.Embedding.from_pretrained(torch.randn(vocab, dim, generator=gen), freeze=True)
    config = ModelConfig(k=k, encoder_hidden=hidden)
    encoder = encoder_from_config(config, dim).eval().requires_grad_(False)
    merger = PromptMerger(None, table, encoder, config)
    tensor = torch.randint(0, vocab, (b, length), generator=gen)
    ids = tensor.tolist()
    flat, lengths = merger.flat_ids(ids)
    index, valid, _ = block_slots(lengths, k)
    blocks = fill_blocks(table(flat)[index], valid)
    with torch.inference_mode():
        out = {
            "B": b, "L": length, "K": k, "encoder_hidden": encoder.hidden if hasattr(encoder, "hidden") else None,
            "flatten_list_s": timed(lambda: torch.tensor([t for x in ids for t in x], dtype=torch.long), repeats),
            "flatten_s": timed(lambda: merger.flat_ids(ids), repeats),
            "flatten_tensor_s": timed(lambda: merger.flat_ids(tensor), repeats),
            "layout_s": timed(lambda: block_slots(lengths, k), repeats),
            "gather_old_s": timed(lambda: fill_blocks(table(flat)[index], valid), repeats),
            "gather_s": timed(lambda: fill_partial(table(flat[index]), valid), repeats),
            "encoder_s": timed(lambda: encoder(blocks, valid), repeats),
            "merge_s": timed(lambda: merger.merge_ids(ids), repeats),
            "merge_tensor_s": timed(lambda: merger.merge_ids(tensor), repeats),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--k", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--dim", type=int, default=576)
    ap.add_argument("--hidden", type=int, default=None, help="encoder MLP width (default: the paper's for K)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    for k in args.k:
        print(json.dumps(measure(args.batch, args.length, k, args.vocab, args.dim, args.hidden, args.repeats)),
              flush=True)


if __name__ == "__main__":
    main()
