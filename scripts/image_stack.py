"""The local stack from the built images: every GMC-O service in its own container, run by podman.

``make run-images`` (after ``make images``) runs what ``make run`` runs, with the same layout
(gmco_stack.Stack: 2 shards, cache, ontology, rl_state, 2 routers, Envoy on 8080), except that each
service is ``podman run gmco/<svc>:<tag>`` instead of ``python -m gmco_<svc>``. Envoy stays the host's
binary (the chart uses the upstream Envoy image). Ctrl-C stops every container.

Each container runs as the images run in the chart: UID 10001, read-only root filesystem with a tmpfs on
/tmp, the host's network (ports as in ``make run``), and the stack's run directory (catalogue, snapshots,
SQLite files) bind-mounted at the same path. Only GMCO_* variables reach a container.

    .venv/bin/python scripts/image_stack.py [--tag dev] [--run-dir .run/image-stack] [--items 100000]

tests/images/test_images_stack.py starts it on free ports and runs the e2e smoke test against it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Self

from gmco_stack.envoy import REPO_ROOT
from gmco_stack.stack import Stack, StackConfig, wait_for_signal

IMAGE_UID = 10001
# What podman needs on these machines: vfs storage and runc work inside an unprivileged CI container,
# and the default ulimits (taken from the host's hard limits) are refused.
PODMAN = ["podman", "--storage-driver", os.environ.get("GMCO_STORAGE_DRIVER", "vfs"), "--runtime", "runc"]
RUN_FLAGS = ["--network", "host", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024",
             "--read-only", "--tmpfs", "/tmp", "--no-healthcheck"]
# Stack service name prefix -> (image name, the service's variable prefix)
IMAGES = {"ontology": ("ontology", "GMCO_ONTOLOGY_"), "rl_state": ("rl-state", "GMCO_RL_STATE_"),
          "cache": ("cache", "GMCO_CACHE_"), "shard": ("shard", "GMCO_SHARD_"),
          "router": ("router", "GMCO_ROUTER_")}


def image_ref(name: str, tag: str) -> str:
    return f"localhost/gmco/{name}:{tag}"


class ImageStack(Stack):
    """A :class:`Stack` whose services (all but Envoy) are containers of the built images."""

    def __init__(self, config: StackConfig, tag: str = "dev") -> None:
        super().__init__(config)
        self.tag = tag
        self.label = f"gmco.stack={uuid.uuid4().hex[:12]}"
        run_dir = str(config.run_dir.resolve())
        for name, svc in self.services.items():
            if name == "envoy":
                continue
            image, prefix = IMAGES[name.split("-")[0]]
            env = {k: v for k, v in svc.env.items() if k.startswith("GMCO_")}
            env[f"{prefix}HOST"] = "127.0.0.1"  # the host network: stay on loopback, as `make run` does
            svc.argv = [*PODMAN, "run", "--rm", "--name", f"gmco-{name}-{self.label[-12:]}", "--label", self.label,
                        *RUN_FLAGS, "--volume", f"{run_dir}:{run_dir}",
                        *(f"--env={k}={v}" for k, v in sorted(env.items())), image_ref(image, tag)]

    def missing_images(self) -> list[str]:
        wanted = sorted({image_ref(image, self.tag) for image, _ in IMAGES.values()})
        return [ref for ref in wanted
                if subprocess.run([*PODMAN, "image", "exists", ref], check=False).returncode != 0]

    def start(self) -> Self:
        if missing := self.missing_images():
            raise RuntimeError(f"images not built: {', '.join(missing)} (make images)")
        # The containers' user writes snapshots, SQLite files and the catalogue log into the run directory.
        run_dir = self.config.run_dir
        (run_dir / "snapshots").mkdir(parents=True, exist_ok=True)
        for path in (run_dir, run_dir / "snapshots", *(run_dir / "snapshots").iterdir(), *run_dir.glob("*.sqlite3*")):
            shutil.chown(path, IMAGE_UID, IMAGE_UID)
        return super().start()

    def stop(self) -> None:
        super().stop()  # SIGTERM to each `podman run`, which passes it to the service: a graceful drain
        # A container whose podman process was killed outright would outlive it.
        leftover = subprocess.run([*PODMAN, "ps", "-aq", "--filter", f"label={self.label}"], check=False,
                                  capture_output=True, text=True).stdout.split()
        if leftover:
            subprocess.run([*PODMAN, "rm", "-f", *leftover], check=False, capture_output=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tag", default=os.environ.get("TAG", "dev"), help="image tag (%(default)s)")
    p.add_argument("--run-dir", type=Path, default=REPO_ROOT / ".run" / "image-stack", help="%(default)s")
    p.add_argument("--items", type=int, default=100_000, help="catalogue size (%(default)s)")
    p.add_argument("--dim", type=int, default=1024, help="embedding dimension (%(default)s)")
    p.add_argument("--base-port", type=int, default=7000, help="as make run (%(default)s)")
    args = p.parse_args(argv)
    config = StackConfig(items=args.items, dim=args.dim, run_dir=args.run_dir.resolve(), base_port=args.base_port)
    stack = ImageStack(config, args.tag)
    try:
        stack.start()
    except (RuntimeError, TimeoutError) as exc:
        sys.exit(f"image-stack: could not start: {exc}\nLogs are in {config.run_dir / 'logs'}")
    print(f"GMC-O is up from the {args.tag} images; Envoy listens on {stack.envoy_target}. "
          f"Logs: {config.run_dir / 'logs'}. Ctrl-C stops everything.", flush=True)
    try:
        wait_for_signal()
    finally:
        stack.stop()


if __name__ == "__main__":
    main()
