"""Every documentation block marked ``<!-- run -->`` (README.md, docs/*.md, the package READMEs, the chart's
NOTES.txt) runs against the session's local stack and exits 0 (tests/docs/docs_harness.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from docs_harness import REPO, Block, all_blocks, rewrite_addresses, rewrite_run_dir, script_of
from gmco_stack.stack import Stack

pytestmark = pytest.mark.e2e

RUN = [b for b in all_blocks() if b.marker == "run"]
BUF = REPO / ".tools" / "bin" / "buf"


def _addresses(stack: Stack) -> dict[str, str]:
    shard = stack.shard_services[0]
    return {"envoy": stack.envoy_target, "shard": shard.target, "cache": stack.services["cache"].target,
            "ontology": stack.services["ontology"].target, "rl_state": stack.services["rl_state"].target}


def _run(stack: Stack, block: Block, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    assert BUF.exists(), "buf is missing: `make buf` (scripts/install-buf.sh) installs it into .tools/bin"
    run_dir = str(stack.config.run_dir)
    code = rewrite_run_dir(rewrite_addresses(script_of(block), _addresses(stack)), run_dir)
    env = {**os.environ, "GMCO_REPO": str(REPO), "GMCO_BUF": str(BUF), "GMCO_STACK_RUN_DIR": run_dir,
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), str(BUF.parent),
                                    str(REPO / "tests" / "docs" / "bin"), os.environ.get("PATH", "")])}
    if block.lang == "python":
        (tmp_path / "block.py").write_text(code)
        argv = [sys.executable, str(tmp_path / "block.py")]
    else:
        argv = ["bash", "-euo", "pipefail", "-c", code]
    return subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180, check=False)


@pytest.mark.parametrize("block", RUN, ids=[b.where for b in RUN])
def test_documented_block_runs(stack: Stack, block: Block, tmp_path: Path) -> None:
    done = _run(stack, block, tmp_path)
    code = rewrite_run_dir(rewrite_addresses(script_of(block), _addresses(stack)), str(stack.config.run_dir))
    assert done.returncode == 0, (f"{block.where} exited {done.returncode}\n--- code ---\n{code}"
                                  f"--- stdout ---\n{done.stdout[-3000:]}\n--- stderr ---\n{done.stderr[-3000:]}")


@pytest.mark.parametrize(("code", "says"), [
    ("grpcurl -plaintext -d '{\"user_id\": \"42\"}' 127.0.0.1:8080 gmco.router.v1.RecommendationService/Recommend",
     "invalid_argument"),  # the router's INVALID_ARGUMENT (k missing), through the real CLI
    ("buf curl --protocol grpc --http2-prior-knowledge http://127.0.0.1:8080/gmco.router.v1.RecommendationService/Nope",
     "Nope"),
])
def test_a_failing_call_fails_the_block(stack: Stack, tmp_path: Path, code: str, says: str) -> None:
    done = _run(stack, Block(REPO / "README.md", 0, "bash", code + "\n", "run"), tmp_path)
    assert done.returncode != 0 and says in done.stdout + done.stderr, done.stdout + done.stderr
