"""README and docs/ stand alone: no links outside the repository, no internal labels, no dead links."""
import re

import pytest

from .conftest import ROOT

DOCS = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
FORBIDDEN = re.compile(r"\.\./shared|/work/|seeds? 0\d\d|issue'?s'? targets?|(?-i:METHODS\.md)|\bsession \d", re.I)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_doc_stands_alone(doc):
    text = doc.read_text(encoding="utf-8")
    assert not FORBIDDEN.search(text), FORBIDDEN.search(text).group(0)
    for target in re.findall(r"\]\(([^)#\s]+)", text):
        if not re.match(r"[a-z]+://", target):
            assert (doc.parent / target).exists(), f"{doc.name}: dead link {target}"


def test_declared_license_is_the_license_file():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'license = {text = "MIT"}' in pyproject
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
