"""hl7referral: an HL7 v2 / Direct interface engine that closes the referral loop.

Layers (see DESIGN.md in the shared design notes): ``v2`` (wire, sans-I/O),
``store`` (SQLite), ``engine`` (Twisted services), ``config`` (TOML), ``cli``.
"""

__version__ = "0.1.0"
