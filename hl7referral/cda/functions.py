"""Named mapping functions: one v2 data type in, one model value out.

A mapping rule names a function with ``fn = "..."``; without one, the target
field's type picks it (Name <- XPN, Address <- XAD, Telecom <- XTN, Code <-
CWE, Identifier <- CX). Sites add functions through the
``hl7referral.functions`` entry point group: a callable taking the value
(a repetition: components of subcomponents, or a string) and returning the
model value, or None for "no value".

Invariant: a function never raises on odd input; it returns None or a
partial value, and the mapping decides whether absence is an error.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from importlib.metadata import entry_points

from .model import OID, Address, Code, Identifier, Name, Telecom

Value = list[list[str]] | str
Function = Callable[[Value], object]

# HL7 table 0396 coding-system names as senders write them -> OIDs.
SYSTEMS = {
    "I10": OID["ICD10CM"], "I10C": OID["ICD10CM"], "ICD10CM": OID["ICD10CM"], "ICD-10-CM": OID["ICD10CM"],
    "I9": OID["ICD9CM"], "I9C": OID["ICD9CM"], "I9CM": OID["ICD9CM"],
    "SCT": OID["SNOMED"], "SNM": OID["SNOMED"], "SNOMED": OID["SNOMED"], "SNOMEDCT": OID["SNOMED"],
    "LN": OID["LOINC"], "LOINC": OID["LOINC"],
    "RXNORM": OID["RXNORM"], "RXN": OID["RXNORM"],
    "NDC": OID["NDC"], "CVX": OID["CVX"], "UCUM": OID["UCUM"],
}

# Compiled once: these run for every field of every message.
_TS = re.compile(r"\d{4}(\d{2}){0,5}(\.\d{1,4})?([+-]\d{4})?")
_OID = re.compile(r"[0-2](\.\d+)+")
_NOT_PHONE = re.compile(r"[^\d+X x-]")
_DIGIT = re.compile(r"\d")


# The functions below make model values with positional arguments, in the field order of
# model.py: a dataclass made with keywords costs twice as much, and they run for most fields.


def _c(value: Value, comp: int, sub: int = 1) -> str:
    if isinstance(value, str):
        return value.strip() if comp == 1 and sub == 1 else ""
    if comp > len(value):
        return ""
    subs = value[comp - 1]
    return subs[sub - 1].strip() if sub <= len(subs) else ""


def _firsts(value: Value, n: int) -> list[str]:
    """``[_c(value, 1), …, _c(value, n)]`` in one call (the functions below run for most fields)."""
    if isinstance(value, str):
        return [value.strip()] + [""] * (n - 1)
    out = [subs[0].strip() if subs else "" for subs in value[:n]]
    if len(out) < n:
        out += [""] * (n - len(out))
    return out


def _c1(value: Value) -> str:
    """``_c(value, 1)``."""
    if isinstance(value, str):
        return value.strip()
    if value:
        subs = value[0]
        if subs:
            return subs[0].strip()
    return ""


def text(value: Value) -> str | None:
    """The first component (the usual 'just the value')."""
    if isinstance(value, str):  # _c1(value), inlined: the function of most rules
        return value.strip() or None
    if value:
        subs = value[0]
        if subs:
            return subs[0].strip() or None
    return None


def ts(value: Value) -> str | None:
    """A TS/DTM: the digits and offset, as HL7 wrote them; None if not a timestamp."""
    v = _c1(value)
    return v if _TS.fullmatch(v) else None


def cwe(value: Value) -> Code | None:
    """CE/CWE: code ^ text ^ system (^ alternate code ^ alternate text ^ alternate system)."""
    c = _firsts(value, 6)
    code, display, system = c[0], c[1], c[2]
    if not code and isinstance(value, list) and len(value) > 3:  # only an alternate code
        code, display, system = c[3], c[4] or display, c[5]
    if not (code or display):
        return None
    upper = system.upper()
    oid = SYSTEMS.get(upper)
    if oid is None:
        oid = system if _OID.fullmatch(system) else ""
    if upper.startswith("HL7") and system[3:].isdigit():
        oid = f"2.16.840.1.113883.12.{int(system[3:])}"
    return Code(code, oid, display, system, display)  # code, system, display, system_name, original_text


def _hd(value: Value, comp: int) -> tuple[str, str]:
    """A hierarchic designator (namespace & universal id & type) inside component ``comp``."""
    ns, uid, kind = _c(value, comp, 1), _c(value, comp, 2), _c(value, comp, 3)
    root = uid if (kind.upper() in ("ISO", "") and _OID.fullmatch(uid or "")) else ""
    return root, ns or uid


def cx(value: Value) -> Identifier | None:
    """CX: id ^ check digit ^ scheme ^ assigning authority (HD) ^ id type."""
    ext = _c(value, 1)
    if not ext:
        return None
    root, authority = _hd(value, 4)
    return Identifier(root, ext, authority or _c(value, 5))  # root, extension, authority


def ei(value: Value) -> Identifier | None:
    """EI: entity id ^ namespace id ^ universal id ^ universal id type (RF1-6, ORC-2)."""
    ext = _c(value, 1)
    if not ext:
        return None
    uid, kind = _c(value, 3), _c(value, 4)
    root = uid if kind.upper() in ("ISO", "") and _OID.fullmatch(uid or "") else ""
    return Identifier(root, ext, _c(value, 2) or uid)


def xpn(value: Value) -> Name | None:
    """XPN: family ^ given ^ middle ^ suffix ^ prefix ^ degree."""
    family, given, middle, suffix, prefix = _firsts(value, 5)
    if not (family or given):
        return None
    return Name(family, [g for g in (given, middle) if g], prefix, suffix)  # family, given, prefix, suffix


def xcn_name(value: Value) -> Name | None:
    """XCN (ORC-12, OBR-16, PRD-2 in some feeds): id ^ family ^ given ^ middle ^ suffix ^ prefix."""
    family, given, middle = _c(value, 2), _c(value, 3), _c(value, 4)
    if not (family or given):
        return None
    return Name(family=family, given=[g for g in (given, middle) if g], prefix=_c(value, 6), suffix=_c(value, 5))


def xcn_id(value: Value) -> Identifier | None:
    """XCN's id (component 1) with its authority (component 9) and type (13): NPI ids get the NPI root."""
    ext = _c(value, 1)
    if not ext:
        return None
    root, authority = _hd(value, 9)
    if _c(value, 13).upper() == "NPI" or authority.upper() == "NPI":
        root = OID["NPI"]
    return Identifier(root=root, extension=ext, authority=authority)


def pi(value: Value) -> Identifier | None:
    """PI (PRD-7): id ^ type ^ other; the NPI root only when the type says NPI."""
    ext, kind = _c(value, 1), _c(value, 2)
    if not ext:
        return None
    if kind.upper() == "NPI":
        return Identifier(OID["NPI"], ext, "NPI")
    return Identifier("", ext, kind)


def npi(value: Value) -> Identifier | None:
    """A bare NPI (e.g. PRD-7.1 when PRD-7.2 says NPI)."""
    ext = _c(value, 1)
    return Identifier(root=OID["NPI"], extension=ext, authority="NPI") if ext else None


def xad(value: Value) -> Address | None:
    """XAD: street ^ other ^ city ^ state ^ zip ^ country ^ type."""
    street, other, city, state, postal_code, country, kind = _firsts(value, 7)
    lines = [x for x in (street, other) if x]
    # lines, city, state, postal_code, country, use
    addr = Address(lines, city, state, postal_code, country, {"B": "WP", "O": "WP", "W": "WP"}.get(kind.upper(), "H"))
    return addr if addr else None


_USE = {"PRN": "HP", "ORN": "HP", "WPN": "WP", "VHN": "HV", "ASN": "AS", "EMR": "EC", "NET": "",
        "PRS": "MC", "BPN": "PG"}


def xtn(value: Value) -> Telecom | None:
    """XTN: a phone number or an email address as a URL (tel:/mailto:/fax:)."""
    c = _firsts(value, 12)
    use, equipment = c[1].upper(), c[2].upper()
    email = c[3]
    if email or equipment in ("INTERNET", "X.400") or "@" in c[0]:
        addr = email or c[0]
        return Telecom(f"mailto:{addr}", _USE.get(use, "")) if addr else None  # value, use
    country, area, local, ext = c[4], c[5], c[6], c[7]
    if local:
        digits = f"{area}{local}"
        number = f"+{country}-{digits}" if country else digits
    else:
        number = c[11] or c[0]
    number = _NOT_PHONE.sub("", number.replace("(", "").replace(")", "-")).strip(" -")
    if not _DIGIT.search(number):
        return None
    if ext:
        number += f";ext={ext}"
    scheme = "fax" if equipment == "FX" else "tel"
    return Telecom(f"{scheme}:{number.replace(' ', '-')}", "MC" if equipment == "CP" else _USE.get(use, ""))


BUILTIN: dict[str, Function] = {
    "text": text, "ts": ts, "cwe": cwe, "ce": cwe, "cx": cx, "ei": ei, "xpn": xpn, "xcn_name": xcn_name,
    "xcn_id": xcn_id, "npi": npi, "pi": pi, "xad": xad, "xtn": xtn,
}
BY_TYPE: dict[type, str] = {Name: "xpn", Address: "xad", Telecom: "xtn", Code: "cwe", Identifier: "cx", str: "text"}


def registry() -> dict[str, Function]:
    """Built-in functions plus those of installed plugins (entry point group hl7referral.functions)."""
    functions = dict(BUILTIN)
    for ep in entry_points(group="hl7referral.functions"):
        functions[ep.name] = ep.load()
    return functions
