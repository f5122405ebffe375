"""Generate a large synthetic ontology (for benchmarks): a genre tree of any size plus the sample's
ratings, regions, formats and devices.

    python -m gmco_ontology.generate --genres 10000 --out big_ontology.yaml
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import yaml

from gmco_ontology.loader import SAMPLE


def generate(n_genres: int, seed: int = 0, branching: int = 8) -> dict:
    rng = np.random.default_rng(seed)
    base = yaml.safe_load(SAMPLE.read_text())
    genres = []
    for code in range(n_genres):
        g = {"id": f"g{code}", "name": f"Genre {code}", "code": code}
        if code >= 20:  # 20 roots; every other genre hangs below an earlier one (bounded fan-out)
            g["parent"] = f"g{int(rng.integers(max(0, code // branching - 5), code // branching + 1))}"
        genres.append(g)
    for region in base["regions"]:
        region.pop("licenses_all_except", None)
    base["genres"] = genres
    return base


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--genres", type=int, default=10_000)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    a.out.write_text(yaml.safe_dump(generate(a.genres, a.seed), sort_keys=False))
    print(f"wrote {a.genres} genres to {a.out}")


if __name__ == "__main__":
    main()
