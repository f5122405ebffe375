"""The Dockerfiles, read without building (tests/images builds and runs them): two of them, base images as
ARGs with the defaults a Docker user pulls, only the service's workspace member synced from the lockfile,
one stub generator shared with `make protos`, the chart's numeric non-root user, a health probe, and
ports that agree with the services, the chart and the build script."""

from __future__ import annotations

import dataclasses
import importlib
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "deploy" / "images"
SERVICE_DOCKERFILE = IMAGES / "service.Dockerfile"
SHARD_DOCKERFILE = IMAGES / "shard.Dockerfile"
SERVICES = {  # directory -> (chart name, gRPC port)
    "router": ("router", 50050),
    "shard": ("shard", 50051),
    "cache": ("cache", 50052),
    "ontology": ("ontology", 50053),
    "rl_state": ("rl-state", 50054),
}
DEFAULT_BASE = "python:3.11-slim-bookworm"


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
            stages.append(Stage(base.strip(), name.strip() or None))
        elif stages:
            stages[-1].instructions.append((op, rest.strip()))
        elif op == "ARG":
            key, _, default = rest.partition("=")
            args[key] = default
    return args, stages


def stage(stages: list[Stage], name: str) -> Stage:
    (found,) = [s for s in stages if s.name == name]
    return found


def test_no_per_service_dockerfiles_remain():
    assert not list(ROOT.glob("services/*/Dockerfile")), "the images are built from deploy/images/*.Dockerfile"


@pytest.mark.parametrize("path", [SERVICE_DOCKERFILE, SHARD_DOCKERFILE], ids=["service", "shard"])
def test_bases_are_args_with_pullable_defaults_and_no_cuda_12(path):
    args, stages = parse(path)
    assert args == {"PYTHON_IMAGE": DEFAULT_BASE, "BUILD_IMAGE": DEFAULT_BASE}
    assert {s.base for s in stages} <= {"${PYTHON_IMAGE}", "${BUILD_IMAGE}", *(s.name for s in stages if s.name)}
    text = path.read_text()
    assert "nvidia/cuda" not in text and "ghcr.io" not in text and "uv python install" not in text
    # uv comes from PyPI (a wheel), the stubs from the one generator `make protos` runs too.
    build = stage(stages, "build")
    assert any('/opt/uv/bin/pip install --quiet "uv==${UV_VERSION}"' in r for r in build.all("RUN"))
    assert any("scripts/gen-protos.sh" in r for s in stages for r in s.all("RUN"))
    assert "grpc_tools.protoc" not in text


def test_makefile_protos_runs_the_same_generator():
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("\nprotos:", 1)[1].split("\n\n", 1)[0]
    assert "scripts/gen-protos.sh" in recipe and "grpc_tools.protoc" not in makefile
    assert "grpc_tools.protoc" in (ROOT / "scripts" / "gen-protos.sh").read_text()


def sync_of(stage_: Stage) -> str:
    (sync,) = [r for r in stage_.all("RUN") if "uv sync" in r]
    assert "--frozen" in sync and "--no-dev" in sync and "--no-editable" in sync and "--all-packages" not in sync
    return sync


def runtime_checks(final: Stage, port: int | str) -> None:
    (user,) = final.all("USER")
    assert user == "10001:10001"
    (entrypoint,) = final.all("ENTRYPOINT")
    assert yaml.safe_load(entrypoint) == ["/app/bin/gmco-service"]
    (health,) = final.all("HEALTHCHECK")
    assert health.endswith('CMD ["/app/bin/gmco-healthcheck"]')
    (expose,) = final.all("EXPOSE")
    assert expose.split() == [str(port), "9090"]


def test_service_dockerfile_builds_any_cpu_service_by_its_arg():
    _, stages = parse(SERVICE_DOCKERFILE)
    build, final = stage(stages, "build"), stages[-1]
    assert final.base == "${PYTHON_IMAGE}" and build.base == "${BUILD_IMAGE}"
    assert '--package "gmco-$(echo "${SERVICE}" | tr _ -)" --extra otlp' in sync_of(build)
    assert "SERVICE=router" in final.all("ARG") and "PORT=50050" in final.all("ARG")
    assert any("GMCO_IMAGE_SERVICE=${SERVICE}" in e and "GMCO_IMAGE_PORT=${PORT}" in e for e in final.all("ENV"))
    assert "gmco-healthcheck --check-image" in final.all("RUN")  # the build fails on a wrong SERVICE or PORT
    runtime_checks(final, "${PORT}")


def test_shard_dockerfile_has_a_cpu_and_a_gpu_variant():
    _, stages = parse(SHARD_DOCKERFILE)
    assert stages[-1].name == "cpu", "the default target (the last stage) is the CPU image"
    cpu, gpu = stage(stages, "cpu"), stage(stages, "gpu")
    assert cpu.base == gpu.base == "runtime" and stage(stages, "runtime").base == "${PYTHON_IMAGE}"
    cpu_sync, gpu_sync = sync_of(stage(stages, "venv-cpu")), sync_of(stage(stages, "venv-gpu"))
    assert cpu_sync.endswith("--package gmco-shard --extra otlp")
    assert gpu_sync.endswith("--package gmco-shard --extra gpu --extra otlp")
    assert "COPY --from=venv-gpu /app/.venv /app/.venv" in [f"COPY {c}" for c in gpu.all("COPY")]
    assert any("NVIDIA_VISIBLE_DEVICES=all" in e for e in gpu.all("ENV"))
    assert not any("NVIDIA" in e for e in cpu.all("ENV"))
    # The build stage compiles gmco-kernels; the runtime stages have no compiler.
    assert any("build-deps.sh cc" in r for r in stage(stages, "build").all("RUN"))
    runtime = stage(stages, "runtime")
    assert "GMCO_IMAGE_SERVICE=shard GMCO_IMAGE_PORT=50051" in " ".join(runtime.all("ENV"))
    for final in (cpu, gpu):
        runtime_checks(Stage("", "", runtime.instructions + final.instructions), 50051)
    project = tomllib.loads((ROOT / "services" / "shard" / "pyproject.toml").read_text())["project"]
    gpu_extra = " ".join(project["optional-dependencies"]["gpu"])
    assert "cu13" in gpu_extra and "cuda13x" in gpu_extra and "cu12" not in gpu_extra


def build_script_specs() -> dict[str, str]:
    text = (ROOT / "scripts" / "build-images.sh").read_text()
    return dict(re.findall(r'^\s+\[([a-z_-]+)\]="([^"]+)"', text, re.MULTILINE))


@pytest.mark.parametrize("service", list(SERVICES))
def test_ports_agree_between_service_build_script_and_chart(service):
    chart_name, port = SERVICES[service]
    settings = importlib.import_module(f"gmco_{service}.config").Settings
    assert next(f.default for f in dataclasses.fields(settings) if f.name == "port") == port
    spec = build_script_specs()[service]
    if service == "shard":
        assert spec == "deploy/images/shard.Dockerfile --target cpu"
    else:
        assert spec == f"deploy/images/service.Dockerfile --build-arg SERVICE={service} --build-arg PORT={port}"
    values = yaml.safe_load((ROOT / "deploy/helm/gmco/charts" / chart_name / "values.yaml").read_text())
    assert values["podSecurityContext"]["runAsUser"] == 10001
    assert values["image"]["repository"] == f"gmco/{chart_name}"  # what build-images.sh tags
    lib = (ROOT / "deploy/helm/gmco-lib/templates/_names.tpl").read_text()
    assert f'"{chart_name}" {port}' in lib


def test_build_script_builds_every_image():
    assert set(build_script_specs()) == set(SERVICES) | {"shard-gpu"}


def test_entrypoint_and_healthcheck_are_what_the_images_copy():
    for name in ("gmco-service", "gmco-healthcheck", "build-deps.sh", "with-ca.sh"):
        path = IMAGES / name
        assert path.stat().st_mode & 0o111, f"{path} must be executable (COPY keeps the mode)"
    assert (IMAGES / "gmco-healthcheck").read_text().startswith("#!/app/.venv/bin/python\n")
    assert 'exec "/app/.venv/bin/gmco-$(printf %s "$service" | tr _ -)" "$@"' in (IMAGES / "gmco-service").read_text()


def test_dockerignore_keeps_the_context_small():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {"**/.venv", ".git", "data", ".run", "**/tests", "deploy", "scripts"} <= set(ignored)
    assert ignored.index("!deploy/images") > ignored.index("deploy")
    assert ignored.index("!scripts/gen-protos.sh") > ignored.index("scripts")
