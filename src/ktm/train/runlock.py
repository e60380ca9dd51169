"""Who may write a run folder: one run at a time (:func:`run_lock`), and within a
multi-process run (``accelerate launch``) the first process alone (:func:`main_first`).

The lock is an open-file lock (``fcntl.flock``) on ``OUT/.lock``: the kernel releases it when
its process ends, however it ends, so a killed run's lock is free at once, and two runs can
never both hold it (the old scheme, a file created then filled with a pid, could be taken over
in between). The file records ``PID HOST`` for the message a second run gets; flock works
across hosts on NFS (Linux emulates it with byte-range locks there).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from pathlib import Path

LOCK_NAME = ".lock"


def process_rank() -> int:
    """This process's rank under ``accelerate launch`` / ``torchrun`` (``RANK``; 0 alone),
    known before the accelerator starts: only rank 0 locks, cleans and records the run folder."""
    return int(os.environ.get("RANK", "0") or 0)


def world_size() -> int:
    """How many processes the run has (``WORLD_SIZE``; 1 alone)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


@contextlib.contextmanager
def run_lock(out: Path):
    """Hold ``OUT/.lock`` while a run writes ``out``: a second run on the same folder fails at
    once (``ValueError`` naming the process and host that hold it) instead of colliding."""
    lock = Path(out) / LOCK_NAME
    while True:
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 256).decode(errors="replace").split() or ["?"]
            os.close(fd)
            where = f" on {holder[1]}" if len(holder) > 1 else ""
            raise ValueError(f"{out} is in use by another ktm run (process {holder[0]}{where}); wait for it to "
                             f"finish, or choose another output folder") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a file its last holder unlinked while this process waited to lock it
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


def share_from_main(value):
    """``value`` as the first process has it, in every process (a barrier too); ``value``
    itself when the run has one process."""
    if world_size() == 1:
        return value
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list, parse_flag_from_env

    # joins the process group the accelerator will use (on CPU as `accelerate launch --cpu` asks)
    PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


@contextlib.contextmanager
def main_first(out: Path, setup=None):
    """The first process takes :func:`run_lock` on ``out`` and runs ``setup()`` (recover,
    clean, check the folder) while the others wait; then all go on, the lock held until the
    block ends. An error there is raised in every process, the others getting its message
    as ``ValueError``, so no process reuses what the first is still removing."""
    with contextlib.ExitStack() as stack:
        error = None
        if process_rank() == 0:
            try:
                stack.enter_context(run_lock(out))
                if setup is not None:
                    setup()
            except Exception as e:  # noqa: BLE001 - shared with the other processes, then re-raised
                error = e
        message = share_from_main(None if error is None else str(error))
        if error is not None:
            raise error
        if message is not None:
            raise ValueError(message)
        yield
