"""The docs hold together: every relative link and #anchor in README.md and docs/*.md resolves,
README.md stays short, every docs page is on the README's map, and every config key is documented.

Anchors are GitHub's heading slugs (lower case, punctuation dropped, spaces to hyphens, ``-1``,
``-2`` for repeats), computed from the target page's headings outside code blocks; links inside
code (fenced blocks, inline code) are not links and are not checked. No network: absolute URLs
are left alone.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import pytest

from conftest import REPO

README_LIMIT = 20 * 1024  # bytes: the README is the front page; the rest lives in docs/
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_ANCHOR = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"")
FENCE = re.compile(r"^\s*(```|~~~)")


def doc_pages(root: Path = REPO) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks, with inline code spans blanked."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append(re.sub(r"(`+)(?:(?!\1).)+?\1", "``", line))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    fenced = False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if fenced:
            continue
        found.update(HTML_ANCHOR.findall(line))
        m = re.match(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(text: str) -> list[str]:
    return [target for line in prose_lines(text) for target in LINK.findall(line)]


def link_problems(root: Path = REPO, texts: Optional[dict[Path, str]] = None) -> list[str]:
    """Every broken relative link or anchor in README.md and docs/*.md. ``texts`` replaces the
    text of some pages (the mutation tests break a link without touching the files)."""
    texts = texts or {}

    def read(path: Path) -> str:
        return texts[path] if path in texts else path.read_text(encoding="utf-8")

    problems = []
    for page in doc_pages(root):
        for target in links(read(page)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto: ...: not ours to check offline
                continue
            path_part, _, anchor = target.partition("#")
            dest = (page.parent / path_part).resolve() if path_part else page
            where = f"{page.relative_to(root)}: ({target})"
            if root.resolve() not in dest.parents and dest != root.resolve():
                problems.append(f"{where} points outside the repository")
                continue
            if not dest.exists():
                problems.append(f"{where}: {path_part} does not exist")
                continue
            if anchor:
                if dest.suffix != ".md":
                    problems.append(f"{where}: an anchor into {dest.name}, which is not a Markdown page")
                elif anchor not in anchors(read(dest)):
                    problems.append(f"{where}: no heading #{anchor} in {dest.relative_to(root.resolve())}")
    return problems


def test_every_relative_link_and_anchor_resolves():
    problems = link_problems()
    assert not problems, "broken links:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("old, new", [
    ("(docs/output.md)", "(docs/outputs.md)"),  # a page that does not exist
    ("(docs/configuration.md)", "(docs/configuration.md#no-such-heading)"),  # an anchor that does not exist
])
def test_link_check_fails_on_a_broken_link(old, new):
    readme = REPO / "README.md"
    text = readme.read_text(encoding="utf-8")
    assert old in text
    before = set(link_problems())
    found = [p for p in link_problems(texts={readme: text.replace(old, new, 1)}) if p not in before]
    assert len(found) == 1 and new.strip("()") in found[0]


def test_broken_anchor_inside_docs_is_found():
    page = REPO / "docs" / "output.md"
    text = page.read_text(encoding="utf-8")
    assert "(running.md#" in text
    before = set(link_problems())
    found = [p for p in link_problems(texts={page: text.replace("(running.md#", "(running.md#x-", 1)}) if p not in before]
    assert len(found) == 1 and found[0].startswith("docs/output.md")


def test_slugs_are_githubs():
    assert slug("Prompts: manifests and the Python API") == "prompts-manifests-and-the-python-api"
    assert slug("KubeRay RayCluster + `ray job submit`") == "kuberay-raycluster--ray-job-submit"
    assert slug("`sam.batch_size` and [links](x.md)") == "sambatch_size-and-links"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n### A!") == {"a", "a-1", "a-2"}
    assert links("[a](x.md) `[b](y.md)`\n```\n[c](z.md)\n```\n![d](img.png \"t\")") == ["x.md", "img.png"]


def test_readme_is_short():
    size = len((REPO / "README.md").read_bytes())
    assert size <= README_LIMIT, f"README.md is {size} bytes (at most {README_LIMIT}): move detail into docs/"


def test_readme_maps_every_docs_page():
    readme_links = {t.partition("#")[0] for t in links((REPO / "README.md").read_text(encoding="utf-8"))}
    pages = {f"docs/{p.name}" for p in (REPO / "docs").glob("*.md")}
    assert pages and pages <= readme_links, f"docs pages missing from the README's map: {sorted(pages - readme_links)}"


def test_readme_keeps_the_two_setup_commands():
    """The Makefile's two set-up commands, as the README shows them (the Makefile says so)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```bash\n(make run .*?)```", text, re.S)
    assert block, "README.md has no ```bash block starting with make run"
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    assert commands == ["make run", "make test"]


def test_every_config_key_is_documented():
    from pipeline.config import allowed_keys

    page = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    missing = [key for key in allowed_keys() if f"`{key}`" not in page]
    assert missing == [], f"config keys not in docs/configuration.md: {missing}"
