"""Several ``ktm train`` runs side by side on one GPU, sized to fit a time budget.

    python benchmarks/gpu/tree_runs.py probe --model FOLDER --out /tmp/probe
    python benchmarks/gpu/tree_runs.py run --model FOLDER --out /tmp/runs --budget 260 \
        --probe /tmp/probe/probe.json

A small model on a GPU is launch-bound: one training process leaves the GPU mostly idle,
so the runs of a comparison go in parallel, one process each.

* ``probe`` starts the same mix of processes as ``run`` (for each seed: K = 1 fast, K = 4
  fast, K = 4 with a teacher) for a few steps and writes the measured seconds per step of a
  plain and of a teacher-aligned step under that load to ``OUT/probe.json``.
* ``run`` chooses the step counts from those timings so that every run ends within
  ``--budget`` seconds, starts the runs (the ``fast`` recipe at K = 1 and K = 4, the
  ``hierarchical`` recipe at K = 4: teacher, K = 2, K = 4; each on the curriculum
  ``--stages``, one round per stage), waits, and copies every run's history.json,
  run_config.json and log (no weights) to ``OUT/summary``, with a table in
  ``OUT/summary/summary.md``. A run still going at ``--budget`` + ``--grace`` seconds is
  stopped; its history up to its last evaluation is kept (the trainer writes it at every
  evaluation).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

#: run name -> (recipe, K)
RUNS = {"k1-fast": ("fast", 1), "k4-fast": ("fast", 4), "k4-hier": ("hierarchical", 4)}
EVAL_OVERHEAD = 0.25  # share of a budget kept for evaluations, model loading and saving
CHAIN_SLACK = 0.85    # the hierarchical chain loads and evaluates three models: a further margin


def common_args(args, seed: int) -> list[str]:
    return ["--task", "tree", "--stage", *args.stages, "--batch-size", str(args.batch_size),
            "--eval-examples", str(args.eval_examples), "--device", args.device, "--dtype", args.dtype,
            "--model", args.model, "--seed", str(seed), "--max-rounds", "1", "--overwrite"]


def plan_steps(budget: float, plain_s: float, teacher_s: float, stages: int, most: int = 2000) -> dict:
    """Steps per stage for each run so that it ends within ``budget`` seconds.

    fast: ``stages`` rounds of plain steps; hierarchical: per stage, a K = 1 teacher (plain
    steps), then K = 2 and K = 4 (teacher-aligned steps), all three phases the same length.

    >>> plan_steps(100, 0.1, 0.2, 2)
    {'fast': 375, 'hierarchical': 63}
    """
    teacher_s = max(teacher_s, plain_s)  # an aligned step also runs the teacher
    usable = budget * (1 - EVAL_OVERHEAD)
    fast = int(usable / (stages * plain_s))
    hier = int(CHAIN_SLACK * usable / (stages * (plain_s + 2 * teacher_s)))
    return {"fast": min(most, fast), "hierarchical": min(most, hier)}


def eval_every(steps: int, evaluations: int = 4) -> int:
    """An evaluation interval giving about ``evaluations`` points per stage (at least 5 steps)."""
    return max(5, round(steps / evaluations / 5) * 5)


def command(args, name: str, seed: int, steps: int, folder: Path) -> list[str]:
    recipe, k = RUNS[name]
    cmd = [sys.executable, "-m", "ktm.cli", "train", "--recipe", recipe, "--k", str(k),
           "--steps", str(steps), "--eval-every", str(eval_every(steps)), "--out", str(folder),
           *common_args(args, seed)]
    if recipe == "hierarchical":
        cmd += ["--teacher-steps", str(steps), "--grow-steps", str(steps)]
    return cmd


def launch(cmds: dict[str, list[str]], out: Path, deadline_s: float) -> dict[str, int | None]:
    """Run the commands in parallel, each logging to OUT/NAME.log; stop what is still
    running after ``deadline_s``. Returns each run's exit status (None: stopped)."""
    procs = {}
    for name, cmd in cmds.items():
        log = open(out / f"{name}.log", "w")
        log.write(" ".join(cmd) + "\n")
        log.flush()
        procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log)
    t0 = time.monotonic()
    while any(p.poll() is None for p, _ in procs.values()) and time.monotonic() - t0 < deadline_s:
        time.sleep(1)
    codes = {}
    for name, (p, log) in procs.items():
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
            codes[name] = None
        else:
            codes[name] = p.returncode
        log.close()
    print(f"runs finished after {time.monotonic() - t0:.0f} s: {codes}", flush=True)
    return codes


def histories(folder: Path) -> dict[str, list]:
    """The history of each phase of a run folder: main, teacher, grow-k2, ..."""
    found = {}
    for name, sub in [("main", folder), ("teacher", folder / "teacher"),
                      *[(p.name, p) for p in sorted(folder.glob("grow-k*"))]]:
        f = sub / "history.json"
        if f.is_file():
            found[name] = json.loads(f.read_text())["history"]
    return found


def cmd_probe(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cmds = {}
    for seed in args.seeds:
        for name in RUNS:
            recipe, k = RUNS[name]
            folder = out / f"{name}-s{seed}"
            cmd = [sys.executable, "-m", "ktm.cli", "train", "--recipe", "teacher" if k > 1 and recipe != "fast" else recipe,
                   "--k", str(k), "--steps", str(args.steps), "--eval-every", "0", "--out", str(folder),
                   *common_args(args, seed)]
            cmd[cmd.index("--stage") + 1:cmd.index("--batch-size")] = [args.stages[0]]
            cmd[cmd.index("--eval-examples") + 1] = "16"
            if "teacher" in cmd:
                cmd += ["--teacher-steps", "5"]
            cmds[folder.name] = cmd
    codes = launch(cmds, out, args.deadline)
    per = {}
    for name in cmds:
        h = histories(out / name).get("main")
        if h:
            per[name] = h[-1]["elapsed_s"] / h[-1]["step"]
    plain = [v for n, v in per.items() if "hier" not in n]
    teacher = [v for n, v in per.items() if "hier" in n]
    result = {"seconds_per_step": per, "codes": codes, "batch_size": args.batch_size, "parallel": len(cmds),
              "plain_s": max(plain) if plain else None, "teacher_s": max(teacher) if teacher else None}
    (out / "probe.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0 if plain and teacher else 1


def cmd_run(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.probe:
        probe = json.loads(Path(args.probe).read_text())
        plain_s, teacher_s = probe["plain_s"], probe["teacher_s"]
    else:
        plain_s, teacher_s = args.plain_s, args.teacher_s
    if not plain_s or not teacher_s:
        raise SystemExit("tree_runs: no step timings (give --probe FILE or --plain-s and --teacher-s)")
    steps = plan_steps(args.budget, plain_s, teacher_s, len(args.stages))
    print(f"plan for {args.budget:.0f} s ({plain_s:.3f} s per plain step, {teacher_s:.3f} with a teacher): "
          f"{steps} steps per stage", flush=True)
    cmds = {f"{name}-s{seed}": command(args, name, seed, steps[RUNS[name][0]], out / f"{name}-s{seed}")
            for seed in args.seeds for name in RUNS}
    codes = launch(cmds, out, args.budget + args.grace)
    summary = out / "summary"
    summary.mkdir(exist_ok=True)
    rows = []
    for name in cmds:
        folder = out / name
        shutil.copy(out / f"{name}.log", summary / f"{name}.log")
        if (folder / "run_config.json").is_file():
            shutil.copy(folder / "run_config.json", summary / f"{name}.run_config.json")
        phases = histories(folder)
        (summary / f"{name}.history.json").write_text(json.dumps(phases, indent=1) + "\n")
        for phase, h in phases.items():
            best = max(h, key=lambda r: r.get("value", 0))
            rows.append(f"| {name} | {phase} | {codes[name]} | {h[-1]['step']} | {h[-1]['task']} | "
                        f"{100 * h[-1]['value']:.1f} | {100 * best['value']:.1f} (step {best['step']}) | "
                        f"{h[-1]['elapsed_s']:.0f} |")
    table = ["| run | phase | exit | last step | last task | last accuracy % | best % | seconds |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |", *rows]
    meta = {"plan": steps, "plain_s": plain_s, "teacher_s": teacher_s, "budget": args.budget,
            "batch_size": args.batch_size, "stages": args.stages, "seeds": args.seeds, "codes": codes,
            "commands": {n: " ".join(c[2:]) for n, c in cmds.items()}}
    (summary / "plan.json").write_text(json.dumps(meta, indent=1) + "\n")
    (summary / "summary.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("probe", "run"):
        s = sub.add_parser(name)
        s.add_argument("--model", required=True, help="base model folder")
        s.add_argument("--out", required=True)
        s.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
        s.add_argument("--stages", nargs="+", default=["small", "xsmall"])
        s.add_argument("--batch-size", type=int, default=64)
        s.add_argument("--eval-examples", type=int, default=196)
        s.add_argument("--device", default="cuda")
        s.add_argument("--dtype", default="float32", help="weights (training autocasts to bf16 on CUDA)")
    pr = sub.choices["probe"]
    pr.add_argument("--steps", type=int, default=30)
    pr.add_argument("--deadline", type=float, default=120)
    pr.set_defaults(func=cmd_probe)
    rn = sub.choices["run"]
    rn.add_argument("--budget", type=float, required=True, help="seconds the runs may take")
    rn.add_argument("--grace", type=float, default=30, help="seconds past the budget before runs are stopped")
    rn.add_argument("--probe", help="probe.json with the step timings")
    rn.add_argument("--plain-s", type=float, help="seconds per plain step (without --probe)")
    rn.add_argument("--teacher-s", type=float, help="seconds per teacher-aligned step (without --probe)")
    rn.set_defaults(func=cmd_run)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
