"""Check pip's installation reports (``pip install --report FILE``): every package came as a wheel.

Usage: ``python scripts/check_wheels.py [--local NAME] [--forbid NAME] REPORT.json ...``

Exits 1, naming each offender, when a package was built from a source distribution (anything
but a ``.whl``: building it compiles or runs its setup code) or when a package named by
``--forbid`` was installed at all. ``--local NAME`` allows NAME from a local folder (the project
being installed, built from its own source). Used by ``scripts/check-install.sh``.
"""

import argparse
import json
import sys


def canonical(name: str) -> str:
    """A distribution name as pip compares them (PEP 503): ``Llama_CPP.python`` -> ``llama-cpp-python``."""
    return "-".join(name.lower().replace("_", "-").replace(".", "-").split("-"))


def offenders(report: dict, local: tuple[str, ...] = (), forbid: tuple[str, ...] = ()) -> list[str]:
    """``"name version: why"`` for each package of ``report`` that was not installed from a wheel
    (a ``local`` name from a folder excepted) or whose name is in ``forbid``."""
    local, forbid = {canonical(n) for n in local}, {canonical(n) for n in forbid}
    found = []
    for item in report.get("install", []):
        meta, info = item["metadata"], item["download_info"]
        name, label = canonical(meta["name"]), f"{meta['name']} {meta['version']}"
        if name in forbid:
            found.append(f"{label}: must not be installed")
        elif "dir_info" in info and name in local:
            continue
        elif not info["url"].endswith(".whl"):
            found.append(f"{label}: built from source ({info['url'].rsplit('/', 1)[-1]})")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="+", help="files written by pip install --report")
    parser.add_argument("--local", action="append", default=[], help="a project allowed from a local folder")
    parser.add_argument("--forbid", action="append", default=[], help="a package that must not be installed")
    args = parser.parse_args(argv)
    found, count = [], 0
    for path in args.reports:
        with open(path) as f:
            report = json.load(f)
        count += len(report.get("install", []))
        found += [f"{path}: {line}" for line in offenders(report, tuple(args.local), tuple(args.forbid))]
    for line in found:
        print(f"check_wheels: {line}", file=sys.stderr)
    if not found:
        print(f"check_wheels: {count} packages, every one from a wheel")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
