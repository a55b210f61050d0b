"""The documentation a user follows: every relative link and #anchor in README.md and docs/ resolves, every .md file
the code or the docs name exists, and the design page lists the whole study schema."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def prose(text: str) -> str:
    """Markdown without fenced code blocks and inline code spans (their brackets are no links)."""
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    out = set()
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(path: Path) -> list[str]:
    return [m.group(1) for m in LINK.finditer(prose(path.read_text(encoding="utf-8")))]


def test_the_anchor_rule_is_githubs(tmp_path: Path) -> None:
    page = tmp_path / "p.md"
    page.write_text("# The study file (schema `capsule-batch/1`)\n## Crashes, Ctrl-C and resume\n## Notes\n## Notes\n"
                    "```\n# not a heading\n```\n", encoding="utf-8")
    assert anchors(page) == {"the-study-file-schema-capsule-batch1", "crashes-ctrl-c-and-resume", "notes", "notes-1"}
    page.write_text("[a](x.md#y) `[b](not-a-link.md)` ![img](img/p.png \"title\")\n```\n[c](in-code.md)\n```\n",
                    encoding="utf-8")
    assert links(page) == ["x.md#y", "img/p.png"]


@pytest.mark.parametrize("page", DOCS, ids=[str(p.relative_to(REPO)) for p in DOCS])
def test_every_relative_link_and_anchor_resolves(page: Path) -> None:
    bad = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest.relative_to(REPO)}")
    assert not bad, f"{page.relative_to(REPO)}: " + "; ".join(bad)


def test_every_markdown_file_named_in_code_and_docs_exists() -> None:
    """A pointer to a page that is not in the repository helps nobody: name what is here, or say the fact."""
    present = {p.name for p in REPO.rglob("*.md") if ".venv" not in p.parts}
    named: dict[str, set[str]] = {}
    for base in ("capsule_batch", "train", "tests", "benchmarks", "docs"):
        for f in (REPO / base).rglob("*"):
            if f.suffix in (".py", ".md", ".yaml", ".js", ".html", ".sh") and f.is_file() and f != Path(__file__):
                for name in re.findall(r"\b([\w.-]+\.md)\b", f.read_text(encoding="utf-8", errors="replace")):
                    named.setdefault(Path(name).name, set()).add(str(f.relative_to(REPO)))
    for f in (REPO / "README.md", REPO / "Makefile", REPO / "setup.cfg"):
        for name in re.findall(r"\b([\w.-]+\.md)\b", f.read_text(encoding="utf-8")):
            named.setdefault(Path(name).name, set()).add(f.name)
    missing = {n: sorted(w) for n, w in named.items() if n not in present}
    assert not missing, missing


def test_the_design_page_lists_every_root_attribute() -> None:
    from capsule_batch.study.store import ROOT_ATTRS

    design = (REPO / "docs" / "design.md").read_text(encoding="utf-8")
    assert [k for k in ROOT_ATTRS if f"`{k}`" not in design] == []
