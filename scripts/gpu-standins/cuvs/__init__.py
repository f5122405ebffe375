"""CPU stand-in of cuVS 26.10 (see ../README.md)."""

__version__ = "26.10.0+standin"
STANDIN = True
