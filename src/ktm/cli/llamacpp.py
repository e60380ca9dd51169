"""The llama.cpp side of ``ktm export``, ``ktm generate`` and ``ktm serve``.

:func:`add_parser` adds options to those three commands' parsers and routes them: ``export --format
gguf`` writes a llama.cpp export (:mod:`ktm.serve.gguf`), ``generate --export DIR`` answers through
:class:`~ktm.serve.llamacpp.LlamaCppEngine`, and ``serve --export DIR`` on a llama.cpp export runs
ktm's own OpenAI-compatible server (:mod:`ktm.serve.http`) instead of vLLM.
"""

from __future__ import annotations

import argparse
import json
import sys

from .generate import batches, escape_line, prompt_inputs
from .options import positive_int


def _route(parser: argparse.ArgumentParser, use, run) -> None:
    """``parser`` runs ``run(args)`` when ``use(args)``, else what it ran before."""
    before = parser.get_default("func")
    parser.set_defaults(func=lambda args: run(args) if use(args) else before(args))


def add_parser(sub) -> None:
    """Add the llama.cpp options to the ``export``, ``generate`` and ``serve`` sub-parsers (so
    this group comes after ``generate`` and ``serving`` in :data:`ktm.cli.main.COMMANDS`)."""
    ex, gen, sv = (sub.choices[name] for name in ("export", "generate", "serve"))
    ex.add_argument("--format", choices=["hf", "gguf"], default="hf",
                    help="hf: a Hugging Face folder for vLLM (default); gguf: a folder llama.cpp runs "
                         "(model.gguf with the LoRA merged; llama bases: a GGUF file, e.g. the default, or a "
                         "Hugging Face folder or hub id, converted)")
    ex.add_argument("--gguf-type", choices=["f32", "f16", "q8_0", "source"], default="f32",
                    help="--format gguf: the weights' type; f32 reproduces ktm's float32 model; source (a GGUF "
                         "base only): each tensor re-quantised to its type in the base's GGUF (the default model: "
                         "Q4_1, as small as the original, but most answers then differ from ktm's); default: f32")
    _route(ex, lambda a: a.format == "gguf", cmd_export_gguf)
    gen.add_argument("--export", default=None,
                     help="answer through llama.cpp from a folder written by ktm export --format gguf "
                          "(instead of --checkpoint)")
    # generate has --threads from the base-model options (PyTorch's threads; with --export llama.cpp's too)
    sv.add_argument("--threads", type=positive_int, default=None,
                    help="llama.cpp threads (llama.cpp exports; default: llama.cpp's choice)")
    for p in (gen, sv):
        p.add_argument("--n-ctx", type=positive_int, default=None,
                       help="llama.cpp positions per sequence, merged prompt + answer (default: the model's, "
                            "at most 8192)")
    _route(gen, lambda a: a.export is not None, cmd_generate_llamacpp)
    sv.add_argument("--max-prompt-tokens", type=positive_int, default=None,
                    help="llama.cpp exports: most tokens in one prompt, before merging (default: the model's limit)")
    sv.add_argument("--max-tokens", type=positive_int, default=1024,
                    help="llama.cpp exports: most new tokens one request may ask for (default: 1024)")
    sv.add_argument("--max-concurrent", type=positive_int, default=8,
                    help="llama.cpp exports: requests in flight at once; more get 429 (default: 8)")
    _route(sv, _is_llamacpp_export, cmd_serve_llamacpp)


def _is_llamacpp_export(args) -> bool:
    from ..serve.export import read_export
    from ..serve.gguf import ENGINE

    return read_export(args.export).get("engine") == ENGINE


def cmd_export_gguf(args) -> int:
    from ..serve.gguf import export_gguf

    if args.dtype != "float32":
        raise ValueError("--dtype is for --format hf; with --format gguf use --gguf-type")
    out = export_gguf(args.checkpoint, args.out, gguf_type=args.gguf_type, overwrite=args.overwrite,
                      base=args.model, trust_remote_code=args.trust_remote_code)
    print(f"exported {args.checkpoint} to {out} (llama.cpp, LoRA merged, {args.gguf_type}); run it with: "
          f"ktm generate --export {out} PROMPT, or ktm serve --export {out}")
    return 0


def cmd_generate_llamacpp(args) -> int:
    from ..model import PromptError
    from ..serve.llamacpp import LlamaCppEngine, Sampling

    given = [f"--{n.replace('_', '-')}" for n in ("checkpoint", "k", "model") if getattr(args, n, None) is not None]
    if given:
        raise ValueError(f"--export runs an exported model: leave out {', '.join(given)}")
    sampling = Sampling(args.sample, args.temperature, args.top_k, args.top_p, args.seed)
    engine = LlamaCppEngine(args.export, threads=args.threads, n_ctx=args.n_ctx)
    seen = 0
    for batch in batches(prompt_inputs(args), args.batch_size):  # decoded together in llama.cpp
        todo = [(i, item) for i, item in enumerate(batch) if item[1].strip()]  # a blank prompt gets an empty answer
        seeds = [Sampling(**{**vars(sampling), "seed": args.seed + seen + i}) for i, _ in todo]
        try:
            done = engine.generate([p for _, (_, p) in todo], args.max_new_tokens, seeds, batch_size=args.batch_size)
        except PromptError as e:
            raise ValueError(f"{todo[e.index][1][0]}: the prompt {e.detail} (the answers of the batches before "
                             f"it were written)") from e
        answers = dict(zip([i for i, _ in todo], done))
        for i, (_, prompt) in enumerate(batch):
            _print_answer(args, prompt, answers.get(i))
        seen += len(batch)
        sys.stdout.flush()
    return 0


def _print_answer(args, prompt: str, done) -> None:
    text = done.text if done else ""
    if args.json:
        print(json.dumps({"prompt": prompt, "output": text, "merged_length": done.merged_length if done else 0,
                          "finish_reason": done.finish_reason if done else None,
                          "seconds": done.timings if done else None}))
    else:
        print(escape_line(text))


def cmd_serve_llamacpp(args) -> int:
    from ..serve.http import Limits, make_server
    from ..serve.llamacpp import LlamaCppEngine

    if args.vllm_args:
        raise ValueError(f"{args.export} is a llama.cpp export, served by ktm itself: options after -- are for vLLM")
    if args.max_model_len is not None:
        raise ValueError("--max-model-len is vLLM's; for a llama.cpp export use --n-ctx")
    limits = Limits(max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens,
                    max_concurrent=args.max_concurrent)
    if args.dry_run:
        print(f"ktm's own OpenAI-compatible server (llama.cpp) on {args.export} at http://{args.host}:{args.port}; "
              f"{limits}")
        return 0
    engine = LlamaCppEngine(args.export, threads=args.threads, n_ctx=args.n_ctx)
    server = make_server(engine, args.host, args.port, limits, name=args.name)
    print(f"ktm: serving {server.name} (K = {engine.k}, llama.cpp, {engine.threads} threads) on "
          f"http://{args.host}:{server.server_address[1]}/v1", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        return 130
    finally:
        server.server_close()
        engine.close()
    return 0
