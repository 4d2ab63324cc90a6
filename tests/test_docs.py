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


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block, read line by line."""
    blocks, language, body = [], None, []
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            if language is None:
                language, body = line.strip()[3:], []
            else:
                blocks.append((language, "\n".join(body)))
                language = None
        elif language is not None:
            body.append(line)
    return blocks


def command_lines() -> list[tuple[str, list[str]]]:
    """Every `ifguide ...` command of a shell block (no language, bash or sh) in README.md and docs/, as
    argv."""
    import shlex

    found = []
    for document in DOCUMENTS:
        for language, body in fenced_blocks(document.read_text(encoding="utf-8")):
            if language not in ("", "bash", "sh"):
                continue
            for line in body.replace("\\\n", " ").splitlines():
                for part in line.split("#", 1)[0].replace("&&", ";").split(";"):
                    words = shlex.split(part.replace("$i", "0").replace("$m", "baseline").replace("$p", "rtp")
                                        .rstrip().removesuffix("&"))
                    named = [k for k, word in enumerate(words) if (word == "ifguide"
                                                                   or word.endswith("/ifguide"))
                             and (words[k - 1:k] == ["--"] or all("=" in w for w in words[:k]))]
                    if named:
                        found.append((f"{document.name}: {part.strip()}", words[named[0] + 1:]))
    return found


@pytest.mark.parametrize("where,argv", command_lines(), ids=lambda x: x if isinstance(x, str) else "")
def test_every_documented_command_parses(where, argv):
    from ifguide.cli import _parser

    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:
        if argv[-1:] == ["--help"] and exc.code == 0:
            return
        raise AssertionError(f"{where} does not parse") from None
    assert args.command, where
