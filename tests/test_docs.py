"""The documentation stays usable: every relative link in the README, the changelog, docs/ and bench/README.md
points at a file (and a heading) that exists, the README's test command is the one CI runs, and no file refers
to notes outside the repository."""
from __future__ import annotations

import os
import re
import unicodedata

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", "CHANGELOG.md", "bench/README.md"] + sorted(
    f"docs/{f}" for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md"))

# [text](target) and ![alt](target), not inside code; an optional "title" after the target is dropped.
_LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_FENCE = re.compile(r"^```.*?^```", re.S | re.M)
_CODE = re.compile(r"`[^`\n]*`")


def _text(path: str) -> str:
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def _links(md: str) -> list[str]:
    md = _CODE.sub("", _FENCE.sub("", md))
    return _LINK.findall(md)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case; letters, marks and digits of any script, '_', '-' and spaces
    kept, everything else dropped; spaces to '-'."""
    heading = _CODE.sub(lambda m: m.group(0)[1:-1], heading.strip()).lower()
    kept = "".join(c for c in heading if c in " -_" or unicodedata.category(c)[0] in "LMN")
    return kept.replace(" ", "-")


def _anchors(md: str) -> set[str]:
    md = _FENCE.sub("", md)
    seen: dict[str, int] = {}
    out = set()
    for h in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", md, re.M):
        s = _slug(h)
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


def test_slug_follows_github():
    assert _slug("The paper initialisation as a rank-2r term") == "the-paper-initialisation-as-a-rank-2r-term"
    assert _slug("Merge in place, with no out×in temporary") == "merge-in-place-with-no-outin-temporary"
    assert _slug("Build switches (environment, read by `setup.py`)") == "build-switches-environment-read-by-setuppy"


def test_link_parser_finds_links_and_skips_code():
    md = "see [a](x.md#h) and ![img](p.png \"t\")\n`[no](code.md)`\n```\n[no](fence.md)\n```\n"
    assert _links(md) == ["x.md#h", "p.png"]


@pytest.mark.parametrize("doc", DOCS)
def test_relative_links_resolve(doc):
    md = _text(doc)
    links = _links(md)
    bad = []
    for target in links:
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:, ...
            continue
        path, _, anchor = target.partition("#")
        if path:
            full = os.path.normpath(os.path.join(ROOT, os.path.dirname(doc), path))
            if not full.startswith(ROOT + os.sep) and full != ROOT:
                bad.append(f"{target}: outside the repository")
                continue
            if not os.path.exists(full):
                bad.append(f"{target}: no such file")
                continue
        else:
            full = os.path.join(ROOT, doc)
        if anchor and full.endswith(".md") and anchor not in _anchors(_text(os.path.relpath(full, ROOT))):
            bad.append(f"{target}: no heading #{anchor}")
    assert not bad, f"{doc}: broken links:\n" + "\n".join(bad)


def test_every_doc_is_linked_from_the_readme():
    linked = {os.path.normpath(t.partition("#")[0]) for t in _links(_text("README.md"))}
    missing = [d for d in DOCS if d != "README.md" and d not in linked]
    assert not missing, f"README.md does not link to {missing}"


def test_readme_test_command_is_the_one_ci_runs():
    ci = _text(".ci/run").splitlines()
    marker = next(i for i, line in enumerate(ci) if "the README's test command, verbatim" in line)
    command = ci[marker + 1]
    assert command.strip() and not command.startswith("#")
    assert command in _text("README.md").splitlines(), f"README.md lacks CI's test command:\n{command}"


# Folders that are not part of the repository's content: VCS data, environments, build and test outputs.
_SKIP_DIRS = {".git", ".venv", "venv", "__pycache__", "build", "dist", "build-cmake", "build-asan",
              ".pytest_cache", ".hypothesis", "node_modules"}


def _repo_files():
    for dirpath, dirnames, filenames in os.walk(ROOT):
        rel = os.path.relpath(dirpath, ROOT)
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.endswith(".egg-info")
                       and os.path.join(rel, d) != os.path.join("bench", "out")]
        for f in filenames:
            if f.endswith((".so", ".png", ".pyc")):
                continue
            yield os.path.relpath(os.path.join(dirpath, f), ROOT)


def test_no_file_refers_to_notes_outside_the_repository():
    # spelled in pieces, so this file does not match itself
    needles = ["../" + "shared", "DESIGN" + ".md"]
    hits = []
    for rel in _repo_files():
        try:
            text = _text(rel)
        except (UnicodeDecodeError, OSError):
            continue
        hits += [f"{rel}: {n}" for n in needles if n in text]
    assert not hits, "files that refer to notes outside the repository:\n" + "\n".join(hits)
