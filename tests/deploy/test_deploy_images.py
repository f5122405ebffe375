"""Each service's Dockerfile, checked for structure (there is no Docker engine here; `make images` builds)."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SERVICES = {  # directory -> (chart name, gRPC port)
    "router": ("router", 50050),
    "shard": ("shard", 50051),
    "cache": ("cache", 50052),
    "ontology": ("ontology", 50053),
    "rl_state": ("rl-state", 50054),
}


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, op: str) -> list[str]:
        return [arg for o, arg in self.instructions if o == op]


def parse(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages of a Dockerfile (continuation lines joined)."""
    text = re.sub(r"\\\n", " ", path.read_text())
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        op, _, rest = line.partition(" ")
        op = op.upper()
        if op == "FROM":
            base, _, name = rest.partition(" AS ")
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base.strip())
            stages.append(Stage(base, name.strip() or None))
        elif stages:
            stages[-1].instructions.append((op, rest.strip()))
        elif op == "ARG":
            key, _, default = rest.partition("=")
            args[key] = default
    return args, stages


@pytest.mark.parametrize("service", list(SERVICES))
def test_dockerfile_structure(service):
    directory = ROOT / "services" / service
    project = tomllib.loads((directory / "pyproject.toml").read_text())["project"]
    package = project["name"]
    _, stages = parse(directory / "Dockerfile")
    assert len(stages) >= 2, "multi-stage: build, then a runtime image without build tools"
    build, final = stages[-2], stages[-1]

    # The base: the CUDA runtime for the shard, slim CPython elsewhere; the venv is built on the same base.
    if service == "shard":
        assert re.fullmatch(r"nvidia/cuda:[0-9.]+-runtime-ubuntu[0-9.]+", final.base), final.base
    else:
        assert re.fullmatch(r"python:3\.1[1-2]-slim-\w+", final.base), final.base
    assert build.base == final.base

    # Only this workspace member (and what it depends on), from the lockfile, without dev tools.
    (sync,) = [r for r in build.all("RUN") if "uv sync" in r]
    assert f"--package {package}" in sync and "--frozen" in sync and "--no-dev" in sync
    assert "--all-packages" not in sync
    if service == "shard":
        assert "--extra gpu" in sync
        assert "gpu" in project.get("optional-dependencies", {}), "services/shard/pyproject.toml has no 'gpu' extra"

    # An unprivileged numeric user (runAsNonRoot can only verify a numeric UID), the chart's.
    (user,) = final.all("USER")
    uid = int(user.split(":")[0])
    values = yaml.safe_load((ROOT / "deploy/helm/gmco/charts" / SERVICES[service][0] / "values.yaml").read_text())
    assert uid != 0 and uid == values["podSecurityContext"]["runAsUser"]

    # The entry point is the package's console script, whose module and function exist.
    (entrypoint,) = final.all("ENTRYPOINT")
    script = Path(yaml.safe_load(entrypoint)[0])
    assert script.parent == Path("/app/.venv/bin")
    target = project["scripts"][script.name]
    module, func = target.split(":")
    source = directory / "src" / Path(*module.split(".")).with_suffix(".py")
    assert source.is_file(), f"{target}: {source} does not exist"
    assert re.search(rf"^def {func}\(", source.read_text(), re.MULTILINE), f"{source} has no {func}()"

    (expose,) = final.all("EXPOSE")
    assert {int(p) for p in expose.split()} == {SERVICES[service][1], 9090}


def test_dockerignore_keeps_the_context_small():
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {"**/.venv", ".git", "data", ".run", "**/tests"} <= ignored
