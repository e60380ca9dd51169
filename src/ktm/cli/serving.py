"""``ktm export``, ``ktm encode`` and ``ktm serve`` (``ktm.serve``)."""

import sys
from pathlib import Path

from .generate import prompt_inputs
from .options import TRUST_HELP, positive_int


# ---------------------------------------------------------------- serving (ktm.serve.export, ktm.serve.serving)
def cmd_export(args) -> int:
    from ..serve.export import export_model

    out = export_model(args.checkpoint, args.out, overwrite=args.overwrite, dtype=args.dtype, base=args.model,
                       trust_remote_code=args.trust_remote_code)
    print(f"exported {args.checkpoint} to {out} (LoRA merged, {args.dtype}); serve it with: ktm serve --export {out}")
    return 0


def cmd_encode(args) -> int:
    from ..checkpoint import CONFIG_NAME, resolve_folder
    from ..serve.export import SERVING_CONFIG
    from ..model import KTokenMerging, PromptError
    from ..serve.serving import PromptEncoder, encode_prompts, save_embeds

    folder = resolve_folder(args.checkpoint)  # a path, or zoo:NAME
    if (folder / SERVING_CONFIG).is_file():
        model = PromptEncoder.from_export(folder, device=args.device, trust_remote_code=args.trust_remote_code)
    elif not (folder / CONFIG_NAME).is_file():
        raise ValueError(f"{folder} is neither an export folder ({SERVING_CONFIG}, written by ktm export) nor a "
                         f"saved ktm model folder ({CONFIG_NAME})" if folder.is_dir() else f"no folder {folder}")
    else:
        model = KTokenMerging.from_pretrained(folder, base=args.model, device=args.device, dtype=args.dtype,
                                              trust_remote_code=args.trust_remote_code).eval()
    tensors = []
    for where, prompt in prompt_inputs(args):
        try:
            tensors.extend(encode_prompts(model, [prompt]))
        except PromptError as e:  # name the argument or input line, not "prompt 0"
            raise ValueError(f"{where}: {e.detail}") from e
    if not tensors:
        raise ValueError("no prompts to encode: give them as arguments or one per line on stdin")
    save_embeds(args.out, tensors, {"format": "ktm-prompt-embeds", "k": model.k, **source_record(args.checkpoint, folder)})
    lengths = [t.shape[0] for t in tensors]
    print(f"wrote {len(tensors)} prompt embeddings to {args.out} (tensors '0' to '{len(tensors) - 1}', "
          f"{min(lengths)}-{max(lengths)} positions x {tensors[0].shape[1]}, float32, K = {model.k})")
    return 0


def source_record(reference: str, folder: Path) -> dict:
    """What ``ktm encode`` records of the folder it encoded with, portable across machines:
    ``source``, ``zoo:NAME`` or the folder's own name (never its absolute path), and
    ``source_sha256``, the SHA-256 of its ``ktm_serving.json`` or ``ktm_config.json``, which
    in turn records the SHA-256 of the encoder (and LoRA) weights."""
    from ..checkpoint import CONFIG_NAME, ZOO_PREFIX, file_sha256
    from ..serve.export import SERVING_CONFIG

    name = reference if str(reference).startswith(ZOO_PREFIX) else folder.resolve().name
    config = folder / SERVING_CONFIG if (folder / SERVING_CONFIG).is_file() else folder / CONFIG_NAME
    return {"source": name, "source_sha256": file_sha256(config)}


def cmd_serve(args) -> int:
    import shlex
    import subprocess

    from ..serve.serving import exposure_warning, serve_command, vllm_executable

    cmd = serve_command(args.export, max_model_len=args.max_model_len, name=args.name, host=args.host,
                        port=args.port, extra=args.vllm_args)
    warning = exposure_warning(args.host, args.vllm_args)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    cmd[0] = vllm_executable()
    print(f"ktm: running {shlex.join(cmd)}", file=sys.stderr, flush=True)
    try:
        return subprocess.run(cmd).returncode
    except KeyboardInterrupt:
        return 130


def add_parser(sub) -> None:
    ex = sub.add_parser(
        "export", help="a trained model as a plain Hugging Face model folder for serving (LoRA merged)",
        description="Write OUT: the checkpoint's LLM with its LoRA merged into the weights (loadable by "
                    "AutoModelForCausalLM, vLLM and others), its tokenizer, the merge encoder "
                    "(ktm_encoder.safetensors) and ktm_serving.json (K and how prompts are merged). See "
                    "docs/SERVING.md.")
    ex.add_argument("--checkpoint", required=True, help="a saved ktm model folder (e.g. OUT/model of ktm train)")
    ex.add_argument("--out", required=True, help="the export folder to write")
    ex.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    ex.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                    help="dtype of the saved weights (the LoRA is merged in float32; default: float32)")
    ex.add_argument("--model", default=None, help="the base model, when not the one saved in the checkpoint")
    ex.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    ex.set_defaults(func=cmd_export)

    en = sub.add_parser(
        "encode", help="prompts -> merged prompt embeddings (a safetensors file) for a prompt-embeds server",
        description="Write one float32 tensor per prompt, named 0, 1, ... in input order, each of shape "
                    "(merged length, hidden size): what merge_prompts gives for that prompt alone. Prompts "
                    "are the arguments, or else the lines of stdin.")
    en.add_argument("prompt", nargs="*", help="prompts (default: one per line of stdin)")
    en.add_argument("--checkpoint", required=True,
                    help="an export folder (ktm export: only the tokenizer, embedding table and encoder are "
                         "loaded) or a saved ktm model folder (loads the whole model)")
    en.add_argument("--out", required=True, help="the .safetensors file to write")
    en.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    en.add_argument("--dtype", default="float32", help="a saved ktm model's dtype (default: float32)")
    en.add_argument("--model", default=None, help="a saved ktm model's base model, when not the saved one")
    en.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    en.set_defaults(func=cmd_encode)

    sv = sub.add_parser(
        "serve", help="start vLLM's OpenAI-compatible server on an export folder (needs vLLM: k-token-merging[serve])",
        usage="ktm serve --export DIR [options] [-- VLLM_SERVE_OPTIONS ...]",
        description="Runs `vllm serve DIR --enable-prompt-embeds ...`; options after -- go to vllm serve. "
                    "Prompt embeddings are for trusted clients: the server listens on 127.0.0.1 unless --host "
                    "says otherwise. See docs/SERVING.md.")
    sv.add_argument("--export", required=True, help="a folder written by ktm export")
    sv.add_argument("--name", default=None, help="the served model name (default: the folder's name)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    sv.add_argument("--port", type=positive_int, default=8000)
    sv.add_argument("--max-model-len", type=positive_int, default=None,
                    help="most positions per sequence, merged prompt + answer (default: the model's)")
    sv.add_argument("--dry-run", action="store_true", help="print the vllm serve command instead of running it")
    sv.add_argument("vllm_args", nargs="*", metavar="VLLM_SERVE_OPTIONS", help="after --: more vllm serve options")
    sv.set_defaults(func=cmd_serve)
