"""Kill `ktm train` with SIGKILL at random moments, resume it each time, and check that the
finished model equals one trained without interruption (docs/RELIABILITY.md).

    python benchmarks/kill_and_resume.py --kills 6 --out docs/reliability/kill_and_resume

A tiny random Llama (the tests' character tokenizer) and 60 small trees keep it to a few
minutes on two CPU cores. Each run is killed once its checkpoint has reached a random step
ahead, after a further random 0-50 ms; the checkpoint is written at every step, so kills
fall inside training steps and inside checkpoint writes.
Prints and writes OUT.json and OUT.md: the step each kill left in the checkpoint, whether
every resume worked, and the largest difference between the two final models' weights.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tiny_base(folder: Path) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import char_tokenizer, tiny_llama  # the tests' tiny model, built offline

    tok = char_tokenizer()
    tiny_llama(len(tok), max_position_embeddings=512).save_pretrained(folder)
    tok.save_pretrained(folder)


def _train(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ktm.cli", "train", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _step(state: Path) -> int:
    """The checkpoint's step (0 while there is none or it is being replaced)."""
    try:
        return json.loads(state.read_text())["step"]
    except (OSError, ValueError, KeyError):
        return 0


def _weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return {**load_file(str(model_dir / "encoder.safetensors")),
            **load_file(str(model_dir / "adapter" / "adapter_model.safetensors"))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=6)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="ktm-kill-"))
    _tiny_base(work / "base")
    subprocess.run([sys.executable, "-m", "ktm.cli", "data", "tree", "--num-trees", "60", "--out",
                    str(work / "data")], check=True, stdout=subprocess.DEVNULL)
    common = ["--task", "jsonl", "--data", str(work / "data"), "--model", str(work / "base"), "--device", "cpu",
              "--dtype", "float32", "--k", "2", "--steps", str(args.steps), "--batch-size", "4",
              "--eval-every", "0", "--eval-examples", "8", "--save-every", "1"]
    t0 = time.perf_counter()
    ref = _train([*common, "--out", str(work / "ref")])
    ref.wait()
    full_s = time.perf_counter() - t0
    if ref.returncode:
        raise SystemExit(f"the uninterrupted run failed: {ref.stderr.read()[-500:]}")
    kills, failures = [], []
    state = work / "cut" / "checkpoint" / "trainer_state.json"
    # the kills' steps: random, spread over the run, each after the checkpoint the last one left
    targets = sorted(rng.sample(range(3, args.steps - 2), args.kills))
    for i, target in enumerate(targets):
        proc = _train([*common, "--out", str(work / "cut"), *(["--resume"] if i else [])])
        # kill once the checkpoint has reached the target step, a random moment later
        while proc.poll() is None and _step(state) < target:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.05))  # somewhere inside a step or a checkpoint write
        if proc.poll() is not None:
            failures.append(f"run {i} ended before its kill (exit {proc.returncode}): {proc.stderr.read()[-300:]}")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        done = _step(state)
        kills.append({"target_step": target, "checkpoint_step": done})
        print(f"kill {i + 1}: at step {target}, checkpoint left at step {done}", flush=True)
    last = _train([*common, "--out", str(work / "cut"), "--resume"])
    last.wait()
    if last.returncode:
        failures.append(f"the final resume failed: {last.stderr.read()[-500:]}")
    a, b = _weights(work / "ref" / "model"), _weights(work / "cut" / "model")
    diff = max(float((a[k] - b[k]).abs().max()) for k in a) if a.keys() == b.keys() else None
    result = {"kills": kills, "failures": failures, "steps": args.steps, "same_tensors": a.keys() == b.keys(),
              "max_abs_weight_difference": diff, "equal": diff == 0.0, "uninterrupted_s": round(full_s, 1)}
    print(json.dumps(result, indent=1))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        rows = "\n".join(f"| {i + 1} | {k['target_step']} | {k['checkpoint_step']} |" for i, k in enumerate(kills))
        out.with_suffix(".md").write_text(
            f"Command: `python benchmarks/kill_and_resume.py --kills {args.kills} --steps {args.steps} "
            f"--seed {args.seed} --out {args.out}`\n\n| kill | killed once the checkpoint reached step | checkpoint step left |\n| --- | --- | --- |\n"
            f"{rows}\n\nResumes that failed: {len(failures)}. Largest absolute difference between the final "
            f"weights and those of an uninterrupted run: {diff}.\n")
    return 0 if not failures and diff == 0.0 else 1


if __name__ == "__main__":
    sys.exit(main())
