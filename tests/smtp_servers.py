"""A real SMTP server for tests (aiosmtpd) on 127.0.0.1, plain or with STARTTLS and AUTH required."""

from __future__ import annotations

import ssl
from contextlib import contextmanager
from pathlib import Path

from aiosmtpd.controller import Controller


class EphemeralController(Controller):
    """aiosmtpd's Controller on port 0: learn the port before it connects to itself."""

    def _trigger_server(self):
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()


@contextmanager
def running_smtpd(handler, *, pki: Path | None = None):
    """Yield (handler, port); with *pki* (make_certs output) STARTTLS and AUTH are required."""
    kw = {}
    if pki is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(pki / "server.pem", pki / "server.key")
        kw = dict(tls_context=context, require_starttls=True, auth_required=True, authenticator=handler.authenticate)
    controller = EphemeralController(handler, hostname="127.0.0.1", port=0, **kw)
    controller.start()
    try:
        yield handler, controller.port
    finally:
        controller.stop()
