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


TEST_MARKERS = {"<!-- test-command -->": "", "<!-- test-command: slow or integration -->": ' -m "slow or integration"'}


@pytest.mark.parametrize("marker", TEST_MARKERS)
def test_readme_keeps_the_ci_test_commands(marker):
    """.ci/run executes the line two lines after each marker (the first line inside the fence):
    the fast tier (pytest's default, see pyproject.toml) and then the rest."""
    lines = (ROOT / "README.md").read_text().splitlines()
    assert lines.count(marker) == 1
    i = lines.index(marker)
    assert lines[i + 1] == "```bash" and lines[i + 3] == "```"
    command = lines[i + 2]
    assert "python -m pytest -q" in command
    assert command.endswith("python -m pytest -q -n 2" + TEST_MARKERS[marker]), command
    ci = (ROOT / ".ci" / "run").read_text()
    assert marker in ci, f".ci/run does not read the command after {marker}"


def test_pytest_runs_the_fast_tier_by_default():
    import tomllib

    pytest_config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    addopts = pytest_config["addopts"]
    assert addopts[addopts.index("-m") + 1] == "not slow and not integration"
    assert addopts[addopts.index("--dist") + 1] == "loadfile"
    assert {m.split(":")[0] for m in pytest_config["markers"]} == {"slow", "integration"}


def test_the_trainer_config_table_lists_every_field():
    """docs/trainer.md's config table names every ``TrainerConfig`` field, each section's as
    ``section.field``, and no other (read from jaxlight/trainer_config.py's source: no import)."""
    import ast

    tree = ast.parse((ROOT / "jaxlight" / "trainer_config.py").read_text())
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}

    def fields(name):
        return [(n.target.id, ast.unparse(n.annotation)) for n in classes[name].body
                if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name) and not n.target.id.startswith("_")]

    expected = set()
    for name, annotation in fields("TrainerConfig"):
        if annotation in classes:  # a section: its fields, dotted
            expected |= {f"{name}.{field}" for field, _ in fields(annotation)}
        else:
            expected.add(name)
    page = (ROOT / "docs" / "trainer.md").read_text()
    table = page[page.index("**The config**"):]
    table = table[table.index("| field |"):]
    table = table[:table.index("\n\n")]
    documented = set()
    for row in table.splitlines()[2:]:
        documented |= set(re.findall(r"`([\w.]+)`", row.split("|")[1]))
    assert documented == expected, f"missing: {sorted(expected - documented)}, not fields: {sorted(documented - expected)}"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {t.partition("#")[0] for p, t in LINKS if p.name == "README.md"}
    for page in PAGES[1:]:
        assert page.relative_to(ROOT).as_posix() in linked, f"README.md does not link {page.name}"
