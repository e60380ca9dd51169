"""``ktm generate``: answer prompts (arguments, or one per line of stdin), one output line each."""

import json
import sys

from .options import add_base_args, positive_float, positive_int, probability


#: text-mode escapes of ``ktm generate``: every character that would end a line (for
#: ``str.splitlines``) and the backslash, so that each answer stays on its own line
_LINE_ESCAPES = {ord("\\"): "\\\\", ord("\n"): "\\n", ord("\r"): "\\r",
                 **{ord(c): f"\\x{ord(c):02x}" for c in "\x0b\x0c\x1c\x1d\x1e\x85"},
                 **{ord(c): f"\\u{ord(c):04x}" for c in "\u2028\u2029"}}


def escape_line(text: str) -> str:
    """``text`` on one line: a backslash becomes ``\\\\``, a newline ``\\n``, a carriage return
    ``\\r``, and the other line-breaking characters ``\\xNN`` / ``\\uNNNN`` (Python's escapes)."""
    return text.translate(_LINE_ESCAPES)


def prompt_inputs(args):
    """(where, prompt) pairs: the prompt arguments, else stdin's lines as they arrive (each
    without its line ending); ``where`` names it in error messages."""
    if args.prompt:
        for i, p in enumerate(args.prompt, 1):
            try:
                p.encode("utf-8")  # the shell's bytes that were not UTF-8 are lone surrogates here
            except UnicodeEncodeError as e:
                raise ValueError(f"prompt argument {i}: not UTF-8 text (character {e.start})") from None
            yield f"prompt argument {i}", p
        return
    stream = getattr(sys.stdin, "buffer", None)  # bytes, so a bad line is named, not a traceback
    for n, line in enumerate(stream if stream is not None else sys.stdin, 1):
        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"input line {n}: not UTF-8 text (byte {e.start}: {line[e.start:e.start + 1]!r})") from None
        yield f"input line {n}", line.removesuffix("\n").removesuffix("\r")


def batches(items, size: int):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def cmd_generate(args) -> int:
    import re

    import torch

    from ..checkpoint import read_config
    from ..hub import resolve
    from ..model import KTokenMerging, PromptError, check_sampling

    check_sampling(args.sample, args.temperature, args.top_k, args.top_p)
    if args.checkpoint:
        saved_k = read_config(resolve(args.checkpoint))["model"].get("k")  # a folder, zoo:NAME or hub id
        if args.k is not None and args.k != saved_k:
            raise ValueError(f"--k {args.k} does not match --checkpoint {args.checkpoint}, which was trained "
                             f"for K = {saved_k} (the checkpoint fixes K): leave --k out")
        model = KTokenMerging.from_pretrained(args.checkpoint, base=args.model, device=args.device, dtype=args.dtype,
                                              trust_remote_code=args.trust_remote_code)
    else:
        model = KTokenMerging.from_base(args.model, k=args.k or 4, device=args.device, dtype=args.dtype,
                                        trust_remote_code=args.trust_remote_code)
    gen = torch.Generator(device=model.device).manual_seed(args.seed) if args.sample else None
    # one output line per input line, in order, written batch by batch as the input arrives
    for batch in batches(prompt_inputs(args), args.batch_size):
        todo = [item for item in batch if item[1].strip()]  # a blank prompt gets an empty answer
        try:
            outs = model.generate([p for _, p in todo], max_new_tokens=args.max_new_tokens,
                                  do_sample=args.sample, temperature=args.temperature, top_k=args.top_k,
                                  top_p=args.top_p, generator=gen) if todo else []
        except PromptError as e:  # name the input line, not the batch row
            raise ValueError(f"{todo[e.index][0]}: the prompt {e.detail} (the answers of the batches "
                             f"before it were written; shorten or leave out that prompt)") from e
        answers = iter(outs)
        for _, p in batch:
            o = next(answers) if p.strip() else ""
            if args.json:
                print(json.dumps({"prompt": p, "output": o,
                                  "merged_length": model.compressed_length(p) if p.strip() else 0}))
            else:
                print(escape_line(o))
        sys.stdout.flush()
    return 0


def add_parser(sub) -> None:
    g = sub.add_parser(
        "generate", help="answer prompts (arguments, or one per line on stdin)",
        description="Answer each prompt: the prompt arguments, or else each line of stdin. Exactly one "
                    "output line per prompt, in order: a blank prompt (empty or only whitespace) is not "
                    "run and gets an empty line. In text mode an answer's backslashes are written as "
                    "\\\\, its newlines as \\n, its carriage returns as \\r and other line-breaking "
                    "characters as \\xNN or \\uNNNN, so every answer stays on one line; --json writes one "
                    "JSON object per line instead. stdin is answered in batches of --batch-size lines as "
                    "they arrive, and each batch's answers are flushed before the next is read. A prompt "
                    "the model rejects (too long) ends the command with an error naming its line; the "
                    "answers before its batch have been written.")
    g.add_argument("prompt", nargs="*", help="prompts to answer (default: one per line of stdin)")
    g.add_argument("--batch-size", type=positive_int, default=16,
                   help="prompts answered together; a batch of stdin lines is answered once it is full "
                        "or stdin ends (use 1 to answer each line as soon as it is typed; default: 16)")
    g.add_argument("--checkpoint", help="a saved ktm model folder (default: an untrained model)")
    g.add_argument("--k", type=positive_int, default=None,
                   help="K for an untrained model (default: 4); with --checkpoint it must be the checkpoint's K")
    g.add_argument("--max-new-tokens", type=positive_int, default=32)
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=positive_float, default=1.0, help="sampling temperature (needs --sample)")
    g.add_argument("--top-k", type=positive_int, default=None, help="sample from the K likeliest tokens (needs --sample)")
    g.add_argument("--top-p", type=probability, default=None,
                   help="nucleus sampling: the likeliest tokens up to this probability, in (0, 1] (needs --sample)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--json", action="store_true", help="one JSON object per prompt")
    add_base_args(g)
    g.set_defaults(func=cmd_generate)
