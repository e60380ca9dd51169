"""``ktm zoo list|build``: the pretrained mergers that ship with ktm (``ktm.train.zoo``)."""

from .options import add_threads_arg, positive_int


def cmd_zoo_list(args) -> int:
    from .. import checkpoint
    from ..train.fidelity import fidelity_line
    from ..train.zoo import describe_shipped

    rows = describe_shipped()
    if not rows:
        print(f"no mergers ship in {checkpoint.MERGERS_DIR}; build one with: ktm zoo build NAME --out RUN")
        return 0
    for r in rows:
        held, dt = r["held_out"], r["weights_dtype"]
        ppl = ""
        if f"merged_perplexity_{dt}" in held:
            ppl = (f"merged {held[f'merged_perplexity_{dt}']:.2f} ({dt}; float32 "
                   f"{held.get('merged_perplexity_float32', float('nan')):.2f}), plain prompt "
                   f"{held.get('plain_perplexity', float('nan')):.2f}, no prompt "
                   f"{held.get('no_prompt_perplexity', float('nan')):.2f} ({held.get('windows', '?')} windows)")
        print(f"zoo:{r['name']}  K = {r['k']}, base {r['base']!r}, {r['weights_dtype']}, "
              f"{r['bytes'] / 2**20:.1f} MiB")
        if r["summary"]:
            print(f"  {r['summary']}")
        if ppl:
            print(f"  held-out continuation perplexity: {ppl}")
        if r.get("fidelity"):
            print(f"  fidelity on held-out prose: {fidelity_line(r['fidelity'])}")
        if r.get("tokens_seen"):
            print(f"  pretrained on {r['tokens_seen'] / 1e6:.1f} M tokens of {', '.join(r['text'])} "
                  f"({r['pretrain_steps']} steps, {r['hours']})")
        if r["command"]:
            print(f"  rebuilt by: {r['command']}")
        print(f"  start a task from it: ktm train --init-from zoo:{r['name']} --k {r['k']} ...")
    return 0


def cmd_zoo_build(args) -> int:
    from tqdm.auto import tqdm

    from ..train.zoo import build

    folder, card = build(args.name, args.out, into=args.into, text=args.text, base=args.model, device=args.device,
                         dtype=args.dtype, resume=args.resume, overwrite=args.overwrite, log=tqdm.write,
                         steps=args.steps, fidelity_windows=args.fidelity_windows,
                         train={k: getattr(args, k) for k in ("batch_size", "grad_accum", "save_every", "eval_every", "max_minutes",
                                                                  "cooldown")
                                if getattr(args, k) is not None})
    print(f"wrote {folder} ({card['bytes'] / 2**20:.1f} MiB); use it as --init-from zoo:{args.name} "
          f"(or --init-from {folder})")
    return 0


def add_parser(sub) -> None:
    from ..train.zoo import ZOO

    z = sub.add_parser("zoo", help="pretrained mergers that ship with ktm (zoo:NAME): list them, or rebuild one")
    zsub = z.add_subparsers(dest="zoo_command", required=True)
    zl = zsub.add_parser("list", help="the shipped mergers, their size and held-out numbers")
    zl.set_defaults(func=cmd_zoo_list)
    zb = zsub.add_parser(
        "build", help="rebuild a shipped merger: ktm pretrain with its recorded settings, then a bf16 copy",
        description="Pretrain with the settings recorded for NAME (ktm.train.zoo.ZOO; resumable with --resume), "
                    "write the slim bfloat16 copy into the package's mergers/NAME (or --into DIR/NAME) with its "
                    "card zoo.json, and measure the held-out continuation perplexity of both copies.")
    zb.add_argument("name", choices=sorted(ZOO), help="the merger to build")
    zb.add_argument("--out", required=True, help="run folder of the pretraining (checkpoint/, model/, ...)")
    zb.add_argument("--into", default=None, help="write DIR/NAME instead of the package's own mergers folder")
    zb.add_argument("--text", nargs="+", default=None,
                    help="pretraining text instead of the recorded ../shared/data train files (same settings)")
    zb.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    zb.add_argument("--overwrite", action="store_true", help="discard a checkpoint already in OUT")
    zb.add_argument("--model", default=None, help="base model (default: the one recorded, the embedded SmolLM2)")
    zb.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    zb.add_argument("--dtype", default="float32", help="training dtype (default: float32, as recorded)")
    zb.add_argument("--steps", type=positive_int, default=None,
                    help="pretrain until this step and publish (default: the recorded total); a long run is "
                         "built in pieces, each continuing the last with --resume")
    zb.add_argument("--batch-size", type=positive_int, default=None,
                    help="windows per step instead of the recorded 8 (a GPU runs far more tokens per second "
                         "at 64); the card records it, and a run continues only with the same value")
    zb.add_argument("--grad-accum", type=positive_int, default=None,
                    help="split each step's batch into this many micro-batches (the same step in less memory: "
                         "a batch of 64 windows takes about 12 GB on a CPU, 8 micro-batches of 8 about 2 GB)")
    zb.add_argument("--save-every", type=positive_int, default=None,
                    help="steps between checkpoints instead of the recorded 20 (fast steps on a GPU "
                         "want fewer)")
    zb.add_argument("--max-minutes", type=float, default=None,
                    help="stop pretraining after this many minutes, then publish what it reached (a "
                         "machine lent for a fixed time); --resume continues it later")
    zb.add_argument("--eval-every", type=positive_int, default=None,
                    help="steps between held-out evaluations instead of the recorded 100 (a piece of few "
                         "large steps on a CPU wants more often)")
    zb.add_argument("--cooldown", type=positive_int, default=None,
                    help="anneal: the last N steps before --steps scale the rate linearly down to 0 (a last "
                         "piece of a long constant-rate run; continuing from its card stays allowed)")
    zb.add_argument("--fidelity-windows", type=positive_int, default=200,
                    help="held-out prose windows and reviews on which the card's fidelity is measured")
    add_threads_arg(zb)
    zb.set_defaults(func=cmd_zoo_build)
