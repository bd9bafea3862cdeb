import pytest

from engine_process import CORPUS, SHARED, EngineProcess
from hl7referral.store import Store


@pytest.fixture
def engine(tmp_path):
    """A running engine on the embedded defaults, own store, ephemeral port."""
    e = EngineProcess.start(tmp_path)
    yield e
    e.stop()


@pytest.fixture(scope="session")
def corpus():
    if not CORPUS.is_dir():
        pytest.skip(f"shared corpus not found at {CORPUS}")
    return CORPUS


@pytest.fixture(scope="session")
def standards():
    return SHARED / "standards"


@pytest.fixture(scope="session")
def ccda_validator(standards, tmp_path_factory):
    """One CDA schema + C-CDA R2.1 Schematron validator for the session (the XSLT cache in its tmp dir)."""
    from hl7referral.cda.validate import Validator
    if not (standards / "ccda-r2.1" / "ccda-r2.1.sch").is_file():
        pytest.skip(f"C-CDA standards not found under {standards}")
    return Validator(standards, cache_dir=tmp_path_factory.getbasetemp() / "xslt-cache")


@pytest.fixture
def store(tmp_path):
    """A fresh store (the real SQLite file) for unit tests."""
    s = Store.open(tmp_path / "s.db")
    yield s
    s.close()


@pytest.fixture(scope="session")
def make_certs():
    """certs-example/make_certs.py as a module (its building blocks: make_ca, make_leaf, make_crl...)."""
    import importlib.util
    import sys
    from pathlib import Path
    name = "make_certs_for_tests"
    if name not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "certs-example" / "make_certs.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="session")
def direct_pki(tmp_path_factory, make_certs):
    """The example Direct PKI (certs-example/make_certs.py, ``direct/``), made once per test run.

    anchor.pem (root) → intermediate.pem → sender/receiver (address-bound), sender-org/receiver-org
    (domain-bound); expired, revoked (in intermediate.crl.pem), small (1024-bit), unbound (other
    address), rogue (under rogue-anchor.pem); bundle.p7b holds the anchor. Every leaf has a .key.
    """
    out = tmp_path_factory.mktemp("pki")
    make_certs.build(out)
    return out / "direct"
