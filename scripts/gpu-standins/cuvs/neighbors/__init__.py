"""Stand-in of ``cuvs.neighbors``."""
