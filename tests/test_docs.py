"""The user-facing documents speak of the project only: no words about how it is developed."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PROCESS_WORDS = re.compile(r"\bsessions?\b|\bstop \d+\b|\bprevious machine\b|\bCEO\b|\bthis task\b|"
                           r"\bissue \d+\b|\bclosing note\b", re.IGNORECASE)


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_documents_name_no_development_process(document):
    found = [f"{document.name}:{number}: {match.group(0)!r}"
             for number, line in enumerate(document.read_text(encoding="utf-8").splitlines(), 1)
             for match in PROCESS_WORDS.finditer(line)]
    assert not found, "development-process wording in user documents: " + "; ".join(found)


def test_the_pattern_catches_what_it_is_for():
    for text in ("measured in an earlier session", "The restructuring (stop 25)", "the previous machine",
                 "as issue 29 asks"):
        assert PROCESS_WORDS.search(text), text
