"""``ktm demo``: the main job end to end on the embedded SmolLM2-135M-Instruct.

The default (:func:`run_amazon_demo`) answers "is merging worth it on real text?": on real
Amazon reviews it trains K-Token Merging at K = 4 beside ``plain`` (K = 1) and
``keep-first`` (the first quarter of each review: the same kept fraction), as a small
``ktm pareto`` grid, and prints accuracy, macro-F1, length reduction and the measured
prefill speedup side by side with a one-line verdict computed from them. 10-13 minutes
on 2 CPU cores.

``ktm demo --task tree`` (:func:`run_demo`) trains K = 4 on the Textualized Tree task
(stage ``small``) and prints accuracy beside the majority-class rate, the prompt lengths,
the prefill timing and a few generated answers.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..config import save_json
from ..train.evaluate import evaluate, subsample
from ..train.recipes import get_recipe
from ..tasks.tree import TreeTask, parse_question
from ..train.phases import train_run

#: training steps that fit the demo's ~10 minute budget on 2 CPU cores (K = 4, batch 16)
DEMO_STEPS = 250


def run_demo(steps: int | None = None, k: int = 4, out: str = "runs/demo", num_trees: int = 2000,
             recipe: str | None = None, eval_examples: int = 200, model=None, device="auto",
             stage: str = "small", log=print, trust_remote_code: bool | None = None) -> dict:
    """Run the demo; returns the numbers it prints."""
    t_start = time.perf_counter()
    rec = get_recipe(recipe)
    steps = steps or DEMO_STEPS
    log(f"ktm demo: Textualized Tree stage {stage!r}, K = {k}, recipe {rec.name!r}, {steps} steps")
    task = TreeTask(stage, num_trees=num_trees, seed=0)
    train, test = task.examples("train"), task.examples("test")
    log(f"data: {len(train)} training questions, {len(test)} held-out questions "
        f"({num_trees} trees, split 98/2 by tree)")

    log("loading the embedded base model ...")
    tcfg = rec.train_config(steps=steps, eval_every=max(50, steps // 5), eval_examples=eval_examples)
    t_train = time.perf_counter()
    # recipes with a K = 1 teacher or hierarchical growth train those phases first
    run = train_run(rec.model_config(k=k), tcfg, task, out, base=model, device=device, overwrite=True,
                    record={"recipe": rec.name}, log=log, trust_remote_code=trust_remote_code)
    train_s = time.perf_counter() - t_train
    m, trainer = run.model, run.trainer

    res = evaluate(m, task, max_examples=eval_examples, progress=False, keep_predictions=0)
    acc, maj = res["value"], res["majority_rate"]
    prompts = [e.prompt for e in subsample(test, 32, seed=1)]
    timing = prefill_comparison(m, prompts)
    shown = subsample(test, 6, seed=2)
    answers = m.generate([e.prompt for e in shown], max_new_tokens=3)

    log("")
    log("=" * 72)
    log(f"held-out accuracy (K = {k}, {res['n']} questions): {acc:.1%}")
    log(f"majority class (always {res['majority_label']!r}):        {maj:.1%}")
    margin = acc - maj
    if margin > 0.05:
        log(f"-> {margin:+.1%} over the majority class after {steps} steps")
    else:
        log(f"-> K = {k} is still at (or below) the majority class after {steps} steps "
            f"({margin:+.1%}). Merged prompts learn slowly with this recipe; with a K = 1 teacher, "
            f"`ktm train --recipe hierarchical --k 4 --grow-steps 600 --steps 900` learned K = 4 "
            f"with seed 0 in about 2 CPU hours; seed 1 did not (docs/RECIPES.md).")
    log(f"prompt length: {res['prompt_tokens']:.1f} tokens -> {res['merged_length']:.1f} merged "
        f"embeddings ({1 - res['merged_length'] / res['prompt_tokens']:.0%} shorter)")
    log(f"prefill of {len(prompts)} prompts (median of {timing['repeats']}): merged "
        f"{timing['merged_s'] * 1e3:.1f} ms (encoder {timing['encoder_s'] * 1e3:.1f} ms) vs unmerged "
        f"{timing['unmerged_s'] * 1e3:.1f} ms -> {timing['unmerged_s'] / timing['merged_s']:.2f}x faster")
    log("a few held-out questions:")
    for e, a in zip(shown, answers):
        tree, parent, child = parse_question(e.prompt)
        tree = tree.replace("\n", " | ")
        log(f"  tree [{tree}]  is {parent} the parent of {child}?  model {a.strip()!r}, reference {e.answer!r}")
    log(f"training {train_s / 60:.1f} min, total {(time.perf_counter() - t_start) / 60:.1f} min; "
        f"model saved in {Path(out) / 'model'}")
    summary = {"k": k, "steps": steps, "recipe": rec.name, "accuracy": acc, "majority_rate": maj,
               "prompt_tokens": res["prompt_tokens"], "merged_length": res["merged_length"],
               "prefill": timing, "train_seconds": train_s, "history": trainer.history,
               "threads": torch.get_num_threads()}
    save_json(Path(out) / "demo.json", summary)
    return summary



def prefill_comparison(model, prompts: list[str], repeats: int = 5) -> dict:
    """Median wall time of the prefill of ``prompts`` (time to first token from token ids):
    merged, encoder included, against the same LLM reading every token embedding
    (:func:`ktm.experiments.pareto.time_prefill`)."""
    from .pareto import time_prefill

    t = time_prefill(model, prompts, prompts, repeats, encoder=True)
    return {"merged_s": t["cell_s"], "encoder_s": t["encoder_s"], "unmerged_s": t["plain_s"], "repeats": repeats,
            "batch": len(prompts)}


#: the amazon demo's budget: 60 steps of 8 reviews cut to 200 characters, 200 test reviews, every
#: run at the fine-tuning rate measured for a pretrained merger (docs/RECIPES.md), plain included
AMAZON_DEMO = dict(steps=60, batch_size=8, review_chars=200, eval_examples=200, lr=3e-4)
#: where the project's offline reviews are looked for (relative to the working directory
#: and to the repository that holds this package)
_SHARED_REVIEWS = Path("shared") / "data" / "amazon"


def default_reviews() -> Path:
    """The 12,000 + 1,000 real reviews of ``../shared/data/amazon`` when they are there."""
    here = Path(__file__).resolve()
    for root in (Path.cwd().parent, Path.cwd(), *here.parents):
        if (root / _SHARED_REVIEWS / "train.jsonl").is_file():
            return root / _SHARED_REVIEWS
    raise ValueError("ktm demo needs real reviews: pass --reviews FOLDER (train.jsonl and test.jsonl with "
                     "'rating' and 'text'), for example one written by `ktm data amazon --source "
                     "McAuley-Lab/Amazon-Reviews-2023 --out FOLDER`; or run `ktm demo --task tree`")


def run_amazon_demo(reviews=None, out: str = "runs/demo-amazon", k: int = 4, steps: int | None = None,
                    eval_examples: int | None = None, recipe: str | None = None, model=None, device="auto",
                    log=print, progress: bool = True, trust_remote_code: bool | None = None,
                    llamacpp: bool = True, from_zoo: bool = True) -> dict:
    """Train and score plain, merge at K and keep-first at K on real reviews; print the
    comparison and a verdict; then (``llamacpp``, with llama-cpp-python installed) answer a few
    reviews with the merged model through llama.cpp. Returns ``{"rows": ..., "verdict": ...}``.
    The merged model starts from the pretrained merger that ships for K (``zoo:default-kK``) when
    ``from_zoo``, the base is the embedded model and one ships; else from the block mean.
    A rerun with the same settings reuses the finished runs in ``out`` (a ``ktm pareto`` grid)."""
    from .pareto import GridConfig, run_grid
    from .pareto_report import score_rows
    from ..train.recipes import get_recipe

    t0 = time.perf_counter()
    reviews = Path(reviews) if reviews else default_reviews()
    cfg = {**AMAZON_DEMO, **{n: v for n, v in dict(steps=steps, eval_examples=eval_examples).items() if v}}
    start = shipped_start(k, model) if from_zoo else None
    grid = GridConfig(task="amazon", task_options={"reviews": str(reviews), "review_chars": cfg["review_chars"]},
                      recipe=get_recipe(recipe).name, steps=cfg["steps"], batch_size=cfg["batch_size"],
                      eval_examples=cfg["eval_examples"], model=model, dtype="float32", lr=cfg["lr"],
                      init_from={str(k): start} if start else {})
    log(f"ktm demo: real Amazon reviews from {reviews} (each cut to {cfg['review_chars']} characters); "
        f"plain K = 1, K-Token Merging K = {k} (from {start or 'the block mean'}) and keep-first K = {k}, "
        f"{cfg['steps']} steps of {cfg['batch_size']} each at lr {cfg['lr']:g}, scored on {cfg['eval_examples']} "
        f"held-out reviews")
    rows = score_rows(run_grid(grid, ["merge", "keep-first"], [k], out, device=device, progress=progress, log=log,
                               trust_remote_code=trust_remote_code))
    verdict = amazon_verdict(rows)
    log("")
    log("=" * 78)
    log(comparison_table(rows))
    log(f"majority class (always {rows[0]['majority_label']!r}): {rows[0]['majority_rate']:.1%} of the "
        f"{rows[0]['n']} test reviews")
    log("verdict: " + verdict)
    if model is None:
        for line in shipped_fidelity_lines():
            log(line)
    hint = shipped_merger_hint(reviews, cfg, model, k)
    if hint:
        log(hint)
    on_llamacpp = llamacpp_step(rows, grid, out, log) if llamacpp else None
    log(f"total {(time.perf_counter() - t0) / 60:.1f} min; the runs, pareto.md and pareto.png are in {out}")
    summary = {"rows": rows, "verdict": verdict, "grid": grid.key(), "threads": torch.get_num_threads(),
               "llamacpp": on_llamacpp}
    save_json(Path(out) / "demo.json", summary)
    return summary


def llamacpp_step(rows: list[dict], grid, out, log, n: int = 4) -> dict | None:
    """The merged model of the grid answers ``n`` held-out reviews through llama.cpp
    (:func:`ktm.experiments.demo_llamacpp.llamacpp_showcase`)."""
    from .demo_llamacpp import llamacpp_showcase
    from .pareto import CELLS_DIR
    from ..tasks.amazon import AmazonTask

    merge = next(r for r in rows if r["method"] == "merge")
    task = AmazonTask(grid.task_options["reviews"], max_chars=grid.task_options["review_chars"])
    examples = task.examples("test")[:n]
    model_dir = Path(out) / CELLS_DIR / merge["cell"] / "run" / "model"
    return llamacpp_showcase(model_dir, examples, Path(out) / "llamacpp", threads=torch.get_num_threads(), log=log)


def shipped_start(k: int, model=None) -> str | None:
    """``zoo:default-kK`` where that merger ships and the base is the embedded model (``model``
    None), else None."""
    from ..checkpoint import shipped_mergers

    name = f"default-k{k}"
    return f"zoo:{name}" if model is None and name in shipped_mergers() else None


def shipped_fidelity_lines() -> list[str]:
    """One line per shipped merger with the fidelity its card records (held-out prose, no task
    training), to read beside the task numbers."""
    from ..train.fidelity import fidelity_line
    from ..train.zoo import describe_shipped

    return [f"zoo:{r['name']} before any task training: {fidelity_line(r['fidelity'])}"
            for r in describe_shipped() if r.get("fidelity")]


def shipped_merger_hint(reviews, cfg: dict, model=None, k: int = 4) -> str | None:
    """The next command to try on the embedded model (``model`` None): the other shipped K (2
    after a demo at K != 2, else 4) started from its pretrained merger (``zoo:default-kK``), at
    the demo's fine-tuning rate; None when it does not ship or another base model is used."""
    other = 2 if k != 2 else 4
    start = shipped_start(other, model)
    if start is None:
        return None
    return (f"next: K = {other} started from the pretrained merger that ships with ktm ({start}; measured in "
            f"docs/RECIPES.md): ktm train --task amazon --reviews {reviews} --review-chars {cfg['review_chars']} "
            f"--k {other} --init-from {start} --lr {cfg['lr']:g} --encoder-lr {cfg['lr']:g} --steps {cfg['steps']} "
            f"--batch-size {cfg['batch_size']} --eval-examples {cfg['eval_examples']} --out runs/demo-k{other}-zoo")


def comparison_table(rows: list[dict]) -> str:
    """The demo's side-by-side lines: accuracy, macro-F1, length reduction, speedup."""
    lines = [f"{'method':<22}{'accuracy':>9}{'macro-F1':>10}{'positions':>11}{'reduction':>11}"
             f"{'prefill':>10}{'train':>9}"]
    for r in rows:
        name = "plain (K = 1)" if r["method"] == "plain" else f"{r['method']} (K = {r['k']})"
        lines.append(f"{name:<22}{r['value']:>9.1%}{r['macro_f1']:>10.3f}{r['llm_positions']:>11.1f}"
                     f"{r['length_reduction']:>11.0%}{r['prefill_speedup']:>9.2f}x{(r['train_seconds'] or 0) / 60:>6.1f} min")
    return "\n".join(lines)


def amazon_verdict(rows: list[dict]) -> str:
    """One sentence from the numbers: does merging beat keeping the same fraction of tokens,
    and how far is it from plain? Differences under two standard errors of an accuracy on
    this many reviews are called ties."""
    by = {r["method"]: r for r in rows}
    plain, merge, first = by["plain"], by["merge"], by["keep-first"]
    n = plain["n"]
    noise = 2 * (0.25 / n) ** 0.5  # two standard errors of an accuracy near 50%, the widest case
    gap_first, gap_plain = merge["value"] - first["value"], plain["value"] - merge["value"]
    k, speed = merge["k"], merge["prefill_speedup"]
    at_majority = abs(merge["value"] - merge["majority_rate"]) <= noise / 2 and merge["macro_f1"] < 0.5
    head = (f"K-Token Merging at K = {k} reads {merge['length_reduction']:.0%} fewer positions "
            f"(prefill {speed:.2f}x plain's speed) ")
    if at_majority:
        head += f"but stayed at the majority class ({merge['value']:.1%}, macro-F1 {merge['macro_f1']:.2f}); "
    else:
        head += f"and reached {merge['value']:.1%} (macro-F1 {merge['macro_f1']:.2f}); "
    if gap_first > noise:
        tail = f"it beats keep-first (the first 1/{k} of each review) by {gap_first * 100:.1f} points"
    elif gap_first < -noise:
        tail = (f"keep-first (the first 1/{k} of each review) does better ({first['value']:.1%}, macro-F1 "
                f"{first['macro_f1']:.2f}), so at this budget merging does not pay")
    else:
        tail = f"keep-first (the first 1/{k} of each review) is level with it ({first['value']:.1%}, within the noise of {n} reviews, ±{noise:.1%})"
    tail += (f"; plain K = 1 reaches {plain['value']:.1%}, " +
             ("level with merging" if abs(gap_plain) <= noise else
              f"{abs(gap_plain) * 100:.1f} points {'above' if gap_plain > 0 else 'below'} merging") + ".")
    return head + tail
