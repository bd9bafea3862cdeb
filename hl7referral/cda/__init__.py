"""C-CDA documents for referrals.

* :mod:`.model` — the referral as plain data (the contract between mapping and builder);
* :mod:`.mapping` — v2 message → model;
* :mod:`.referral_note` — model → C-CDA R2.1 Referral Note (:func:`build_referral_note`, :func:`to_bytes`);
* :mod:`.narrative` — the section text (narrative block) the builder writes;
* :mod:`.validate` — XSD + C-CDA Schematron + template check (:class:`Validator`).

The builder and validator entry points are re-exported lazily: importing this
package (as ``from hl7referral.cda.model import …`` does) loads neither lxml
nor the document templates.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "BuildOptions": ".referral_note",
    "build_referral_note": ".referral_note",
    "to_bytes": ".referral_note",
    "Finding": ".validate",
    "Report": ".validate",
    "Validator": ".validate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
