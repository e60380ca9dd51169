"""Speed benchmark: what merging K tokens into one buys in prefill, decoding, training and memory.

    ktm bench speed --device cpu --lengths 512 1024 2048 --out benchmarks/results/cpu
    python -m ktm.experiments.bench speed --modes prefill decode

The package has one module per concept:

* :mod:`.timing`: repeated runs in round-robin (:func:`measure`) and their statistics;
* :mod:`.inputs`: prompts of exact token lengths cut from a corpus, tree questions;
* :mod:`.modes`: the measurements, each a function that returns plain rows —
  :func:`bench_prefill` (time to first token, end to end from token ids, with ``merge_ids``
  alone as the encoder's share and the plain forward on ceil(L/K) tokens as the ideal),
  :func:`bench_decode` (ktm's cached ``generate`` against transformers' ``generate`` and the
  release's re-run-everything loop), :func:`bench_train` (examples/s of a training step),
  :func:`bench_memory` (peak memory and KV cache of a prefill), :func:`bench_compile`
  (static-shape compiled decoding against eager);
* :mod:`.report`: derived ratios, the goals, Markdown tables and the plot;
* here: :class:`BenchConfig` (every option, which the command line's flags are made from),
  :func:`run_speed` and the command line.

Timings are medians over ``repeats`` runs after ``warmup`` runs; the functions being
compared run round-robin (one of each, then again) so that drift in the machine's speed
affects them alike.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import os
import platform
import sys
import time
from pathlib import Path

import torch

from ...model.compiled import COMPILE_MODES
from ...config import save_json
from ...arguments import add_arguments, overrides
from .inputs import (
    corpus_text,
    id_prompts,
    portable_path,
    texts_of_length,
    token_stream,
    tree_examples,
    window,
)
from .modes import (
    COMPILE_MAX_LENGTH,
    bench_compile,
    bench_decode,
    bench_memory,
    bench_prefill,
    bench_train,
    cache_nbytes,
    compiled_generate,
    plain_prefill,
    prefill,
    static_prefill,
    with_k,
)
from .memory import PeakRSS, peak_memory
from .report import (
    GOAL_COMPILE_SPEEDUP,
    GOAL_DECODE_VS_RELEASE,
    GOAL_ENCODER_SHARE,
    GOAL_PREFILL_FRACTION,
    GOAL_TRAIN_RATIO,
    check_goals,
    derive_compile,
    derive_decode,
    derive_memory,
    derive_prefill,
    derive_train,
    plot,
    render_markdown,
)
from .timing import encoder_share, fraction_of_ideal, measure, median, rate, speedup, summary

MODES = ("prefill", "decode", "train", "memory", "compile")
DEFAULT_MODES = ("prefill", "decode", "train", "memory")  # "compile" compiles for minutes: asked for by name
DEFAULT_KS = (1, 2, 4, 8)
CPU_LENGTHS = (512, 1024, 2048)
CUDA_LENGTHS = (512, 1024, 2048, 4096, 8192)
CPU_MAX_BATCH_TOKENS = 8192


def _opt(text: str, default=None, choices=None):
    return dataclasses.field(default=default, metadata={"help": text, "choices": choices})


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Every option of ``ktm bench speed``; each field is a ``--field-name`` flag."""

    device: str = _opt("cpu, cuda or auto", "auto")
    dtype: str | None = _opt("float32, bfloat16, float16 (default: bf16 on GPU, fp32 on CPU)")
    modes: tuple[str, ...] = _opt("what to measure ('compile' is left out by default: it compiles for minutes)",
                                  DEFAULT_MODES, MODES)
    lengths: tuple[int, ...] | None = _opt(
        f"prompt lengths (default: {list(CPU_LENGTHS)} on CPU, {list(CUDA_LENGTHS)} on CUDA)")
    ks: tuple[int, ...] = _opt("block sizes (1 is always added)", DEFAULT_KS)
    batch_sizes: tuple[int, ...] = _opt("prefill and memory batch sizes", (1, 8))
    max_batch_tokens: int | None = _opt("skip prefill/memory runs with B*L above this "
                                        "(-1: 8192 on CPU, none on CUDA; 0: none)", -1)
    repeats: int = _opt("timed runs per measurement", 3)
    warmup: int = _opt("untimed runs first", 1)
    new_tokens: int = _opt("decode: new tokens", 64)
    decode_length: int = _opt("decode: prompt tokens", 512)
    release_repeats: int = _opt("decode: runs of the release's loop (0: skip)", 1)
    train_batch_size: int = _opt("train: examples per step", 4)
    train_long_length: int = _opt("train: tokens of a long prompt", 500)
    encoder_hidden: int | None = _opt("encoder MLP width (default: the paper's int(a*K)*d)")
    context_layers: int = _opt("contextual merging: LLM layers that read the full prompt before it is merged "
                               "(timed in the merge and the prefill; 0: the paper's method)", 0)
    compile_modes: tuple[str, ...] = _opt("compile: torch.compile modes (or 'cudagraphs') to measure against eager",
                                          ("reduce-overhead",), COMPILE_MODES)
    corpus: str | None = _opt("text or .jsonl the prompts are cut from (default: ktm's source)")
    out: str | None = _opt("output folder (default: benchmarks/results/<date>-<device>)")

    def __post_init__(self):
        bad = set(self.modes) - set(MODES)
        if bad:
            raise ValueError(f"unknown modes {sorted(bad)}; choose from {MODES}")
        if self.context_layers < 0:
            raise ValueError(f"context_layers must be >= 0, got {self.context_layers}")
        for name in ("repeats", "new_tokens", "decode_length", "train_batch_size", "train_long_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("ks", "batch_sizes") + (("lengths",) if self.lengths else ()):
            if any(v < 1 for v in getattr(self, name)):
                raise ValueError(f"every value of {name} must be >= 1, got {list(getattr(self, name))}")


def machine_info(device) -> dict:
    """CPU model, core count, OS, library versions and the accelerator (if any)."""
    import transformers

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    device = torch.device(device)
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "cuda_available": torch.cuda.is_available()}
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    else:
        info["device_name"] = f"CPU ({cpu}, {os.cpu_count()} cores)"
    return info


def _load_avg() -> list[float] | None:
    """1, 5 and 15 minute load averages: other work on the machine skews timings."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def default_out(device: str) -> Path:
    return Path("benchmarks") / "results" / f"{_dt.date.today().isoformat()}-{device}"


def _load(model, cfg: BenchConfig, log):
    """The model to time: ``model`` itself, or a K = 1 model loaded from a base reference."""
    from ...loading import resolve_device
    from ...model import KTokenMerging

    if isinstance(model, KTokenMerging):
        return model
    t0 = time.perf_counter()
    m = KTokenMerging.from_base(model, k=1, dtype=cfg.dtype, device=resolve_device(cfg.device), seed=0,
                                encoder_hidden=cfg.encoder_hidden, context_layers=cfg.context_layers)
    log(f"loaded {model or 'default'} in {time.perf_counter() - t0:.0f} s")
    return m


def _meta(m, cfg: BenchConfig, lengths, max_batch_tokens, command) -> dict:
    return {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": command, "model": m.base_reference, "dtype": str(m.dtype).replace("torch.", ""),
            "device": m.device.type, "modes": list(cfg.modes), "ks": list(cfg.ks), "lengths": list(lengths),
            "batch_sizes": list(cfg.batch_sizes), "max_batch_tokens": max_batch_tokens, "repeats": cfg.repeats,
            "warmup": cfg.warmup, "corpus": portable_path(cfg.corpus) if cfg.corpus else "ktm source code",
            "encoder_hidden": m.config.encoder_hidden or "int(a*K)*d", "encoder_init": m.config.encoder_init,
            "context_layers": m.config.context_layers,
            "compile_modes": list(cfg.compile_modes) if "compile" in cfg.modes else None,
            "load_avg_start": _load_avg(), **machine_info(m.device)}


def run_speed(model=None, config: BenchConfig | None = None, *, command: str | None = None, log=print,
              **options) -> dict:
    """Run the selected modes, print the Markdown tables, write ``OUT/speed.json``,
    ``OUT/speed.md`` (after every mode, so a stopped run keeps what it finished) and
    ``OUT/speed.png``; return the results dict.

    ``model``: a :class:`~ktm.model.KTokenMerging` (any K) or a base-model reference for
    :func:`ktm.loading.load_base` (``None``: the embedded SmolLM2-135M-Instruct).
    ``config``: a :class:`BenchConfig`; ``options`` override its fields (``modes=["prefill"]``).
    Lengths default to 512-2048 on CPU and 512-8192 on CUDA; ``max_batch_tokens`` -1 means
    8192 on CPU and no limit on CUDA.
    """
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
    cfg = dataclasses.replace(config or BenchConfig(), **options)
    m = _load(model, cfg, log).eval()
    on_cuda = m.device.type == "cuda"
    lengths = cfg.lengths or (CUDA_LENGTHS if on_cuda else CPU_LENGTHS)
    max_batch_tokens = cfg.max_batch_tokens
    if max_batch_tokens == -1:
        max_batch_tokens = None if on_cuda else CPU_MAX_BATCH_TOKENS
    need = max(max(lengths) * max(cfg.batch_sizes), (cfg.decode_length + 16) * 2,
               (cfg.train_long_length + 16) * cfg.train_batch_size * 2)
    stream = token_stream(m.tokenizer, corpus_text(cfg.corpus), need)
    results: dict = {"meta": _meta(m, cfg, lengths, max_batch_tokens, command)}
    out = Path(cfg.out) if cfg.out is not None else default_out(m.device.type)
    out.mkdir(parents=True, exist_ok=True)
    timing = dict(warmup=cfg.warmup, repeats=cfg.repeats, log=log)
    runners = {
        "prefill": lambda: bench_prefill(m, stream, lengths=lengths, ks=cfg.ks, batch_sizes=cfg.batch_sizes,
                                         max_batch_tokens=max_batch_tokens, **timing),
        "decode": lambda: bench_decode(m, stream, ks=cfg.ks, length=cfg.decode_length, new_tokens=cfg.new_tokens,
                                       release_repeats=cfg.release_repeats, **timing),
        "train": lambda: bench_train(m, stream, ks=cfg.ks, batch_size=cfg.train_batch_size,
                                     long_length=cfg.train_long_length, **timing),
        "compile": lambda: bench_compile(m, stream, compile_modes=cfg.compile_modes, lengths=lengths, ks=cfg.ks,
                                         batch_sizes=cfg.batch_sizes, decode_length=cfg.decode_length,
                                         new_tokens=cfg.new_tokens, **timing),
        # last: it trims the heap and runs a sampling thread
        "memory": lambda: bench_memory(m, stream, lengths=lengths, ks=cfg.ks, batch_sizes=cfg.batch_sizes,
                                       max_batch_tokens=max_batch_tokens, log=log),
    }
    started, written = time.perf_counter(), []
    for mode in [mode for mode in runners if mode in cfg.modes]:
        results[mode] = runners[mode]()
        # written after every mode: a run stopped by a time limit keeps what it finished
        written = _write_results(results, out, started)
    log(render_markdown(results))
    if any(results.get(mode) for mode in DEFAULT_MODES):  # the compile mode has tables only
        written.append(plot(results, out / "speed.png"))
    log("wrote " + ", ".join(str(p) for p in written))
    return results


def _write_results(results: dict, out: Path, started: float) -> list[Path]:
    """Goals, timing and load average into ``results``; ``OUT/speed.json`` and ``OUT/speed.md``."""
    results["goals"] = check_goals(results)
    results["meta"]["seconds"] = round(time.perf_counter() - started, 1)
    results["meta"]["load_avg_end"] = _load_avg()
    save_json(out / "speed.json", results)
    (out / "speed.md").write_text(render_markdown(results))
    return [out / "speed.json", out / "speed.md"]


# ====================================================================== command line
def _add_speed_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("speed", help="prefill, decoding, training and memory at several K")
    p.add_argument("--model", default=None, help="base model reference (default: embedded SmolLM2-135M-Instruct)")
    add_arguments(p, BenchConfig, title="benchmark options")
    p.set_defaults(func=cmd_speed)
    return p


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``bench`` (with its ``speed`` sub-command) to a CLI's sub-parsers."""
    b = subparsers.add_parser("bench", help="benchmarks: ktm bench speed")
    bsub = b.add_subparsers(dest="bench", required=True)
    _add_speed_parser(bsub)
    return b


def _command_line() -> str:
    args = " ".join(sys.argv[1:])
    return f"ktm {args}" if Path(sys.argv[0]).name == "ktm" else f"python -m ktm.experiments.bench {args}"


def cmd_speed(args) -> int:
    """Handler of ``bench speed``: ``args`` is the parsed namespace."""
    run_speed(args.model, BenchConfig(**overrides(args, BenchConfig)), command=_command_line())
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ktm.experiments.bench", description="ktm benchmarks")
    sub = p.add_subparsers(dest="bench", required=True)
    _add_speed_parser(sub)
    args = p.parse_args(argv)
    return args.func(args)


__all__ = [
    "BenchConfig", "run_speed", "register", "main", "MODES", "DEFAULT_MODES", "DEFAULT_KS", "CPU_LENGTHS",
    "CUDA_LENGTHS", "COMPILE_MAX_LENGTH", "GOAL_PREFILL_FRACTION", "GOAL_ENCODER_SHARE", "GOAL_DECODE_VS_RELEASE",
    "GOAL_TRAIN_RATIO", "GOAL_COMPILE_SPEEDUP", "median", "summary", "speedup", "fraction_of_ideal",
    "encoder_share", "rate", "measure", "corpus_text", "token_stream", "window", "id_prompts", "texts_of_length",
    "tree_examples", "portable_path", "with_k", "prefill", "plain_prefill", "cache_nbytes",
    "static_prefill", "compiled_generate", "bench_prefill", "bench_decode", "bench_train", "bench_memory",
    "bench_compile", "PeakRSS", "peak_memory", "derive_prefill", "derive_decode", "derive_train", "derive_memory",
    "derive_compile", "check_goals", "render_markdown", "plot", "machine_info",
]
