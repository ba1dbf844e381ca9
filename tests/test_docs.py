"""The documentation a newcomer reads stays inside the repository: every markdown link and every path named in
backticks in README.md and docs/*.md resolves to a file or folder of the repository (nothing outside it, such as
a `../shared/...` design note of the development machine, and nothing missing), and README.md reaches every page
under docs/."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])

LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
FENCE = re.compile(r"^(```|~~~)")
DOCUMENT_SUFFIXES = (".md", ".rst", ".pdf", ".html")


def _inside(path: Path) -> bool:
    return path == ROOT or ROOT in path.parents


def _prose(text: str) -> str:
    """The text outside fenced code blocks (commands in them name the user's files, not ours)."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return "\n".join(out)


def problems(doc: Path, text: str) -> list[str]:
    """What in `text` (the contents of `doc`) points outside the repository or to nothing."""
    found = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):  # a URL (http:, mailto:) or an anchor
            continue
        path = (doc.parent / target.split("#", 1)[0]).resolve()
        if not _inside(path):
            found.append(f"link {target}: outside the repository ({path})")
        elif not path.exists():
            found.append(f"link {target}: no such file ({path.relative_to(ROOT)})")
    for span in CODE_SPAN.findall(_prose(text)):
        token = span.strip().split()[0] if span.strip() else ""
        # Backticked paths name files of other projects too (`scripts/data_process/nq_search.py` of Search-R1, a
        # tar member `./model_config.yaml`) and the user's own (`/data/wiki-18.jsonl`, `/tmp/sdsearch-slurm`):
        # only a path that climbs out of the page's folder is checked, and an absolute path to a document
        # (`/work/shared/papers.md`: a design note of the development machine). The rule does not depend on
        # where the checkout is (CI's may sit in /tmp, next to the scratch paths the docs name).
        if token.startswith("../"):  # relative to the page: must stay in the repository and exist
            path = (doc.parent / token).resolve()
            if not _inside(path):
                found.append(f"path `{token}`: outside the repository ({path})")
            elif not path.exists() and not re.search(r"[<>*{}$]", token):
                found.append(f"path `{token}`: no such file")
        elif token.startswith("/"):
            path = Path(token)
            if path.suffix.lower() in DOCUMENT_SUFFIXES and not _inside(path):
                found.append(f"path `{token}`: a document outside the repository")
    return found


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_and_paths_stay_in_the_repository_and_exist(doc):
    assert problems(doc, doc.read_text(encoding="utf-8")) == []


def test_the_checker_finds_what_it_must():
    readme = ROOT / "README.md"
    bad = {
        "Design: `../shared/DESIGN.md`.": "outside the repository",
        "See [the design](../shared/DESIGN.md).": "outside the repository",
        "See [missing](docs/nope.md).": "no such file",
        "Read [it](nope.md) first.": "no such file",
        "Notes: `/work/shared/papers.md`.": "outside the repository",
    }
    for text, words in bad.items():
        found = problems(readme, text)
        assert len(found) == 1 and words in found[0], (text, found)
    good = ("[docs](docs/architecture.md) [web](https://example.com/x) [here](#metrics) `docs/methods.md` "
            "`/data/wiki-18.jsonl` `/tmp/sdsearch-slurm` `runs/<job>/final` `docs/*.md`\n```\npython ../shared/x.py\n```")
    assert problems(readme, good) == []
    doc = ROOT / "docs" / "cluster.md"
    assert problems(doc, "[back](../README.md) `../README.md`") == []
    assert problems(doc, "[up](../../x.md)")[0].startswith("link ../../x.md: outside the repository")


def test_the_readme_reaches_every_page_under_docs():
    linked = {(ROOT / t.split("#", 1)[0]).resolve() for t in LINK.findall((ROOT / "README.md").read_text())}
    missing = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in linked]
    assert missing == []
