"""Unit tests of hl7referral.engine.endpoints, without sockets (MemoryReactor)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from OpenSSL import SSL
from twisted.internet import endpoints
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactor

from hl7referral.engine.endpoints import EndpointError, is_tls, server_endpoint, split_description

MAKE_CERTS = Path(__file__).resolve().parents[1] / "certs-example" / "make_certs.py"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    spec = importlib.util.spec_from_file_location("make_certs", MAKE_CERTS)
    mc = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, mc)
    spec.loader.exec_module(mc)
    out = tmp_path_factory.mktemp("pki")
    mc.build(out)
    return out


def ssl_desc(pki: Path, **opts: str) -> str:
    base = dict(privateKey=pki / "server.key", certKey=pki / "server.pem", caCerts=pki / "ca.pem")
    base.update(opts)
    return "ssl:2575:" + ":".join(f"{k}={v}" for k, v in base.items() if v is not None)


def listen(endpoint, reactor: MemoryReactor):
    endpoint.listen(Factory())
    return reactor


# -- split_description ---------------------------------------------------------------


@pytest.mark.parametrize("description, parts", [
    ("tcp:2575:interface=127.0.0.1", ["tcp", "2575", "interface=127.0.0.1"]),
    (r"ssl:2575:interface=\:\:1", ["ssl", "2575", "interface=::1"]),
    (r"ssl:0:privateKey=C\:/keys/server.key:certKey=C\:/keys/server.pem",
     ["ssl", "0", "privateKey=C:/keys/server.key", "certKey=C:/keys/server.pem"]),
    (r"ssl:0:privateKey=a\\b.key", ["ssl", "0", r"privateKey=a\b.key"]),  # an escaped backslash
    (r"ssl:0:privateKey=a\\:b", ["ssl", "0", "privateKey=a\\", "b"]),  # \\ then a real separator
    ("ssl:", ["ssl", ""]),
    ("tcp", ["tcp"]),
])
def test_split_description(description, parts):
    assert split_description(description) == parts


def test_split_description_agrees_with_twisted_on_escapes():
    parse = getattr(endpoints, "_parse", None)  # Twisted's own (private) parser
    if parse is None:
        pytest.skip("twisted.internet.endpoints._parse is gone")
    description = r"ssl:2575:interface=\:\:1:privateKey=C\:/k.pem:certKey=a\\b.pem"
    args, kwargs = parse(description)
    ours = split_description(description)
    assert ours[:2] == args == ["ssl", "2575"]
    assert dict(p.split("=", 1) for p in ours[2:]) == kwargs == {
        "interface": "::1", "privateKey": "C:/k.pem", "certKey": "a\\b.pem"}


# -- ssl: option errors ----------------------------------------------------------------


def test_unknown_ssl_option_is_named(pki):
    with pytest.raises(EndpointError, match=r"unknown option 'requireClientCertificate'"):
        server_endpoint(MemoryReactor(), ssl_desc(pki, requireClientCertificate="yes"))


def test_unknown_ssl_option_is_named_before_any_file_is_read():
    with pytest.raises(EndpointError, match=r"unknown option 'cipherz'"):
        server_endpoint(MemoryReactor(), "ssl:2575:privateKey=/nonexistent/k.pem:cipherz=HIGH")


def test_missing_key_file_names_the_path(pki, tmp_path):
    missing = tmp_path / "no-such.key"
    with pytest.raises(EndpointError) as exc:
        server_endpoint(MemoryReactor(), ssl_desc(pki, privateKey=missing))
    assert str(missing) in str(exc.value)


def test_missing_certificate_file_names_the_certificate_not_the_key(pki, tmp_path):
    missing = tmp_path / "no-such.pem"
    with pytest.raises(EndpointError) as exc:
        server_endpoint(MemoryReactor(), ssl_desc(pki, certKey=missing))
    message = str(exc.value)
    assert message.startswith(str(missing)), message
    assert "private key" not in message


def test_key_file_that_is_not_a_key(pki):
    with pytest.raises(EndpointError, match="not a usable PEM private key") as exc:
        server_endpoint(MemoryReactor(), ssl_desc(pki, privateKey=pki / "server.pem"))
    assert str(pki / "server.pem") in str(exc.value)


def test_certificate_file_that_is_not_a_certificate(pki):
    with pytest.raises(EndpointError, match="not a PEM certificate file") as exc:
        server_endpoint(MemoryReactor(), ssl_desc(pki, certKey=pki / "server.key"))
    assert str(exc.value).startswith(str(pki / "server.key"))


def test_missing_ca_and_crl_files_name_the_path(pki, tmp_path):
    for option in ("caCerts", "crl", "extraCertChain"):
        missing = tmp_path / f"no-{option}.pem"
        with pytest.raises(EndpointError) as exc:
            server_endpoint(MemoryReactor(), ssl_desc(pki, **{option: missing}))
        assert str(missing) in str(exc.value), option


def test_ca_certs_dir_must_be_a_directory(pki):
    with pytest.raises(EndpointError, match="not a directory"):
        server_endpoint(MemoryReactor(), ssl_desc(pki, caCerts=None, caCertsDir=pki / "ca.pem"))


def test_empty_ca_certs_dir_with_required_client_cert_is_refused(pki, tmp_path):
    with pytest.raises(EndpointError, match="no trust roots"):
        server_endpoint(MemoryReactor(), ssl_desc(pki, caCerts=None, caCertsDir=tmp_path))


@pytest.mark.parametrize("version", ["1.1", "1.0", "1", "TLSv1.2", ""])
def test_tls_min_below_1_2_or_unknown_is_refused(pki, version):
    with pytest.raises(EndpointError, match="tlsMin must be 1.2 or 1.3"):
        server_endpoint(MemoryReactor(), ssl_desc(pki, tlsMin=version))


@pytest.mark.parametrize("port", ["", "https", "-1"])
def test_ssl_port_must_be_a_number(pki, port):
    with pytest.raises(EndpointError, match="port must be a number"):
        server_endpoint(MemoryReactor(), ssl_desc(pki).replace("ssl:2575:", f"ssl:{port}:"))


def test_ssl_needs_a_certificate_and_key():
    with pytest.raises(EndpointError, match="certKey"):
        server_endpoint(MemoryReactor(), "ssl:2575:interface=127.0.0.1")


# -- ssl: what gets built ------------------------------------------------------------


def _context(reactor: MemoryReactor) -> SSL.Context:
    port, factory, context_factory, backlog, interface = reactor.sslServers[0]
    return context_factory.getContext()


def test_ssl_listener_requires_a_client_certificate_and_tls_1_2(pki):
    reactor = MemoryReactor()
    endpoint = server_endpoint(reactor, ssl_desc(pki, interface="127.0.0.1", crl=pki / "crl.pem", backlog="7"))
    assert isinstance(endpoint, endpoints.SSL4ServerEndpoint)
    listen(endpoint, reactor)
    port, _, _, backlog, interface = reactor.sslServers[0]
    assert (port, backlog, interface) == (2575, 7, "127.0.0.1")
    ctx = _context(reactor)
    assert ctx.get_verify_mode() & SSL.VERIFY_PEER
    assert ctx.get_verify_mode() & SSL.VERIFY_FAIL_IF_NO_PEER_CERT
    options = ctx.set_options(0)
    assert options & SSL.OP_NO_TLSv1 and options & SSL.OP_NO_TLSv1_1
    assert not options & SSL.OP_NO_TLSv1_2


def test_tls_min_1_3_excludes_tls_1_2(pki):
    reactor = MemoryReactor()
    listen(server_endpoint(reactor, ssl_desc(pki, tlsMin="1.3")), reactor)
    assert _context(reactor).set_options(0) & SSL.OP_NO_TLSv1_2


def test_require_client_cert_no_verifies_but_does_not_demand(pki):
    reactor = MemoryReactor()
    listen(server_endpoint(reactor, ssl_desc(pki, requireClientCert="no")), reactor)
    mode = _context(reactor).get_verify_mode()
    assert mode & SSL.VERIFY_PEER and not mode & SSL.VERIFY_FAIL_IF_NO_PEER_CERT


def test_relative_files_resolve_against_base(pki):
    reactor = MemoryReactor()
    endpoint = server_endpoint(reactor, "ssl:2575:privateKey=server.key:certKey=server.pem:caCerts=ca.pem", base=pki)
    listen(endpoint, reactor)
    assert len(reactor.sslServers) == 1
    with pytest.raises(EndpointError) as exc:
        server_endpoint(MemoryReactor(), "ssl:2575:privateKey=server.key:certKey=server.pem",
                        base=pki / "elsewhere")
    assert str(exc.value).startswith(str(pki / "elsewhere" / "server.pem"))


def test_ssl_endpoint_with_escaped_interface(pki):
    reactor = MemoryReactor()
    listen(server_endpoint(reactor, ssl_desc(pki) + r":interface=\:\:1"), reactor)
    assert reactor.sslServers[0][4] == "::1"


# -- everything else goes to Twisted ---------------------------------------------------


def test_tcp_passes_through_to_twisted():
    reactor = MemoryReactor()
    endpoint = server_endpoint(reactor, "tcp:2575:interface=127.0.0.1:backlog=9")
    assert isinstance(endpoint, endpoints.TCP4ServerEndpoint)
    listen(endpoint, reactor)
    port, _, backlog, interface = reactor.tcpServers[0]
    assert (port, backlog, interface) == (2575, 9, "127.0.0.1")
    assert not is_tls("tcp:2575") and is_tls("ssl:2575:privateKey=k")


def test_tcp6_and_unix_pass_through(tmp_path):
    assert isinstance(server_endpoint(MemoryReactor(), r"tcp6:2575:interface=\:\:1"), endpoints.TCP6ServerEndpoint)
    reactor = MemoryReactor()
    listen(server_endpoint(reactor, f"unix:{tmp_path / 'mllp.sock'}"), reactor)
    assert reactor.unixServers[0][0] == str(tmp_path / "mllp.sock")


@pytest.mark.parametrize("description", ["bogus:2575", "tcp:notaport"])
def test_bad_twisted_descriptions_become_endpoint_errors(description):
    with pytest.raises(EndpointError, match="bad endpoint"):
        server_endpoint(MemoryReactor(), description)
