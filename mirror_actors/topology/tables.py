"""Typed reading of one TOML table, with errors that name the file, the key and what was wanted.

Shared by the two files a user writes: topology files (``topology.spec``) and
serve files (``serve.config``).  Each subclass names its own error type and adds
the readers only it needs; what they have in common (a table, its allowed keys,
a value of the right type, a number of seconds) reads and fails the same way.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar


class FileError(ValueError):
    """A file that cannot be used; the message says the file, the key and the problem."""

    def __init__(self, file: str, key: str, problem: str) -> None:
        self.file = file
        self.key = key
        self.problem = problem
        super().__init__(f"{file}: {key}: {problem}")


class Table:
    """One TOML table of ``file`` at ``key`` ("" for the top), holding only ``allowed`` keys."""

    error_type: ClassVar[type[FileError]] = FileError

    def __init__(self, file: str, key: str, data: object, allowed: tuple[str, ...]) -> None:
        self.file = file
        self.key = key
        if not isinstance(data, dict):
            raise self.error_type(file, key, f"expected a table, got {show(data)}")
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise self.error_type(
                file, self.at(unknown[0]), f"unknown key; expected one of {', '.join(allowed)}"
            )
        self.data: dict[str, Any] = data

    def at(self, name: str) -> str:
        """The dotted key of ``name`` in this table."""
        return f"{self.key}.{name}" if self.key else name

    def error(self, name: str, problem: str) -> FileError:
        return self.error_type(self.file, self.at(name), problem)

    def has(self, name: str) -> bool:
        return name in self.data

    def get(
        self, name: str, kind: type | tuple[type, ...], default: Any = ..., what: str = ""
    ) -> Any:
        """The value of ``name``, of type ``kind`` (a boolean is not an integer here);
        ``default`` when missing, an error saying what was expected if no default."""
        if name not in self.data:
            if default is ...:
                raise self.error(name, f"missing; expected {what or kind_name(kind)}")
            return default
        value = self.data[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            raise self.error(name, f"expected {what or kind_name(kind)}, got a boolean")
        if not isinstance(value, kind):
            raise self.error(name, f"expected {what or kind_name(kind)}, got {show(value)}")
        return value

    def string(self, name: str, what: str = "a string") -> str:
        value: str = self.get(name, str, what=what)
        return value

    def seconds(self, name: str) -> float:
        """A number of seconds > 0 (finite)."""
        value = self.get(name, (int, float), what="a number of seconds")
        if not (math.isfinite(value) and value > 0):
            raise self.error(name, f"expected a number of seconds > 0, got {value!r}")
        return float(value)


def kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {str: "a string", int: "an integer", float: "a number", list: "a list", dict: "a table"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def show(value: object) -> str:
    """A value as an error quotes it: short, and a table or a long list by its kind."""
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return f"a list {value!r}" if len(repr(value)) <= 60 else "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
