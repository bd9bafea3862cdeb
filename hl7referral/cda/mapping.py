"""Declarative mappings: ``mappings/*.toml`` turn v2 fields into a :class:`Referral`.

A mapping file mirrors the model. At its top level, besides ``name``,
``description``, ``messages`` and ``[tables]``, every key is a field of
:class:`~hl7referral.cda.model.Referral`; a nested table fills a nested object
(``[patient]``, ``[patient.owner]``, ``[referring]``); a table with
``each = "DG1(*)"`` fills a list, one item per segment, with paths relative
to that segment (``code = "3"``). A rule is a path string, or a table::

    referral_id = { path = "RF1-6", fn = "ei", required = true }
    gender      = { path = "PID-8", table = "gender" }
    telecom     = { paths = ["PID-13(*)", "PID-14(*)"] }
    referral_type = { default = { code = "44383000", system = "SNOMED", display = "Patient referral" } }
    veterinary  = { present = "PID-35" }

``fn`` names a function (:mod:`functions`); without it the target's type
picks one. ``table`` translates values through ``[tables.NAME]`` (``"*"`` is
the fallback). ``default`` applies when nothing was found; ``required`` makes
absence an error that names the field.

Invariants
----------
* Loading validates everything (keys against the model, paths, functions,
  tables) and raises ConfigError naming file, line and key; applying a loaded
  mapping never raises on message content: absences become
  :class:`MissingField` errors (required rules) or stay empty.
* The message is read, never changed.
"""

from __future__ import annotations

import copy
import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path as FilePath
from typing import Any

from ..config.schema import ConfigError, locate, toml_error_line
from ..v2 import charset
from ..v2.header import BrokenHeader, NotHL7, read_header
from ..v2.parse import ParseError
from ..v2.paths import Path, PathError, Reader, parse_path
from . import functions as fnlib
from .model import OID, Address, Code, Identifier, Name, Referral, Telecom

RESERVED = {"name", "description", "messages", "tables"}
RULE_KEYS = {"path", "paths", "fn", "table", "default", "required", "present"}


@dataclass(frozen=True)
class MissingField:
    """A required value the message did not have."""

    target: str  # e.g. "referral_id"
    path: str  # e.g. "RF1-6"
    segment: str
    field: int

    @property
    def text(self) -> str:
        return f"required {self.path} ({self.target}) is missing or empty"


@dataclass
class MappingResult:
    referral: Referral
    errors: list[MissingField] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


@dataclass
class Rule:
    target: str
    kind: type
    many: bool
    paths: list[Path]
    fn: Any
    table: dict | None
    default: Any
    required: bool
    present: bool


@dataclass
class ObjectMap:
    """Rules for one model object; ``each`` when it is a list of objects."""

    cls: type
    rules: list[Rule]
    children: dict[str, "ObjectMap"]
    each: Path | None = None


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap(tp: Any) -> tuple[type, bool, bool]:
    """(item type, is a list, is optional) for a dataclass field's annotation."""
    optional = False
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp, optional = args[0], True
    if typing.get_origin(tp) is list:
        return typing.get_args(tp)[0], True, optional
    return tp, False, optional


class Mapping:
    def __init__(self, name: str, file: str, root: ObjectMap, messages: tuple[str, ...], description: str = ""):
        self.name = name
        self.file = file
        self.root = root
        self.messages = messages
        self.description = description

    # -- loading -------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | FilePath, functions: dict | None = None) -> "Mapping":
        file = str(path)
        try:
            text = FilePath(path).read_text("utf-8")
            data = tomllib.loads(text)
        except OSError as exc:
            raise ConfigError(file, 0, "", f"cannot read: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(file, toml_error_line(exc), "", f"not valid TOML: {exc}") from None
        functions = functions if functions is not None else fnlib.registry()

        def fail(key: str, message: str):
            raise ConfigError(file, locate(text, key) or 0, key, message)

        if "name" not in data:
            fail("name", "required")
        tables = data.get("tables", {})
        if not isinstance(tables, dict) or not all(isinstance(t, dict) for t in tables.values()):
            fail("tables", "each table must be a TOML table of value = translation")
        messages = data.get("messages", [])
        if not isinstance(messages, list) or not all(isinstance(m, str) for m in messages):
            fail("messages", "must be a list like [\"REF^I12\"]")
        body = {k: v for k, v in data.items() if k not in RESERVED}
        root = _compile(Referral, body, "", fail, functions, tables)
        return cls(data["name"], file, root, tuple(messages), data.get("description", ""))

    # -- applying ------------------------------------------------------------------

    def apply(self, reader: Reader) -> MappingResult:
        errors: list[MissingField] = []
        referral = _fill(self.root, Referral(), reader, None, errors, "")
        return MappingResult(referral, errors)

    def map_bytes(self, raw: bytes, default_charset: str = "ascii") -> MappingResult:
        """Map a message's raw bytes; raises ParseError if it has no readable MSH or charset."""
        return self.apply(read_message(raw, default_charset))


def _compile(cls: type, body: dict, prefix: str, fail, functions: dict, tables: dict,
             in_each: bool = False) -> ObjectMap:
    hints = _hints(cls)
    rules: list[Rule] = []
    children: dict[str, ObjectMap] = {}
    each = None
    for key, spec in body.items():
        where = f"{prefix}{key}"
        if key == "each" and prefix:
            try:
                each = parse_path(spec)
            except (PathError, AttributeError) as exc:
                fail(where, str(exc))
            if each.segment is None or each.field is not None:
                fail(where, "each names repeating segments, e.g. \"DG1(*)\"")
            continue
        if key not in hints:
            known = ", ".join(sorted(h for h in hints))
            fail(where, f"{cls.__name__} has no field {key!r} (fields: {known})")
        item, many, _ = _unwrap(hints[key])
        if dataclasses.is_dataclass(item) and isinstance(spec, dict) and not (RULE_KEYS & set(spec)):
            if many and "each" not in spec:
                fail(where, f"a list of {item.__name__}: give each = \"SEGMENT(*)\"")
            child = _compile(item, spec, f"{where}.", fail, functions, tables, in_each or "each" in spec)
            children[key] = child
            continue
        rule = _rule(key, item, many, spec, where, fail, functions, tables)
        if not in_each and any(p.segment is None for p in rule.paths):
            fail(where, "a path without a segment name (like \"3.1\") only works in a list with each = \"SEG(*)\"")
        rules.append(rule)
    return ObjectMap(cls, rules, children, each)


def _rule(key, item, many, spec, where, fail, functions, tables) -> Rule:
    if isinstance(spec, str):
        spec = {"path": spec}
    if not isinstance(spec, dict):
        fail(where, "a rule is a path string or a table with path/paths/fn/table/default/required")
    unknown = set(spec) - RULE_KEYS
    if unknown:
        fail(where, f"unknown rule key(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(RULE_KEYS))})")
    raw_paths = spec.get("paths") or ([spec["path"]] if "path" in spec else [])
    if "present" in spec:
        raw_paths = [spec["present"]]
    paths = []
    for p in raw_paths:
        try:
            paths.append(parse_path(p))
        except (PathError, AttributeError) as exc:
            fail(where, str(exc))
    fn = None
    if "fn" in spec:
        if spec["fn"] not in functions:
            fail(where, f"unknown function {spec['fn']!r} (known: {', '.join(sorted(functions))})")
        fn = functions[spec["fn"]]
    elif item is not bool:
        fn = functions[fnlib.BY_TYPE.get(item, "text")]
    table = None
    if "table" in spec:
        if spec["table"] not in tables:
            fail(where, f"no [tables.{spec['table']}] in this file")
        table = {k: _constant(item, v, where, fail) for k, v in tables[spec["table"]].items()}
    default = _constant(item, spec["default"], where, fail) if "default" in spec else None
    if not paths and default is None:
        fail(where, "needs a path (or paths, present, default)")
    return Rule(key, item, many, paths, fn, table, default, bool(spec.get("required")), "present" in spec)


def _constant(item: type, value: Any, where: str, fail) -> Any:
    """A default or table value as the target type (dicts become dataclasses)."""
    if dataclasses.is_dataclass(item):
        if isinstance(value, str) and item is Code:
            return Code(code=value)
        if not isinstance(value, dict):
            fail(where, f"a {item.__name__} value is a table, e.g. {{ code = \"M\", system = \"ADMIN_GENDER\" }}")
        names = {f.name for f in dataclasses.fields(item)}
        bad = set(value) - names
        if bad:
            fail(where, f"{item.__name__} has no field(s) {', '.join(sorted(bad))}")
        value = dict(value)
        if "system" in value:
            value["system"] = OID.get(value["system"], value["system"])
        return item(**value)
    return value


def _fill(omap: ObjectMap, obj: Any, reader: Reader, segment, errors: list, prefix: str) -> Any:
    for rule in omap.rules:
        # The rule's values: the first filled one (all of them for a list or a present rule), else
        # its default. Inline rather than a function of its own: this runs for every rule of every message.
        values = []
        fn, table = rule.fn, rule.table
        first_only = not rule.many and not rule.present
        for path in rule.paths:
            for raw in reader.values(path, segment):
                value = fn(raw) if fn else raw
                if table is not None and value is not None:
                    value = _translate(table, value)
                if (value != "") if type(value) is str else _filled(value):
                    values.append(value)
                    if first_only:
                        break
            if values and first_only:
                break
        if not values and rule.default is not None:
            values = [_clone(rule.default)]
        if rule.present:
            setattr(obj, rule.target, bool(values))
            continue
        if not values:
            if rule.required:
                p = rule.paths[0] if rule.paths else None
                seg = (p.segment or (str(segment[0]) if segment is not None else "")) if p else ""
                named = " or ".join(_describe(q, segment) for q in rule.paths) or "(default)"
                errors.append(MissingField(prefix + rule.target, named, seg, (p.field or 0) if p else 0))
            continue
        setattr(obj, rule.target, values if rule.many else values[0])  # a list made for this object
    for name, child in omap.children.items():
        if child.each is not None:
            items = []
            for seg in reader.values(child.each):
                item = _fill(child, child.cls(), reader, seg, errors, f"{prefix}{name}[].")
                if any(_filled(getattr(item, r.target)) for r in child.rules):
                    items.append(item)
            setattr(obj, name, items)
        else:
            current = getattr(obj, name)
            # *obj* was made for this message, so its nested objects are its own: filled in place.
            target = current if current is not None else child.cls()
            filled = _fill(child, target, reader, segment, errors, f"{prefix}{name}.")
            optional = current is None
            if not optional or any(_filled(getattr(filled, r.target)) for r in child.rules) or any(
                    _filled(getattr(filled, n)) for n in child.children):
                setattr(obj, name, filled)
    return obj


# Value types that say for themselves whether they hold anything (they define __bool__); str first,
# the most common value, so that most values skip the dataclass walk.
_SELF_TESTING = (str, Code, Identifier, Name, Address, Telecom)


def _filled(value: Any) -> bool:
    if type(value) is str:
        return value != ""
    if value is None or isinstance(value, _SELF_TESTING):
        return bool(value)
    if dataclasses.is_dataclass(value):
        return any(_filled(getattr(value, f.name)) for f in dataclasses.fields(value))
    return bool(value)


def _clone(value: Any) -> Any:
    """A fresh copy of a table or default value (each referral gets its own)."""
    if type(value) in (Code, Identifier):  # flat: strings only
        # copy.copy, without the copy module's reduce round trip: the same fields in a new object
        new = object.__new__(type(value))
        new.__dict__.update(value.__dict__)
        return new
    if isinstance(value, (Code, Identifier)):
        return copy.copy(value)
    return copy.deepcopy(value) if dataclasses.is_dataclass(value) or isinstance(value, list) else value


def _translate(table: dict, value: Any) -> Any:
    key = value.code if isinstance(value, Code) else str(value)
    if key in table:
        return _clone(table[key])
    if "*" in table:
        return _clone(table["*"])
    return value


def _describe(path: Path, segment) -> str:
    if path.segment is None and segment is not None:
        return f"{segment[0]}-{path.field}"
    return path.text


def read_message(raw: bytes, default_charset: str = "ascii") -> Reader:
    """A path reader over a message's bytes, decoded in its declared charset (MSH-18)."""
    try:
        header = read_header(raw)
        return Reader._from_bytes_read(raw, charset.codec_for(header.charset, default_charset), header)
    except (NotHL7, BrokenHeader, charset.UnknownCharset, UnicodeDecodeError) as exc:
        raise ParseError(str(exc)) from None


def load_mappings(directory: str | FilePath) -> dict[str, Mapping]:
    """Every ``*.toml`` mapping in a directory, by name."""
    directory = FilePath(directory)
    if not directory.is_dir():
        raise ConfigError(str(directory), 0, "", "mappings directory not found")
    functions = fnlib.registry()
    out: dict[str, Mapping] = {}
    for p in sorted(directory.glob("*.toml")):
        m = Mapping.load(p, functions)
        if m.name in out:
            raise ConfigError(str(p), 1, "name", f"mapping name {m.name!r} also used in {out[m.name].file}")
        out[m.name] = m
    return out
