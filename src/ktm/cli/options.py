"""Argument types and the option groups several commands share (base model, task)."""

import argparse
import math

from ..arguments import add_arguments, overrides
from ..config import Runtime


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default once: skipped where the help already names it or it is unset."""

    def _get_help_string(self, action):
        if "(default" in (action.help or "") or action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


# ---------------------------------------------------------------- argument types
def int_at_least(low: int):
    """argparse type: an integer >= ``low`` (a one-line argparse error otherwise)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = number(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def probability(text: str) -> float:
    """argparse type: a number in (0, 1]."""
    value = number(text)
    if not 0.0 < value <= 1.0:  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


positive_int, nonnegative_int = int_at_least(1), int_at_least(0)


TRUST_HELP = ("let transformers run Python code shipped with the model folder, checkpoint or hub "
              "repository (an auto_map in its config). That code runs with your permissions: "
              "use it only for models you trust (default: never run it)")


# ---------------------------------------------------------------- shared options
def add_task_args(p: argparse.ArgumentParser) -> None:
    """``--task`` and every task's own options (``Task.Options``), one group per task."""
    from ..tasks import TASKS

    p.add_argument_group("task").add_argument("--task", choices=sorted(TASKS), default="tree",
                                              help="task (default: tree)")
    for name, cls in TASKS.items():
        add_arguments(p, cls.Options, title=f"{name} task")


def add_base_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("base model")
    g.add_argument("--model", default=None,
                   help="base model: hub id, folder, .gguf file (default: embedded SmolLM2-135M-Instruct)")
    g.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    g.add_argument("--dtype", default="auto", help="float32, bfloat16 or auto (bf16 on GPU; default: auto)")
    g.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    add_threads_arg(g)


def add_threads_arg(group) -> None:
    group.add_argument("--threads", type=positive_int, default=None,
                       help="CPU threads for PyTorch, and for llama.cpp where it runs (default: their own "
                            "choice); --threads 1 holds a long run to one core and leaves the others free")


def tasks_from(args) -> list:
    """The task(s) the options name: one, or several in order for a curriculum."""
    from ..tasks import TASKS

    cls = TASKS[args.task]
    return cls.from_options(cls.Options(**overrides(args, cls.Options)))


def runtime_from(args) -> Runtime:
    """The :class:`~ktm.config.Runtime` of the base-model options (``--model``, ``--device``,
    ``--dtype``, ``--trust-remote-code``)."""
    return Runtime(args.model, args.device, args.dtype, args.trust_remote_code)


#: the experiment trackers ``--report-to`` offers (accelerate's, by its names)
REPORT_TO = ("none", "tensorboard", "wandb")


def add_report_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--report-to", choices=REPORT_TO, default="none",
                   help="log losses and evaluations through accelerate's tracker: tensorboard (OUT/logs; "
                        "pip install 'k-token-merging[tensorboard]') or wandb (pip install "
                        "'k-token-merging[wandb]'; wandb login)")
