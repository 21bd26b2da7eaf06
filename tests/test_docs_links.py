"""The README and docs/: every relative link resolves (file, and heading for ``#anchor`` links into
markdown), and the README stays short enough for a newcomer to finish (at most 250 lines)."""

from __future__ import annotations

import re
import sys
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
CODE_SPAN = re.compile(r"(`+).+?\1")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    lines, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append((number, line))
    return lines


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: link markup reduced to its text, lower case, every character
    that is not a letter, mark, number, connector (``_``), space or hyphen dropped, spaces → hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # [text](url) → text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags
    text = text.strip().lower()
    kept = "".join(ch for ch in text if ch in " -" or unicodedata.category(ch)[0] in "LMN"
                   or unicodedata.category(ch) == "Pc")
    return kept.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file, with GitHub's -1, -2, ... suffixes for repeats."""
    seen: dict[str, int] = {}
    result = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def relative_links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link that is neither a URL with a scheme nor inside code."""
    links = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        reference = REFERENCE_DEFINITION.match(line)
        targets = [reference.group(1)] if reference else INLINE_LINK.findall(CODE_SPAN.sub("", line))
        links += [(number, target) for target in targets if not SCHEME.match(target)]
    return links


def link_problem(source: Path, target: str) -> str | None:
    """Why ``target`` (as written in ``source``) does not resolve, or None."""
    location, _, anchor = target.partition("#")
    destination = (source.parent / location).resolve() if location else source
    if not destination.exists():
        return f"{location}: no such file or directory"
    if ROOT not in destination.parents and destination != ROOT:
        return f"{location}: outside the repository"
    if anchor and destination.suffix == ".md" and anchor not in anchors(destination):
        return f"#{anchor}: no such heading in {destination.relative_to(ROOT)}"
    return None


def test_readme_is_at_most_250_lines():
    lines = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/"


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path):
    problems = [f"{path.relative_to(ROOT)}:{number}: {problem}"
                for number, target in relative_links(path)
                if (problem := link_problem(path, target))]
    assert not problems, "\n".join(problems)


def test_the_docs_are_linked_from_the_readme():
    linked = {(ROOT / target.partition("#")[0]).resolve() for _, target in relative_links(ROOT / "README.md")}
    missing = [p.name for p in markdown_files()[1:] if p.resolve() not in linked]
    assert not missing, f"docs pages missing from the README's index: {missing}"


@pytest.mark.parametrize(("heading", "slug"), [
    ("Quantised base (SmolLM2-135M-Instruct in nf4, GSM8K)", "quantised-base-smollm2-135m-instruct-in-nf4-gsm8k"),
    ("transformers' `load_adapter` is refused", "transformers-load_adapter-is-refused"),
    ("`pica demo` and `scripts/demo.sh`", "pica-demo-and-scriptsdemosh"),
    ("On a CPU with llama.cpp or Ollama", "on-a-cpu-with-llamacpp-or-ollama"),
    ("Dtype of `M`", "dtype-of-m"),
    ("See [the docs](docs/api.md) now", "see-the-docs-now"),
    ("Speed & size", "speed--size"),
])
def test_github_slug(heading, slug):
    assert github_slug(heading) == slug


def test_checker_finds_broken_links_and_anchors(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Title\n\n## Part one\n\n```\n# not a heading\n[x](gone.md)\n```\n",
                                            encoding="utf-8")
    page = tmp_path / "README.md"
    page.write_text("[ok](docs/a.md#part-one) [bad anchor](docs/a.md#not-a-heading) [gone](docs/b.md)\n"
                    "[web](https://example.com/x.md) `[code](nowhere.md)` [self](#intro)\n\n# Intro\n",
                    encoding="utf-8")
    problems = [link_problem(page, target) for _, target in relative_links(page)]
    assert problems == [None, "#not-a-heading: no such heading in docs/a.md", "docs/b.md: no such file or directory",
                        None]
    assert relative_links(tmp_path / "docs" / "a.md") == []
