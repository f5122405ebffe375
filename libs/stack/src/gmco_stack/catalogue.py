"""The demo catalogue the local stack serves: generated once by ``gmco_common.datagen``, then reused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

MARKER = ".gmco-complete"


def ensure_catalogue(data_dir: Path, items: int, dim: int, seed: int) -> bool:
    """Generate ``items`` x ``dim`` FP16 items into ``data_dir`` unless a complete copy is there.

    Returns True when it generated. Generation shows the generator's progress bar; an interrupted run
    leaves no marker, so the next start generates again.
    """
    if (data_dir / MARKER).is_file():
        return False
    data_dir.mkdir(parents=True, exist_ok=True)
    print(f"gmco-stack: generating the demo catalogue ({items:,} x {dim} FP16) into {data_dir}", flush=True)
    cmd = [sys.executable, "-m", "gmco_common.datagen", "--out", str(data_dir), "--items", str(items),
           "--dim", str(dim), "--seed", str(seed)]
    result = subprocess.run(cmd, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"catalogue generation failed ({' '.join(cmd)} exited with {result.returncode})")
    (data_dir / MARKER).write_text(f"{items} {dim} {seed}\n")
    return True
