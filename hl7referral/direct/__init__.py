"""Direct (the Direct Project's secure health transport): S/MIME, trust, XDM, MDN.

Everything in this package is sans-I/O except certificate discovery over DNS:
objects take bytes and certificates and return bytes and decisions. The
Twisted SMTP client and listener that move those bytes live in
``hl7referral.engine``.
"""
