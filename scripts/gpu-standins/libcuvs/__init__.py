"""Stand-in of the ``libcuvs`` wheel's loader: there is no shared library to load."""

from __future__ import annotations

__version__ = "26.10.0+standin"
STANDIN = True


def load_library() -> list:
    return []
