"""The docs are a map: every relative link in README.md and docs/*.md reaches a file (and, for
``#anchors`` into Markdown, a heading), and the front page stays short and keeps the line that
``.ci/run`` executes. Pure text parsing: no jax, well under a second."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


# [text](target) and ![alt](target); code spans and fenced blocks are removed first.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)


def _prose(text: str) -> str:
    return CODE_SPAN.sub("", FENCE.sub("", text))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|<[^>]+>", "", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for heading in HEADING.findall(FENCE.sub("", page.read_text())):
        slug = _slug(heading)
        n = seen.get(slug, 0)
        anchors.add(slug if n == 0 else f"{slug}-{n}")
        seen[slug] = n + 1
    return anchors


def _links():
    for page in PAGES:
        for target in LINK.findall(_prose(page.read_text())):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
                continue
            yield page, target


LINKS = list(_links())


@pytest.mark.parametrize(("page", "target"), LINKS,
                         ids=[f"{p.relative_to(ROOT)}->{t}" for p, t in LINKS])
def test_relative_link_resolves(page, target):
    path, _, anchor = target.partition("#")
    dest = (page.parent / path).resolve() if path else page
    rel = dest.relative_to(ROOT).as_posix() if dest.is_relative_to(ROOT) else str(dest)
    assert dest.exists(), f"{page.relative_to(ROOT)} links to {target}, which does not exist"
    if anchor and dest.suffix == ".md":
        assert anchor in _anchors(dest), (
            f"{page.relative_to(ROOT)} links to {target}: no heading with anchor #{anchor} "
            f"in {rel} (headings: {sorted(_anchors(dest))})")


def test_docs_pages_exist():
    for name in ["data", "models", "trainer", "parallel", "parity", "benchmarks"]:
        assert (ROOT / "docs" / f"{name}.md").is_file(), f"docs/{name}.md is missing"
    assert "## Your own model" in (ROOT / "docs" / "models.md").read_text().splitlines()


def test_readme_is_a_short_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; the front page stays at or under 200"


def test_readme_keeps_the_ci_test_command():
    # .ci/run executes the line two lines after the marker (the first line inside the fence).
    lines = (ROOT / "README.md").read_text().splitlines()
    assert lines.count("<!-- test-command -->") == 1
    i = lines.index("<!-- test-command -->")
    assert lines[i + 1] == "```bash"
    assert lines[i + 2].startswith('pip install -e ".[torch,test]" && python -m pytest -q')
    assert lines[i + 3] == "```"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {t.partition("#")[0] for p, t in LINKS if p.name == "README.md"}
    for page in PAGES[1:]:
        assert page.relative_to(ROOT).as_posix() in linked, f"README.md does not link {page.name}"
