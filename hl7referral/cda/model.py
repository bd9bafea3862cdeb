"""The referral as data: what a mapping fills and the C-CDA builder renders.

The mapping engine (:mod:`hl7referral.cda.mapping`) turns v2 fields into these
values; the builder (:mod:`hl7referral.cda.referral_note`) turns them into a
C-CDA R2.1 Referral Note. Neither knows the other's format, so a site can map
another EHR's field placement without touching the document code, and the
document can move to C-CDA 3.0/4.0 without touching any mapping.

Invariants
----------
* Plain values only (str, lists, nested dataclasses): no v2 escapes (the
  mapping unescapes), no XML.
* Empty means unknown: the builder renders a missing required value with the
  proper nullFlavor, never an invented one.
* Dates are HL7 TS strings as received (``YYYY[MM[DD[HHMM[SS]]]][+-ZZZZ]``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Code system OIDs the mappings and builder use by name.
OID = {
    "LOINC": "2.16.840.1.113883.6.1",
    "SNOMED": "2.16.840.1.113883.6.96",
    "ICD10CM": "2.16.840.1.113883.6.90",
    "ICD9CM": "2.16.840.1.113883.6.103",
    "RXNORM": "2.16.840.1.113883.6.88",
    "NDC": "2.16.840.1.113883.6.69",
    "CVX": "2.16.840.1.113883.12.292",
    "UCUM": "2.16.840.1.113883.6.8",
    "NPI": "2.16.840.1.113883.4.6",
    "SSN": "2.16.840.1.113883.4.1",
    "ADMIN_GENDER": "2.16.840.1.113883.5.1",
    "RACE": "2.16.840.1.113883.6.238",
    "CONFIDENTIALITY": "2.16.840.1.113883.5.25",
    "ACT_PRIORITY": "2.16.840.1.113883.5.7",
    "NUCC": "2.16.840.1.113883.6.101",
    "HL70063": "2.16.840.1.113883.12.63",
    "PAYER_SOPT": "2.16.840.1.113883.3.221.5",
}


@dataclass
class Code:
    code: str = ""
    system: str = ""  # an OID
    display: str = ""
    system_name: str = ""
    original_text: str = ""

    def __bool__(self) -> bool:
        return bool(self.code or self.original_text)


@dataclass
class Identifier:
    root: str = ""  # an OID or UUID; "" when the sender gave only a namespace
    extension: str = ""
    authority: str = ""  # assigning authority name, for display

    def __bool__(self) -> bool:
        return bool(self.root or self.extension)


@dataclass
class Name:
    family: str = ""
    given: list[str] = field(default_factory=list)
    prefix: str = ""
    suffix: str = ""

    def __bool__(self) -> bool:
        return bool(self.family or self.given)

    def text(self) -> str:
        return " ".join(p for p in [self.prefix, *self.given, self.family, self.suffix] if p)


@dataclass
class Address:
    lines: list[str] = field(default_factory=list)
    city: str = ""
    state: str = ""
    postal_code: str = ""
    country: str = ""
    use: str = "H"  # H home, WP work

    def __bool__(self) -> bool:
        return bool(self.lines or self.city or self.postal_code)


@dataclass
class Telecom:
    value: str = ""  # a URL: tel:+1-555-555-0100, mailto:a@b.org
    use: str = ""  # HP, WP, MC, ...

    def __bool__(self) -> bool:
        return bool(self.value)


@dataclass
class Party:
    """A clinician or organisation: referring provider, recipient, owner, custodian."""

    ids: list[Identifier] = field(default_factory=list)
    name: Name = field(default_factory=Name)
    organization: str = ""
    addr: list[Address] = field(default_factory=list)
    telecom: list[Telecom] = field(default_factory=list)
    specialty: Code = field(default_factory=Code)
    relationship: Code = field(default_factory=Code)  # for an owner or caregiver
    direct_address: str = ""


@dataclass
class Patient:
    ids: list[Identifier] = field(default_factory=list)
    names: list[Name] = field(default_factory=list)
    gender: Code = field(default_factory=Code)  # AdministrativeGender (M, F, UN)
    birth_time: str = ""
    addr: list[Address] = field(default_factory=list)
    telecom: list[Telecom] = field(default_factory=list)
    race: Code = field(default_factory=Code)
    ethnicity: Code = field(default_factory=Code)
    language: str = ""  # BCP 47, e.g. en
    marital_status: Code = field(default_factory=Code)
    # Veterinary referrals: the patient is an animal, the owner is the contact.
    species: Code = field(default_factory=Code)
    breed: Code = field(default_factory=Code)
    owner: Party | None = None


@dataclass
class Problem:
    code: Code = field(default_factory=Code)
    onset: str = ""
    status: str = "active"  # active, resolved


@dataclass
class Allergy:
    allergen: Code = field(default_factory=Code)
    reaction: Code = field(default_factory=Code)
    severity: Code = field(default_factory=Code)
    onset: str = ""


@dataclass
class Medication:
    drug: Code = field(default_factory=Code)
    instructions: str = ""
    start: str = ""


@dataclass
class Result:
    code: Code = field(default_factory=Code)
    value: str = ""
    value_type: str = "ST"  # PQ (numeric with unit), ST (text), CD (coded)
    unit: str = ""
    coded_value: Code = field(default_factory=Code)
    effective_time: str = ""
    interpretation: str = ""  # H, L, N, A, ...
    reference_range: str = ""


@dataclass
class Authorization:
    number: str = ""
    payer: str = ""
    effective: str = ""
    expiration: str = ""
    authorized_visits: str = ""


@dataclass
class Payer:
    name: str = ""
    ids: list[Identifier] = field(default_factory=list)  # payer (IN1-3)
    plan: str = ""
    member_id: str = ""
    group_number: str = ""
    authorization: Authorization | None = None


@dataclass
class Referral:
    """Everything the Referral Note says, from one referral message."""

    referral_id: Identifier = field(default_factory=Identifier)
    document_id: Identifier = field(default_factory=Identifier)  # a UUID root, set by the caller
    created: str = ""  # the document's effectiveTime
    reason: Code = field(default_factory=Code)  # coded reason for referral
    reason_text: str = ""
    priority: Code = field(default_factory=Code)
    referral_type: Code = field(default_factory=Code)  # default SNOMED 44383000 in the builder
    requested_service: Code = field(default_factory=Code)  # OBR-4 / RF1-3
    patient: Patient = field(default_factory=Patient)
    referring: Party = field(default_factory=Party)
    recipient: Party = field(default_factory=Party)
    custodian: Party = field(default_factory=Party)
    problems: list[Problem] = field(default_factory=list)
    allergies: list[Allergy] = field(default_factory=list)
    medications: list[Medication] = field(default_factory=list)
    results: list[Result] = field(default_factory=list)
    plan: list[str] = field(default_factory=list)  # plan-of-treatment text items
    payers: list[Payer] = field(default_factory=list)
    veterinary: bool = False
