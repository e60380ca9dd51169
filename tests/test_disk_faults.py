"""Disk full, a file-size limit and a read-only folder, produced for real (a small tmpfs, a
``RLIMIT_FSIZE`` in a child process, a read-only mount or folder), not raised from a patched
function: ``ktm train`` ends with the message docs/RELIABILITY.md quotes, and leaves no
temporary folders (issue 28)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import save_tiny_base, write_seq_task
from ktm.cli import main

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("disk")
    base = save_tiny_base(root / "base", max_positions=128)
    write_seq_task(root / "data")
    return ["train", "--task", "jsonl", "--data", str(root / "data"), "--model", str(base), "--device", "cpu",
            "--dtype", "float32", "--steps", "1", "--batch-size", "2", "--eval-examples", "2", "--k", "2"]


@pytest.fixture
def mount(tmp_path):
    """mount(options) -> a fresh tmpfs folder (needs root and mount rights: skipped otherwise)."""
    mounted = []

    def make(options):
        where = tmp_path / f"mnt{len(mounted)}"
        where.mkdir()
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root")
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
        if proc.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
        mounted.append(where)
        return where

    yield make
    for where in mounted:
        subprocess.run(["umount", str(where)], check=False)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*") if p.name != ".lock")


def test_a_full_disk_during_the_checkpoint_save_gets_the_disk_full_message(setup, mount, capsys):
    out = mount("size=48k") / "run"  # room for run_config.json, not for the checkpoint's weights
    assert main([*setup, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert (f"ktm: error: no space left on the device writing {out / 'checkpoint'}: free some space, or write "
            f"to another disk (e.g. another --out)") in err
    assert "corrupt or incomplete" not in err and _leftovers(out) == []


def test_a_read_only_output_folder_gets_the_permission_message(setup, mount, tmp_path, capsys):
    if os.geteuid() == 0:  # root writes through chmod: a read-only mount is the real thing
        folder = mount("size=1m,ro")
    else:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
    assert main([*setup, "--out", str(folder / "run")]) == 2
    err = capsys.readouterr().err
    assert f"ktm: error: permission denied: {folder / 'run'}" in err
    assert "choose a file or folder you can write to (e.g. another --out) or read from, or change its " \
           "permissions" in err


#: ``ktm train`` under a 40 KB file-size limit (SIGXFSZ ignored, so the write fails with EFBIG)
LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))
from ktm.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_file_size_limit_during_the_checkpoint_save_is_named(setup, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", LIMITED, *setup, "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (f"ktm: error: the file-size limit of this process (ulimit -f) was reached writing {out / 'checkpoint'}: "
            f"raise the limit, or write less (e.g. fewer or smaller files)") in proc.stderr
    assert _leftovers(out) == []
