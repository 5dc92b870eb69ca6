"""The project's user-facing error types (bad input, not bugs)."""

from __future__ import annotations


class UserError(Exception):
    """An error caused by the user's input: the CLI prints it without a traceback (exit 2)."""


class FactFormatError(UserError, ValueError):
    """A malformed fact file: the message names the file, the line and the field."""

    def __init__(
        self, path: str, line: int | None, field: str | None, problem: str, unit: str = "line"
    ):
        self.path, self.line, self.field, self.problem = path, line, field, problem
        where = str(path)
        if line is not None:
            where += f", {unit} {line}"
        if field is not None:
            where += f", field '{field}'"
        super().__init__(f"{where}: {problem}")
