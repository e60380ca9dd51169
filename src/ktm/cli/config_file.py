"""``--config FILE.json|yaml`` for ``ktm train``, ``ktm pretrain`` and ``ktm pareto``.

A config file holds the command's options by their names (``lora_r`` or ``lora-r``, as
``--help`` lists them), flat or grouped in sections of any name (a mapping is read as a
section), for example::

    recipe: fast
    task: tree
    stage: [small]
    model: {k: 4, lora_r: 8}          # a mapping: a section, not the base model option
    train: {steps: 200, lr: 3e-4}
    out: runs/k4

The file's options come first and the command line's after them, so a flag given on the
command line wins. ``ktm train`` records every option of a run under ``args`` in
``OUT/run_config.json``, so ``ktm train --config OUT/run_config.json --out OUT2`` runs it again.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

#: the commands that take ``--config``
CONFIG_COMMANDS = ("train", "pretrain", "pareto")
#: namespace entries that are no options (never recorded, never read back)
NOT_OPTIONS = ("argv", "command", "func", "config")


def add_config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE",
                   help="options from a .json or .yaml file (a run's OUT/run_config.json reruns it); "
                        "options given on the command line win")


def recorded_args(args: argparse.Namespace) -> dict:
    """The options of a parsed command line, as ``--config`` reads them back."""
    return {k: v for k, v in vars(args).items() if k not in NOT_OPTIONS and not callable(v)}


def read_config_file(path: str) -> dict:
    """The options in a .json / .yaml / .yml file (a ``run_config.json``: its ``args``)."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    text = file.read_text()
    if file.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark is not None else ""
            raise ValueError(f"--config {path} is not valid yaml{where}: {getattr(e, 'problem', None) or e}") from None
    else:
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ValueError(f"--config {path} is not valid JSON: {e}") from None
    if isinstance(data, dict) and isinstance(data.get("args"), dict):
        return data["args"]  # a run_config.json written by ktm train
    if not isinstance(data, dict):
        raise ValueError(f"--config {path} must hold a mapping of option: value")
    return data


def flatten(data: dict) -> dict:
    """Option name -> value, sections merged in; names normalised to ``lora_r``."""
    flat = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if isinstance(value, dict):
            flat.update(flatten(value))
        elif name not in NOT_OPTIONS:
            flat[name] = value
    return flat


def option_tokens(parser: argparse.ArgumentParser, values: dict, where: str) -> list[str]:
    """The command-line tokens that give ``values`` (option name -> value) to ``parser``."""
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    unknown = sorted(set(values) - set(actions))
    if unknown:
        raise ValueError(f"{where}: unknown options {unknown} (ktm {parser.prog.split()[-1]} --help lists them)")
    tokens = []
    for name, value in values.items():
        action = actions[name]
        flag = next((s for s in action.option_strings if s.startswith("--")), action.option_strings[0])
        if value is None or (isinstance(value, (list, tuple)) and not value):
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            tokens.append(flag if value else "--no-" + flag[2:])
        elif action.nargs == 0:  # store_true / store_false
            if bool(value) != bool(action.default):
                tokens.append(flag)
        elif isinstance(value, (list, tuple)):
            tokens += [flag, *map(str, value)]
        else:
            tokens += [flag, str(value)]
    return tokens


def expand_config(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``argv`` with ``--config FILE`` replaced by the file's options, placed before the
    command line's own (which then win); unchanged for commands without ``--config``."""
    if not argv or argv[0] not in CONFIG_COMMANDS:
        return argv
    rest, path = list(argv[1:]), None
    for i, token in enumerate(rest):
        if token == "--config" and i + 1 < len(rest):
            path = rest[i + 1]
            del rest[i:i + 2]
            break
        if token.startswith("--config="):
            path = token.split("=", 1)[1]
            del rest[i]
            break
    if path is None:
        return argv
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[argv[0]]
    return [argv[0], *option_tokens(sub, flatten(read_config_file(path)), f"--config {path}"), *rest]
