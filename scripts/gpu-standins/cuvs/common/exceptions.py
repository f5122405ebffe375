"""Stand-in of ``cuvs.common.exceptions``."""


class CuvsException(Exception):
    pass
