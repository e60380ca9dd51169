"""``ktm pareto``: every compression method at every K on one task, one grid, one report.

Each cell of the grid (a method at a K) is one ordinary training run with the same recipe,
LoRA, budget and evaluator, in ``OUT/cells/<method>-k<K>/run``; its numbers go to
``OUT/cells/<method>-k<K>/cell.json`` when it is finished. A rerun reuses finished cells and
resumes an unfinished one from its checkpoint, so an interrupted grid continues where it
stopped; cells can be added later (more methods or K) with the same settings. The settings
that change results (task, recipe, steps, ...) are kept in ``OUT/grid.json``, and a rerun
with other settings is refused instead of mixing runs.

After every cell the report is rewritten (:mod:`ktm.experiments.pareto_report`): ``pareto.json``,
``pareto.csv``, ``pareto.md`` and ``pareto.png`` in ``OUT``.

Methods (``METHODS``): ``plain`` (K = 1, LoRA only; always in the grid, the reference of
the normalised performance), ``merge`` (K-Token Merging), ``mean`` (block mean, no
trained encoder), ``merge-random-init`` (the paper's ablation: the encoder MLP randomly
initialised, no mean residual), the token-space methods of :mod:`ktm.model.methods`
(``keep-first``, ``keep-last``, ``stride``, ``random-drop``) and ``llmlingua2``
(prompts compressed by LLMLingua-2 to the kept fraction 1/K, then read plainly;
:mod:`ktm.experiments.lingua`), and ``merge-keep-cue`` (K-Token Merging with the task's cue kept
token-exact, ``ModelConfig.keep = "cue"``: tree's question, amazon's ``Label:``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from ..config import MERGE_ONLY_DEFAULTS, ModelConfig, save_json
from ..train.evaluate import subsample
from .frontier import length_reduction
from ..tasks.base import ExamplesTask, Task

METHODS = ("plain", "merge", "mean", "merge-random-init", "keep-first", "keep-last", "stride", "random-drop",
           "llmlingua2", "merge-keep-cue")
#: the grid's model-level settings of each method (``plain`` is ``merge`` at K = 1)
_MODEL_SETTINGS = {"plain": {}, "merge": {}, "mean": {"method": "mean"},
                   "merge-random-init": {"encoder_init": "random"},
                   "keep-first": {"method": "keep-first"}, "keep-last": {"method": "keep-last"},
                   "stride": {"method": "stride"}, "random-drop": {"method": "random-drop"}, "llmlingua2": {},
                   "merge-keep-cue": {"keep": "cue"}}
GRID_FILE, CELL_FILE, CELLS_DIR = "grid.json", "cell.json", "cells"


@dataclass(frozen=True)
class Cell:
    """One point of the grid: a method at a block size (kept fraction 1/K)."""

    method: str
    k: int

    @property
    def name(self) -> str:
        return "plain" if self.method == "plain" else f"{self.method}-k{self.k}"


def grid_cells(methods: list[str], ks: list[int]) -> list[Cell]:
    """The cells of ``methods`` x ``ks``: ``plain`` once at K = 1 (always, first), every
    other method at each K > 1 (at K = 1 they are all ``plain``).

    >>> [c.name for c in grid_cells(["merge", "stride"], [2, 4])]
    ['plain', 'merge-k2', 'merge-k4', 'stride-k2', 'stride-k4']
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"K must be integers >= 1, got {ks}")
    cells = [Cell("plain", 1)]
    for m in dict.fromkeys(methods):
        if m != "plain":
            cells += [Cell(m, k) for k in sorted(set(ks)) if k > 1]
    return cells


def cell_model_config(cell: Cell, recipe_model: dict) -> ModelConfig:
    """The model configuration of a cell: the recipe's, with the method's settings."""
    k = 1 if cell.method in ("plain", "llmlingua2") else cell.k
    settings = {**recipe_model, **_MODEL_SETTINGS[cell.method], "k": k}
    if settings.get("method", "merge") != "merge" or k == 1:
        # nothing is merged: no encoder settings (only the mean init is allowed there)
        settings = {**settings, **MERGE_ONLY_DEFAULTS, "encoder_init": "mean"}
    return ModelConfig(**settings)


@dataclass
class GridConfig:
    """Everything that makes two grids comparable (kept in ``OUT/grid.json``)."""

    task: str = "amazon"
    task_options: dict = field(default_factory=dict)
    recipe: str = "fast"
    steps: int = 60
    batch_size: int = 8
    eval_every: int = 0
    eval_examples: int = 200
    train_examples: int = 0
    seed: int = 0
    model: str | None = None
    dtype: str = "auto"
    generate_examples: int = 0
    lingua_model: str | None = None
    #: {"K": saved model} the merge cell at K starts from (a folder, ``zoo:NAME`` or hub id)
    init_from: dict = field(default_factory=dict)
    #: learning rate of every cell (LoRA and encoder); None: the recipe's
    lr: float | None = None

    def key(self) -> dict:
        return dataclasses.asdict(self)

    def start_of(self, cell: "Cell") -> str | None:
        """The saved model ``cell`` starts from: ``init_from`` at its K, for merge cells only."""
        return self.init_from.get(str(cell.k)) if cell.method == "merge" else None


def build_task(grid: GridConfig) -> Task:
    """The grid's task from its name and options, its training set cut to
    ``train_examples`` (a fixed random subset) when that is > 0."""
    from ..tasks import TASKS

    if grid.task not in TASKS:
        raise ValueError(f"unknown task {grid.task!r}; choose from {sorted(TASKS)}")
    cls = TASKS[grid.task]
    tasks = cls.from_options(cls.Options(**grid.task_options))
    if len(tasks) != 1:
        raise ValueError(f"a pareto grid trains on one task, but these options give a curriculum of {len(tasks)}; "
                         f"choose one stage")
    task = tasks[0]
    if grid.train_examples:
        train = subsample(task.examples("train"), grid.train_examples, seed=grid.seed)
        task = ExamplesTask(task, train, task.examples("test"))
    return task


def check_grid(out: Path, grid: GridConfig, overwrite: bool) -> None:
    """Refuse to mix settings in one grid folder; ``overwrite`` clears the old grid."""
    path = out / GRID_FILE
    if overwrite:
        shutil.rmtree(out / CELLS_DIR, ignore_errors=True)
        path.unlink(missing_ok=True)
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is unreadable ({e}); pass --overwrite to start the grid over") from None
        new = json.loads(json.dumps(grid_record(grid)))
        # a setting a grid was recorded without had its default then; a grid recorded before data
        # hashes were has no DATA_KEY: its data cannot be compared
        then = {**json.loads(json.dumps(GridConfig().key())), **old}
        changed = {k: (then.get(k), v) for k, v in new.items() if then.get(k) != v and (k != DATA_KEY or k in old)}
        if changed:
            diff = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(changed.items()))
            raise ValueError(f"{out} holds a grid made with other settings ({diff}); use another --out, the same "
                             f"settings, or --overwrite to start over")
    out.mkdir(parents=True, exist_ok=True)
    save_json(path, grid_record(grid))


#: grid.json's entry for the SHA-256 of the task's local data files
DATA_KEY = "data_sha256"


def data_sha256(options: dict) -> str | None:
    """SHA-256 over the contents of the local files a task's options name (a file, or the
    files of a folder, sorted, hidden ones left out), so a grid rerun on changed data under
    the same path is caught; None when the options name no local path (a hub id)."""
    import hashlib

    digest, found = hashlib.sha256(), False
    for value in sorted(str(v) for v in options.values() if isinstance(v, (str, os.PathLike))):
        root = Path(value)
        for file in _data_files(root):
            found = True
            digest.update(f"{file.relative_to(root) if file != root else file.name}\0".encode())
            with open(file, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest() if found else None


def _data_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    if not root.is_dir():
        return []
    return sorted(p for p in root.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def grid_record(grid: GridConfig) -> dict:
    """What grid.json keeps: the grid's settings and the hash of its task's data."""
    return {**grid.key(), DATA_KEY: data_sha256(grid.task_options)}


def cell_task(cell: Cell, task: Task, grid: GridConfig, folder: Path, log, trust_remote_code=None) -> Task:
    """The examples a cell trains and is scored on: the task's own, or for ``llmlingua2``
    the same examples with compressed prompts (cached in the cell's folder)."""
    if cell.method != "llmlingua2":
        return task
    from .lingua import DEFAULT_LINGUA_MODEL, compress_task
    from ..loading import base_tokenizer

    log(f"{cell.name}: compressing the prompts with LLMLingua-2 to 1/{cell.k} of the base model's tokens")
    return compress_task(task, 1.0 / cell.k, model=grid.lingua_model or DEFAULT_LINGUA_MODEL,
                         tokenizer=base_tokenizer(grid.model, trust_remote_code=trust_remote_code), cache=folder / "compressed.jsonl")


def time_prefill(model, plain_prompts: list[str], cell_prompts: list[str], repeats: int = 5,
                 encoder: bool = False) -> dict:
    """Median prefill time of the cell's prompts (merged or shortened, encoder included)
    against the same LLM reading the original prompts whole, round-robin in one process;
    with ``encoder``, also the merge alone (``encoder_s``). The one prefill comparison of
    ``ktm pareto`` and ``ktm demo``."""
    from .bench import measure, median, plain_prefill

    (ids_cell, keep), ids_plain = model.tokenize_prompts(cell_prompts), model.tokenize(plain_prompts)
    model.eval()
    # kept spans (ModelConfig.keep) are read as the trained model reads them
    fns = {"cell_s": lambda: model.prefill(ids_cell, keep)}
    if encoder:
        fns["encoder_s"] = lambda: model.merge_ids(ids_cell, keep)
    times = measure({**fns, "plain_s": lambda: plain_prefill(model, ids_plain)}, warmup=1, repeats=repeats,
                    device=model.device)
    t = {name: median(ts) for name, ts in times.items()}
    return {**t, "prefill_ratio": t["cell_s"] / t["plain_s"], "prefill_speedup": t["plain_s"] / t["cell_s"],
            "timing_prompts": len(cell_prompts), "timing_repeats": repeats}


def run_cell(cell: Cell, grid: GridConfig, task: Task, folder: Path, *, device="auto", timing_prompts: int = 16,
             log=tqdm.write, trust_remote_code: bool | None = None) -> dict:
    """Train (or resume) one cell, score it, time its prefill; returns its row."""
    from ..train.phases import train_run
    from ..train.recipes import get_recipe

    rec = get_recipe(grid.recipe)
    rate = {} if grid.lr is None else {"lr": grid.lr, "encoder_lr": grid.lr}
    tcfg = rec.train_config(steps=grid.steps, batch_size=grid.batch_size, eval_every=grid.eval_every,
                            eval_examples=grid.eval_examples, seed=grid.seed, **rate)
    data = cell_task(cell, task, grid, folder, log, trust_remote_code)
    t0 = time.perf_counter()
    run = train_run(cell_model_config(cell, rec.model), tcfg, data, folder / "run", base=grid.model, device=device,
                    dtype=grid.dtype, resume=True, record={"recipe": rec.name, "pareto_cell": cell.name}, log=log,
                    trust_remote_code=trust_remote_code, init_from=grid.start_of(cell))
    last = {k: v for k, v in run.trainer.history[-1].items() if not isinstance(v, (list, dict))}
    row = {"cell": cell.name, "method": cell.method, "k": cell.k, "kept_fraction": 1 / cell.k,
           "init_from": grid.start_of(cell),
           "steps": run.trainer.step, "train_seconds": last.get("elapsed_s"),
           "session_seconds": round(time.perf_counter() - t0, 1), **_scores(last)}
    originals = subsample(task.examples("test"), grid.eval_examples, grid.seed)
    shortened = subsample(data.examples("test"), grid.eval_examples, grid.seed)
    lengths = [len(x) for x in run.model.tokenize([e.prompt for e in originals])]
    positions = run.model.merged_lengths([e.prompt for e in shortened])  # kept spans (keep) count whole
    row.update(prompt_tokens=sum(lengths) / len(lengths), llm_positions=sum(positions) / len(positions),
               length_reduction=length_reduction(lengths, positions))
    if grid.generate_examples and task.metric == "perplexity":
        from ..train.evaluate import evaluate

        gen = evaluate(run.model, data, max_examples=grid.eval_examples, seed=grid.seed, progress=False,
                       generate_examples=grid.generate_examples)
        row.update({k: gen[k] for k in ("exact_match", "chrf", "generated") if k in gen})
    n = min(timing_prompts, len(originals))
    row.update(time_prefill(run.model, [e.prompt for e in originals[:n]], [e.prompt for e in shortened[:n]]))
    return row


def _scores(last: dict) -> dict:
    """The metric fields of an evaluation row (history.json) that the report uses."""
    keys = ("metric", "value", "macro_f1", "majority_rate", "majority_label", "n", "nll_per_token")
    return {k: last[k] for k in keys if k in last}


def run_grid(grid: GridConfig, methods: list[str], ks: list[int], out, *, device="auto", overwrite: bool = False,
             timing_prompts: int = 16, progress: bool = True, log=tqdm.write,
             trust_remote_code: bool | None = None) -> list[dict]:
    """Run (or continue) the grid in ``out``; returns the rows of its cells, in grid order,
    and writes the report after every cell. ``trust_remote_code``: as in ``train_run``, for
    every cell (not part of the grid's settings)."""
    from .pareto_report import write_report
    from ..train.runlock import main_first

    cells = grid_cells(methods, ks)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with main_first(out, lambda: check_grid(out, grid, overwrite)):
        task = build_task(grid)
        rows = []
        bar = tqdm(cells, desc="pareto cells", disable=not progress, dynamic_ncols=True)
        for cell in bar:
            bar.set_postfix(cell=cell.name)
            folder = out / CELLS_DIR / cell.name
            done = folder / CELL_FILE
            if done.is_file():
                row = read_cell(done)
                log(f"{cell.name}: finished earlier, reused ({done})")
            else:
                folder.mkdir(parents=True, exist_ok=True)
                log(f"{cell.name}: training {grid.steps} steps of {grid.batch_size}")
                row = run_cell(cell, grid, task, folder, device=device, timing_prompts=timing_prompts, log=log,
                               trust_remote_code=trust_remote_code)
                save_json(done, {"row": row, "grid": grid.key()})
            log(_row_line(row))
            rows.append(row)
            write_report(rows, out, grid)
        bar.close()
    return rows


def read_cell(path: Path) -> dict:
    """The row of a finished cell's ``cell.json``; ``ValueError`` naming it when unreadable."""
    try:
        return json.loads(path.read_text())["row"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is unreadable ({type(e).__name__}: {e}): delete it to train the cell again, "
                         f"or pass --overwrite to start the grid over") from None


def _row_line(row: dict) -> str:
    score = f"{row['metric']} {row['value']:.4f}"
    if "macro_f1" in row:
        score += f", macro-F1 {row['macro_f1']:.3f}"
    return (f"{row['cell']}: {score}, length reduction {row['length_reduction']:.1%}, prefill "
            f"{row['prefill_speedup']:.2f}x plain's speed, trained in {row['train_seconds'] or 0:.0f} s")
