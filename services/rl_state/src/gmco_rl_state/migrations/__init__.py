"""Versioned SQL migrations, one directory per dialect; see :mod:`gmco_rl_state.migrate`."""
