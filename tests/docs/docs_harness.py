"""The documentation's code blocks: found, checked for a marker, and run against a local stack.

Convention. In ``README.md``, ``docs/*.md`` and every ``*/README.md`` of a package, each fenced block
labelled ``bash``, ``sh``, ``shell``, ``console`` or ``python`` is directly preceded by one of

    <!-- run -->                      executed by tests/e2e/test_e2e_docs.py against the local stack
    <!-- illustrative: <reason> -->   not executed, for the reason given

In the chart's ``NOTES.txt`` (plain text shown after ``helm install``), each command line (indented, starting
with kubectl, grpcurl, buf, helm or curl) is directly preceded by the Helm comment ``{{- /* run */}}`` or
``{{- /* illustrative: <reason> */}}``, which renders to nothing.

Running. A block runs in a fresh temporary directory with the virtual environment first on PATH, then
``.tools/bin`` (``buf``, from scripts/install-buf.sh) and ``tests/docs/bin`` (a ``grpcurl`` that runs
``buf curl``). The documentation's addresses are the services' default ports and the local stack's Envoy
(``127.0.0.1:8080``); they are rewritten to the addresses of the stack under test: 8080 and the router's
50050 -> Envoy, 50051 -> shard 0, 50052 cache, 50053 ontology, 50054 rl_state; the run directory ``.run`` becomes the stack's
(also in ``GMCO_STACK_RUN_DIR``, which the ``gmco`` commands read). ``console`` blocks run their ``$ `` lines.
``GMCO_REPO`` names the repository root.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LANGS = {"bash", "sh", "shell", "console", "python"}
MARKER = re.compile(r"^\s*<!--\s*(run|illustrative:\s*(?P<reason>.*?))\s*-->\s*$")
NOTES_MARKER = re.compile(r"^\s*\{\{-?\s*/\*\s*(run|illustrative:\s*(?P<reason>.*?))\s*\*/\s*-?\}\}\s*$")
NOTES_COMMAND = re.compile(r"^\s{2,}(kubectl|grpcurl|buf|helm|curl)\b")
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[A-Za-z0-9_+-]*)\s*$")
NOTES = REPO / "deploy/helm/gmco/templates/NOTES.txt"


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence (or the NOTES.txt command)
    lang: str
    code: str
    marker: str | None  # "run", "illustrative", or None (unmarked)
    reason: str = ""

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def documents() -> list[Path]:
    found = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    for parent in ("services", "libs", "deploy", "bench", "tests"):
        found += sorted(p for p in (REPO / parent).rglob("README.md")
                        if "node_modules" not in p.parts and ".venv" not in p.parts)
    return [p for p in found if p.exists()]


def _marker(line: str, pattern: re.Pattern[str]) -> tuple[str | None, str]:
    m = pattern.match(line)
    if not m:
        return None, ""
    if m.group(1) == "run":
        return "run", ""
    return "illustrative", (m.group("reason") or "").strip()


def markdown_blocks(path: Path) -> list[Block]:
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, lang, indent = i, m.group("lang").lower(), m.group("indent")
        i += 1
        body = []
        while i < len(lines) and not re.match(rf"^{re.escape(indent)}```\s*$", lines[i]):
            line = lines[i]
            body.append(line[len(indent):] if line.startswith(indent) else line.lstrip())
            i += 1
        i += 1
        if lang in LANGS:
            marker, reason = _marker(lines[start - 1], MARKER) if start > 0 else (None, "")
            blocks.append(Block(path, start + 1, lang, "\n".join(body) + "\n", marker, reason))
    return blocks


def notes_blocks(path: Path = NOTES) -> list[Block]:
    lines = path.read_text().splitlines()
    blocks = []
    for i, line in enumerate(lines):
        if NOTES_COMMAND.match(line):
            marker, reason = _marker(lines[i - 1], NOTES_MARKER) if i > 0 else (None, "")
            blocks.append(Block(path, i + 1, "bash", _render_notes(line.strip()) + "\n", marker, reason))
    return blocks


def _render_notes(line: str) -> str:
    """The values a default install (release "gmco" in namespace "gmco") renders into a NOTES.txt line."""
    return re.sub(r"\{\{-?\s*\.Release\.(Name|Namespace)\s*-?\}\}", "gmco", line)


def all_blocks() -> list[Block]:
    blocks = [b for doc in documents() for b in markdown_blocks(doc)]
    if NOTES.exists():
        blocks += notes_blocks()
    return blocks


def rewrite_addresses(code: str, addresses: dict[str, str]) -> str:
    """Replace the documented default addresses (``host:port`` with port 8080, 50050..50054) by the stack's."""
    ports = {"8080": "envoy", "50050": "envoy", "50051": "shard", "50052": "cache", "50053": "ontology",
             "50054": "rl_state"}

    def sub(m: re.Match[str]) -> str:
        return addresses[ports[m.group("port")]]

    return re.sub(r"\b(?:127\.0\.0\.1|localhost):(?P<port>8080|5005[0-4])\b", sub, code)


def rewrite_run_dir(code: str, run_dir: str) -> str:
    """The local stack's run directory ``.run`` (make run's) -> the stack under test's."""
    return re.sub(r"(?<![\w./-])\.run(?![\w.-])", run_dir, code)


def script_of(block: Block) -> str:
    """The shell script (or Python source) that runs the block."""
    if block.lang == "console":
        return "\n".join(line[2:] for line in block.code.splitlines() if line.startswith("$ ")) + "\n"
    return block.code
