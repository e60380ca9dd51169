"""The ``ktm`` command line (``pyproject``: ``ktm = "ktm.cli:main"``); see :mod:`ktm.cli.main`."""

from .main import build_parser, main

__all__ = ["main", "build_parser"]
