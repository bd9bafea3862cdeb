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


@pytest.fixture
def store(tmp_path):
    """A fresh store (the real SQLite file) for unit tests."""
    s = Store.open(tmp_path / "s.db")
    yield s
    s.close()
