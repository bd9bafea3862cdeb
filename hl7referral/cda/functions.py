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


def _c(value: Value, comp: int, sub: int = 1) -> str:
    if isinstance(value, str):
        return value.strip() if comp == 1 and sub == 1 else ""
    if comp > len(value):
        return ""
    subs = value[comp - 1]
    return subs[sub - 1].strip() if sub <= len(subs) else ""


def text(value: Value) -> str | None:
    """The first component (the usual 'just the value')."""
    return _c(value, 1) or None


def ts(value: Value) -> str | None:
    """A TS/DTM: the digits and offset, as HL7 wrote them; None if not a timestamp."""
    v = _c(value, 1)
    return v if _TS.fullmatch(v) else None


def cwe(value: Value) -> Code | None:
    """CE/CWE: code ^ text ^ system (^ alternate code ^ alternate text ^ alternate system)."""
    code, display, system = _c(value, 1), _c(value, 2), _c(value, 3)
    if not code and isinstance(value, list) and len(value) > 3:  # only an alternate code
        code, display, system = _c(value, 4), _c(value, 5) or display, _c(value, 6)
    if not (code or display):
        return None
    oid = SYSTEMS.get(system.upper(), system if _OID.fullmatch(system) else "")
    if system.upper().startswith("HL7") and system[3:].isdigit():
        oid = f"2.16.840.1.113883.12.{int(system[3:])}"
    return Code(code=code, system=oid, display=display, system_name=system, original_text=display)


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
    return Identifier(root=root, extension=ext, authority=authority or _c(value, 5))


def ei(value: Value) -> Identifier | None:
    """EI: entity id ^ namespace id ^ universal id ^ universal id type (RF1-6, ORC-2)."""
    ext = _c(value, 1)
    if not ext:
        return None
    uid, kind = _c(value, 3), _c(value, 4)
    root = uid if kind.upper() in ("ISO", "") and _OID.fullmatch(uid or "") else ""
    return Identifier(root=root, extension=ext, authority=_c(value, 2) or uid)


def xpn(value: Value) -> Name | None:
    """XPN: family ^ given ^ middle ^ suffix ^ prefix ^ degree."""
    family, given, middle = _c(value, 1), _c(value, 2), _c(value, 3)
    if not (family or given):
        return None
    return Name(family=family, given=[g for g in (given, middle) if g], prefix=_c(value, 5), suffix=_c(value, 4))


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
        return Identifier(root=OID["NPI"], extension=ext, authority="NPI")
    return Identifier(root="", extension=ext, authority=kind)


def npi(value: Value) -> Identifier | None:
    """A bare NPI (e.g. PRD-7.1 when PRD-7.2 says NPI)."""
    ext = _c(value, 1)
    return Identifier(root=OID["NPI"], extension=ext, authority="NPI") if ext else None


def xad(value: Value) -> Address | None:
    """XAD: street ^ other ^ city ^ state ^ zip ^ country ^ type."""
    lines = [x for x in (_c(value, 1), _c(value, 2)) if x]
    addr = Address(lines=lines, city=_c(value, 3), state=_c(value, 4), postal_code=_c(value, 5),
                   country=_c(value, 6), use={"B": "WP", "O": "WP", "W": "WP"}.get(_c(value, 7).upper(), "H"))
    return addr if addr else None


_USE = {"PRN": "HP", "ORN": "HP", "WPN": "WP", "VHN": "HV", "ASN": "AS", "EMR": "EC", "NET": "",
        "PRS": "MC", "BPN": "PG"}


def xtn(value: Value) -> Telecom | None:
    """XTN: a phone number or an email address as a URL (tel:/mailto:/fax:)."""
    use, equipment = _c(value, 2).upper(), _c(value, 3).upper()
    email = _c(value, 4)
    if email or equipment in ("INTERNET", "X.400") or "@" in _c(value, 1):
        addr = email or _c(value, 1)
        return Telecom(value=f"mailto:{addr}", use=_USE.get(use, "")) if addr else None
    country, area, local, ext = _c(value, 5), _c(value, 6), _c(value, 7), _c(value, 8)
    if local:
        digits = f"{area}{local}"
        number = f"+{country}-{digits}" if country else digits
    else:
        number = _c(value, 12) or _c(value, 1)
    number = _NOT_PHONE.sub("", number.replace("(", "").replace(")", "-")).strip(" -")
    if not _DIGIT.search(number):
        return None
    if ext:
        number += f";ext={ext}"
    scheme = "fax" if equipment == "FX" else "tel"
    return Telecom(value=f"{scheme}:{number.replace(' ', '-')}",
                   use="MC" if equipment == "CP" else _USE.get(use, ""))


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
