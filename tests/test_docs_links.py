"""The results pages hang together: docs/results.md indexes every section of every chapter, and every link to a
section of a chapter (from the README, the index or another chapter) lands on a heading that exists."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHAPTERS = REPO / "docs/results"
LINK = re.compile(r"\]\((?:docs/)?(?:results/)?([\w\-]+\.md)#([^)\s]+)\)")


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation and symbols dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def headings(page: Path, level: str = "#") -> list[str]:
    return [line.lstrip("#").strip() for line in page.read_text().splitlines()
            if line.startswith(level) and line.lstrip("#").startswith(" ")]


def test_anchor_follows_githubs_rule():
    assert anchor("Claim 3 on the one pipeline (AVX-512, seed 0)") == "claim-3-on-the-one-pipeline-avx-512-seed-0"
    assert anchor("The kNN rule met with poisons at L∞ 16") == "the-knn-rule-met-with-poisons-at-l-16"
    assert anchor("The poisons' amplitude: `w_neutral`") == "the-poisons-amplitude-w_neutral"


def test_every_chapter_section_is_in_the_results_index():
    index = (REPO / "docs/results.md").read_text()
    listed = {(page, target) for page, target in LINK.findall(index)}
    missing = [(page.name, heading) for page in sorted(CHAPTERS.glob("*.md")) for heading in headings(page, "## ")
               if (page.name, anchor(heading)) not in listed]
    assert not missing, missing


def test_every_section_link_lands_on_a_heading():
    targets = {page.name: {anchor(h) for h in headings(page)} for page in CHAPTERS.glob("*.md")}
    sources = [REPO / "README.md", REPO / "docs/results.md", REPO / "docs/history.md", *CHAPTERS.glob("*.md")]
    broken = [(source.name, page, target) for source in sources for page, target in LINK.findall(source.read_text())
              if page in targets and target not in targets[page]]
    assert targets and not broken, broken
