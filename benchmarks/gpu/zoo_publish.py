"""Publish a merger pretrained on a lent GPU from what came back: its ``model/`` folder and history.

``zoo_session.sh 3`` builds and publishes on the device; where the call ran out of time before
its publishing finished, what comes back is the run's ``model/`` (the trained weights, float32),
``history.json`` and ``run_config.json``. This script turns them into a published merger, on
the CPU, with the card that ``ktm zoo build`` writes: it stages the weights with a card that
holds the run's settings, step and history, then runs :func:`ktm.train.zoo.build` with
``resume`` (no checkpoint: it continues from the staged merger at its own step, so nothing
more is trained) which writes the slim bfloat16 copy and measures it::

    python benchmarks/gpu/zoo_publish.py /work/zoo-runs/gpu/run-k4 default-k4 --into /work/zoo-runs/gpu/zoo \\
        --train batch_size=64 save_every=200 max_minutes=7.5 --gpu "one NVIDIA H200 (torch 2.11.0+cu130)"

The card's ``machine`` names both: the GPU that trained and the machine that measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path


def value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="the run folder that came back (model/, history.json)")
    p.add_argument("name", help="the zoo entry, e.g. default-k4")
    p.add_argument("--into", type=Path, required=True, help="write INTO/NAME (copy it into src/ktm/mergers after)")
    p.add_argument("--train", nargs="*", default=[], help="the training overrides of the GPU run, KEY=VALUE")
    p.add_argument("--gpu", required=True, help="the GPU that trained, for the card's machine line")
    p.add_argument("--device-flag", default="cuda", help="--device of the command that trained")
    p.add_argument("--steps-flag", default="100000", help="--steps of the command that trained")
    p.add_argument("--fidelity-windows", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from ktm.config import save_json
    from ktm.train.zoo import CARD_NAME, build, get_entry, option_text

    entry = get_entry(args.name)
    train = dict(kv.split("=", 1) for kv in args.train)
    train = {k: value(v) for k, v in train.items()}
    history = json.loads((args.run / "history.json").read_text())["history"]
    staged = args.into / "staged" / args.name
    shutil.rmtree(staged, ignore_errors=True)
    shutil.copytree(args.run / "model", staged)
    settings = {"recipe": entry.recipe, "model": entry.model, "train": {**entry.train, **train}}
    (staged / CARD_NAME).write_text(json.dumps({"settings": settings, "pretrain_steps": history[-1]["step"],
                                                "history": history}))
    command = (f"ktm zoo build {args.name} --out RUN --device {args.device_flag} --steps {args.steps_flag}"
               f"{option_text(train)}")
    out = args.into / "publish-run" / args.name
    shutil.rmtree(out, ignore_errors=True)
    folder, card = build(entry, out, into=args.into / "staged", device="cpu", resume=True,
                         steps=history[-1]["step"], train=train, command=command,
                         fidelity_windows=args.fidelity_windows)
    card["machine"] = f"trained on {args.gpu}; slimmed and measured on {card['machine']}"
    card["restarts"] = []  # the continuation only published: no step was trained after it
    save_json(folder / CARD_NAME, card)
    final = args.into / args.name
    shutil.rmtree(final, ignore_errors=True)
    shutil.move(str(folder), final)
    print(f"published {final}: {json.dumps(card.get('fidelity'))}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
