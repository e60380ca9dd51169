"""Held-out prose from outside ``../shared``: the English text of the Python Language Reference.

The shipped mergers' cards measure fidelity on ``../shared/data/text/dev.jsonl``: documents held
out from the pretraining text, but from the same two sources (Wikipedia and Project Gutenberg).
Prose from elsewhere tells whether the numbers carry over. Offline, the one sizeable body of
English prose that every Python installation carries is ``pydoc_data.topics``: the Language
Reference's sections as plain text (the Python Software Foundation's documentation, PSF licence),
a technical register neither source of the pretraining text has. This script keeps its prose
paragraphs (indented lines, i.e. code, grammar and notes, and headings are dropped; wrapped lines
are joined), groups consecutive paragraphs (across sections) into texts of at least
``--min-chars`` characters and writes them as JSON lines (field ``text``) for
``ktm fidelity --text``::

    python benchmarks/outside_prose.py --out runs/outside/pydoc.jsonl
    ktm fidelity --checkpoint zoo:default-k2 --text runs/outside/pydoc.jsonl --windows 100 \\
        --review-windows 0 --json runs/outside/k2.json

A sidecar JSON file beside the output (``runs/outside/pydoc.json``) records the Python version
the topics came from and the SHA-256 of the written file, since the text changes between
Python releases.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path

UNDERLINE = re.compile(r"^([*=\-~^\"#+])\1{2,}$")


def paragraphs(text: str) -> list[str]:
    """The prose paragraphs of one reference section: blank-line separated blocks with no indented
    line (code, grammar rules, notes and lists' continuations are indented), no heading
    underline, joined into one line each.

    >>> paragraphs("Title\\n*****\\n\\nSome words\\nwrapped here.\\n\\n   code = 1\\n\\nMore.")
    ['Some words wrapped here.', 'More.']
    """
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line.rstrip() for line in block.strip("\n").split("\n") if line.strip()]
        if not lines or any(line[:1].isspace() for line in lines):
            continue
        if any(UNDERLINE.match(line.strip()) for line in lines):
            continue
        out.append(" ".join(line.strip() for line in lines))
    return out


def texts(topics: dict[str, str], min_chars: int) -> list[str]:
    """The paragraphs of every section (sections in sorted order), grouped in order into texts of at
    least ``min_chars`` characters (a text may run from one section into the next; the short
    remainder at the end is dropped).

    >>> texts({"a": "One two.\\n\\nThree four.\\n\\nFive.", "b": "Six seven."}, min_chars=9)
    ['One two. Three four.', 'Five. Six seven.']
    """
    out, current = [], []
    for name in sorted(topics):
        for para in paragraphs(topics[name]):
            current.append(para)
            if len(" ".join(current)) >= min_chars:
                out.append(" ".join(current))
                current = []
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="the .jsonl file to write")
    p.add_argument("--min-chars", type=int, default=1500,
                   help="characters per text at least (a window of 256 + 32 tokens of this text needs about 1,350)")
    args = p.parse_args(argv)
    from pydoc_data.topics import topics

    rows = texts(topics, args.min_chars)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    body = "".join(json.dumps({"text": t}) + "\n" for t in rows)
    out.write_text(body)
    meta = dict(source="pydoc_data.topics (the Python Language Reference as plain text, PSF licence)",
                python=sys.version.split()[0], texts=len(rows), characters=sum(len(t) for t in rows),
                sha256=hashlib.sha256(body.encode()).hexdigest(), min_chars=args.min_chars)
    out.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {out}: {meta['texts']} texts, {meta['characters']:,} characters from Python {meta['python']}'s "
          f"reference (sha256 {meta['sha256'][:12]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
