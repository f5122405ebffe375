"""Container images built and run here, without a Docker daemon: buildah builds, podman runs.

The tools come from Debian (scripts/setup-system.sh, run by `make setup`); the base images are made
locally with debootstrap (scripts/debian-base.sh, cached under .run/images), so nothing is pulled from a
container registry. The podman flags are the ones scripts/image_stack.py uses (vfs storage, runc, host
network, explicit ulimits), loaded from there so the test and `make run-images` cannot drift apart.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
TAG = os.environ.get("GMCO_IMAGES_TAG", "dev")


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def image_stack() -> ModuleType:
    """scripts/image_stack.py: PODMAN, RUN_FLAGS, image_ref(), ImageStack."""
    return _load(ROOT / "scripts" / "image_stack.py")


@pytest.fixture(scope="session")
def tools() -> None:
    missing = [t for t in ("debootstrap", "buildah", "podman", "runc") if shutil.which(t) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: `make system` (scripts/setup-system.sh) installs them")


def build(*images: str) -> None:
    """scripts/build-images.sh with buildah on the local Debian base (layers cached between runs)."""
    env = {**os.environ, "ENGINE": "buildah", "IMAGE_BASE": "debian", "TAG": TAG}
    result = subprocess.run(["bash", str(ROOT / "scripts" / "build-images.sh"), *images], cwd=ROOT, env=env,
                            check=False, capture_output=True, text=True, timeout=3000)
    assert result.returncode == 0, (f"build-images.sh {' '.join(images)} failed:\n"
                                    f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")


@pytest.fixture(scope="session")
def build_images(tools) -> Callable[..., None]:
    """build("router", ...): the images, tagged gmco/<name>:$GMCO_IMAGES_TAG (default dev)."""
    return build


@pytest.fixture(scope="session")
def tag() -> str:
    return TAG


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def router_image(build_images, image_stack) -> str:
    build_images("router")
    return image_stack.image_ref("router", TAG)
