"""``channels/directory.toml``: the specialists a referral can go to.

Each entry names a practice or clinician with what routing needs: NPI,
specialty, the requested-service codes it takes, its Direct address and fax
number. Channels pick a destination from it by name, by specialty or by the
referred-to provider's NPI (:mod:`hl7referral.destination`).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from .schema import ConfigError, toml_error_line, validate

DIRECTORY_SCHEMA = {
    "specialists": [{
        "name": str, "npi": str, "specialty": str, "codes": [str], "direct": str, "fax": str,
        "organization": str, "veterinary": bool,
        "phone": str, "email": str, "scheduling_link": str, "how_to_book": str,
    }],
}


@dataclass(frozen=True)
class Specialist:
    name: str
    npi: str = ""
    specialty: str = ""
    codes: tuple[str, ...] = ()
    direct: str = ""
    fax: str = ""
    organization: str = ""
    veterinary: bool = False
    # For patient and owner messages (issue 6): how to reach the practice and book.
    phone: str = ""
    email: str = ""              # where consult-note requests go (specialist_notifier = "email")
    scheduling_link: str = ""
    how_to_book: str = ""


@dataclass(frozen=True)
class Directory:
    file: str
    specialists: tuple[Specialist, ...] = ()

    def by_name(self, name: str) -> Specialist | None:
        return next((s for s in self.specialists if s.name == name), None)

    def by_npi(self, npi: str) -> Specialist | None:
        return next((s for s in self.specialists if npi and s.npi == npi), None)

    def by_specialty(self, specialty: str) -> Specialist | None:
        key = specialty.strip().lower()
        return next((s for s in self.specialists if key and s.specialty.lower() == key), None)

    def by_code(self, code: str) -> Specialist | None:
        return next((s for s in self.specialists if code and code in s.codes), None)


def load_directory(path: Path) -> Directory:
    if not path.exists():
        return Directory(str(path))
    text = path.read_text("utf-8")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), toml_error_line(exc), "", f"not valid TOML: {exc}") from None
    validate(data, DIRECTORY_SCHEMA, file=str(path), text=text)
    out, names = [], set()
    for i, entry in enumerate(data.get("specialists", [])):
        if "name" not in entry:
            raise ConfigError(str(path), 0, f"specialists.{i}.name", "required")
        if entry["name"] in names:
            raise ConfigError(str(path), 0, f"specialists.{i}.name", f"duplicate name {entry['name']!r}")
        names.add(entry["name"])
        out.append(Specialist(**{**entry, "codes": tuple(entry.get("codes", ()))}))
    return Directory(str(path), tuple(out))
