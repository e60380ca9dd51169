"""Write a model folder (config, tokenizer, safetensors weights) for a GPU session.

    python benchmarks/gpu/model_folder.py SHAPE_FOLDER OUT_FOLDER              # random weights
    python benchmarks/gpu/model_folder.py SHAPE_FOLDER OUT_FOLDER --gguf FILE  # the GGUF's weights

SHAPE_FOLDER holds a transformers ``config.json`` and the tokenizer files, no weights (see
benchmarks/gpu/README.md for how it is made from the embedded GGUF file).

* Random weights (``--dtype``, default bfloat16) are for timing only: speed does not depend
  on the weights' values, so a session can time the embedded model's architecture before
  the model file itself has arrived (a device call carries at most 64 MiB; the GGUF file
  is 98 MB and comes in two calls).
* ``--gguf`` dequantises the GGUF file once (float32) and saves it as a plain folder, so
  that several training processes load it in seconds instead of each converting the GGUF.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("shape", help="folder with config.json and tokenizer files")
    p.add_argument("out", help="output folder")
    p.add_argument("--gguf", help="take the weights from this GGUF file (default: random weights)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weights' dtype (default: bfloat16 for random weights, float32 from a GGUF file)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = p.parse_args(argv)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    if args.gguf:
        gguf = Path(args.gguf)
        dtype = getattr(torch, args.dtype or "float32")
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype)
        # transformers marks a GGUF-loaded model as quantized and will not save it: copy the
        # dequantised weights into a plain model of the same configuration
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.shape), dtype=dtype)
        missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
        if unexpected or [k for k in missing if k != "lm_head.weight"]:
            raise SystemExit(f"weights do not fit {args.shape}: missing {missing[:3]}, unexpected {unexpected[:3]}")
        model.tie_weights()
        what = f"weights of {gguf.name}"
    else:
        dtype = getattr(torch, args.dtype or "bfloat16")
        torch.manual_seed(args.seed)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.shape), dtype=dtype)
        what = f"random weights (seed {args.seed})"
    model.save_pretrained(args.out)
    AutoTokenizer.from_pretrained(args.shape).save_pretrained(args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {model.config.model_type}, {n / 1e6:.1f} M {what}, {str(dtype)[6:]}, "
          f"in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
