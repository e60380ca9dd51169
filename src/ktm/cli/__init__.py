"""The ``ktm`` command line (``pyproject``: ``ktm = "ktm.cli:main"``)."""

from .main import _fmt_result, _tasks, build_parser, escape_line, main  # noqa: F401

__all__ = ["main", "build_parser", "escape_line"]
