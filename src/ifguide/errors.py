"""The exception types the CLI turns into a one-line message and a non-zero exit."""

from __future__ import annotations

from pathlib import Path


class IfguideError(Exception):
    """A user-facing error: the message says what is wrong and how to fix it."""


class ArtifactError(IfguideError):
    """An artifact that is damaged or stale; the CLI, which owns the commands, names the one that rebuilds
    `path`."""

    def __init__(self, path: Path, problem: str):
        self.path, self.problem = Path(path), problem
        super().__init__(f"{problem}; rebuild it with its stage and --force")

    def with_command(self, command: str) -> str:
        """The message naming the command that rebuilds the artifact."""
        return f"{self.problem}; rebuild it with `{command}`"


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a resumable stage; the message says where a rerun starts."""
