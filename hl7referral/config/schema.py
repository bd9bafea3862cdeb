"""Validate TOML data against a declarative schema; errors name file, line, key.

A schema is a dict of key -> spec, where a spec is a Python type (``str``,
``int``, ``float``, ``bool``), ``[str]`` for a list of strings, a tuple of
allowed string values, a nested dict (a table), or ``[dict]`` (an array of
tables). Unknown keys are errors: a misspelt key silently ignored is how an
interface stops routing without anyone noticing.

``tomllib`` keeps no positions, so :func:`locate` finds a key's line by
walking the text's table headers: good enough to point an analyst at it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any


@dataclass
class ConfigError(Exception):
    file: str
    line: int
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


def toml_error_line(exc: Exception) -> int:
    """The line of a TOMLDecodeError (3.11 has it only in the message)."""
    line = getattr(exc, "lineno", None)
    if line:
        return line
    m = re.search(r"line (\d+)", str(exc))
    return int(m.group(1)) if m else 0


_HEADER = re.compile(r"^\s*\[(\[?)\s*([A-Za-z0-9_.\-\"']+)\s*\]\]?")


def locate(text: str, dotted: str) -> int:
    """1-based line of ``dotted`` (``listeners.0.endpoint``) in TOML ``text``; 0 if not found."""
    parts = dotted.split(".")
    leaf = parts[-1]
    # The table the leaf lives in, with array indexes: "listeners.0".
    table: list[str] = []
    counts: dict[str, int] = {}
    target = parts[:-1]
    best = 0
    for number, line in enumerate(text.splitlines(), start=1):
        m = _HEADER.match(line)
        if m:
            name = m.group(2).replace('"', "").replace("'", "")
            if m.group(1):  # [[array]]
                counts[name] = counts.get(name, -1) + 1
                table = name.split(".") + [str(counts[name])]
            else:
                table = name.split(".")
                # a sub-table of the latest array element: [listeners.tls]
                head = table[0]
                if head in counts:
                    table = [head, str(counts[head]), *table[1:]]
            if table == parts:
                best = best or number
            continue
        if table == target and re.match(rf"^\s*[\"']?{re.escape(leaf)}[\"']?\s*=", line):
            return number
    return best


def validate(data: Any, schema: Any, *, file: str, text: str, path: str = "") -> None:
    """Raise :class:`ConfigError` for the first thing in ``data`` that ``schema`` forbids."""

    def fail(key: str, message: str) -> None:
        raise ConfigError(file, locate(text, key) if key else 0, key, message)

    if isinstance(schema, dict):
        if not isinstance(data, dict):
            fail(path, "must be a table")
        for key, value in data.items():
            sub = f"{path}.{key}" if path else key
            if key not in schema:
                known = ", ".join(sorted(schema))
                fail(sub, f"unknown key (known here: {known})")
            validate(value, schema[key], file=file, text=text, path=sub)
        return
    if isinstance(schema, list):
        if not isinstance(data, list):
            fail(path, "must be a list")
        for i, item in enumerate(data):
            validate(item, schema[0], file=file, text=text, path=f"{path}.{i}" if isinstance(schema[0], dict) else path)
        return
    if isinstance(schema, tuple):
        if data not in schema:
            fail(path, f"must be one of {', '.join(map(repr, schema))}, not {data!r}")
        return
    if schema is float:
        if isinstance(data, bool) or not isinstance(data, (int, float)):
            fail(path, f"must be a number, not {data!r}")
        if data < 0:
            fail(path, "must not be negative")
        return
    if schema is int:
        if isinstance(data, bool) or not isinstance(data, int):
            fail(path, f"must be a whole number, not {data!r}")
        if data < 0:
            fail(path, "must not be negative")
        return
    if not isinstance(data, schema):
        fail(path, f"must be a {schema.__name__}, not {data!r}")
