"""Every runnable-looking block of the documentation carries a marker: run (executed by
tests/e2e/test_e2e_docs.py against the local stack) or illustrative, with a reason (tests/docs/harness.py)."""

from __future__ import annotations

from pathlib import Path

from docs_harness import REPO, all_blocks, markdown_blocks, notes_blocks, rewrite_addresses, rewrite_run_dir


def test_every_block_is_marked_run_or_illustrative_with_a_reason() -> None:
    blocks = all_blocks()
    assert len(blocks) >= 5 and any(b.path.name == "NOTES.txt" for b in blocks)
    unmarked = [b.where for b in blocks if b.marker is None]
    assert not unmarked, ("unmarked blocks (precede each with <!-- run --> or <!-- illustrative: why -->; "
                          f"in NOTES.txt {{{{- /* run */}}}}): {unmarked}")
    no_reason = [b.where for b in blocks if b.marker == "illustrative" and not b.reason]
    assert not no_reason, f"illustrative without a reason: {no_reason}"


def test_the_harness_finds_marks_and_misses(tmp_path: Path) -> None:
    doc = tmp_path / "d.md"
    doc.write_text("text\n<!-- run -->\n```bash\necho a\n```\n\n```python\nprint(1)\n```\n"
                   "<!-- illustrative: needs a cluster -->\n   ```sh\n   kubectl get pods\n   ```\n"
                   "```\nnot a command block\n```\n<!-- run -->\n\n```console\n$ echo b\nb\n```\n")
    blocks = markdown_blocks(doc)
    assert [(b.lang, b.marker, b.reason) for b in blocks] == [
        ("bash", "run", ""), ("python", None, ""), ("sh", "illustrative", "needs a cluster"),
        ("console", None, "")]  # a blank line between marker and fence does not count
    assert blocks[2].code == "kubectl get pods\n"
    notes = tmp_path / "NOTES.txt"
    notes.write_text("Hi\n{{- /* run */}}\n  grpcurl -plaintext localhost:8080 list\n"
                     "  kubectl -n {{ .Release.Namespace }} get pods\n")
    got = notes_blocks(notes)
    assert [(b.marker, b.code) for b in got] == [("run", "grpcurl -plaintext localhost:8080 list\n"),
                                                 (None, "kubectl -n gmco get pods\n")]


def test_addresses_are_rewritten_to_the_stack() -> None:
    stack = {"envoy": "127.0.0.1:1", "shard": "127.0.0.1:2", "cache": "127.0.0.1:3", "ontology": "127.0.0.1:4",
             "rl_state": "127.0.0.1:5"}
    code = "a 127.0.0.1:8080 b localhost:50050 c 127.0.0.1:50052 d 127.0.0.1:50054 e 127.0.0.1:7001 f 1.2.3.4:50052"
    assert rewrite_addresses(code, stack) == ("a 127.0.0.1:1 b 127.0.0.1:1 c 127.0.0.1:3 d 127.0.0.1:5 "
                                              "e 127.0.0.1:7001 f 1.2.3.4:50052")


def test_the_run_dir_is_rewritten() -> None:
    code = 'cat .run/stack.json; ls .run; x=".run/logs"; keep my.run/x a/.run/b .runner'
    assert rewrite_run_dir(code, "/tmp/s") == 'cat /tmp/s/stack.json; ls /tmp/s; x="/tmp/s/logs"; keep my.run/x a/.run/b .runner'


def test_repo_root() -> None:
    assert (REPO / "pyproject.toml").exists()
