"""Project-wide pytest setup: the shared fixtures and the ``gpu`` marker live in one plugin."""

pytest_plugins = ["gmco_testing.plugin"]
