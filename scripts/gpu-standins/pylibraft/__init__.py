"""Stand-in of pylibraft 26.10 (nothing the shard calls)."""

__version__ = "26.10.0+standin"
STANDIN = True
