"""Every public sample gets a positive ACK or a correct NAK, over real TCP.

The expected answer for each file is written out here, with the reason, so a
change of behaviour shows up as a named failure.
"""

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from engine_process import CORPUS, EngineProcess
from hl7referral.send import MLLPClient, read_messages
from hl7referral.v2.framer import Frame, MLLPFramer
from hl7referral.v2.header import read_header

# file: (MSA-1 or None for "no accept ACK requested", ERR-3 code or None, stored status)
EXPECTED = {
    "ACK_hapi_messages_txt_v21.hl7": ("AR", "200", "rejected"),          # an ACK is not a referral
    "MDM_T02_msfhirconv_01.hl7": ("AA", None, "accepted"),               # a consult note: the loop tracker's
    "OMG_O19_360x_referral_request_nhapi.hl7": (None, None, "accepted"),  # 360X: MSH-15 NE, stored, no ACK
    "OMG_O19_msfhirconv_01.hl7": ("AE", "101", "rejected"),              # ORC-2 and OBR-2 both empty
    "ORM_O01_hapi_NewPipeParserTest_v231.hl7": ("AR", "202", "rejected"),  # MSH-11 = '1'
    "ORM_O01_hapi_messages_txt_NW_v22.hl7": ("CA", None, "accepted"),    # MSH-15 AL: enhanced mode
    "ORM_O01_msfhirconv_01.hl7": ("AA", None, "accepted"),
    "OSU_O51_360x_cancel_nhapi.hl7": (None, None, "accepted"),           # 360X cancel, NE: stored, no ACK
    "REF_I11_v2plus_ch11_deferred_example.hl7": ("CR", "201", "rejected"),  # I11 is not I12; MSH-15 AL
    "REF_I11_v2plus_ch11_immediate_example.hl7": (None, None, "rejected"),  # MSH-15 NE
    "REF_I12_hapi_NewPipeParserTest.hl7": ("AR", "202", "rejected"),     # MSH-10 and MSH-11 empty
    "REF_I12_msfhirconv_01.hl7": ("AA", None, "accepted"),
    "REF_I12_msfhirconv_02.hl7": ("AA", None, "accepted"),
    "RRI_I11_v2plus_ch11_deferred_response.hl7": ("CR", "201", "rejected"),  # RRI is routed, I11 is not; MSH-15 ER
    "RRI_I11_v2plus_ch11_immediate_response.hl7": ("CR", "201", "rejected"),
    "SIU_S12_msfhirconv_01.hl7": ("AA", None, "accepted"),   # SIU goes to the loop tracker
    "SIU_S13_msfhirconv_01.hl7": ("AA", None, "accepted"),
    "SIU_S14_hapi_NewPipeParserTest_v23.hl7": ("AA", None, "accepted"),
    "SIU_S14_msfhirconv_01.hl7": ("AA", None, "accepted"),
    "SIU_S15_msfhirconv_01.hl7": ("AA", None, "accepted"),
    "SIU_S26_360x_noshow_nhapi.hl7": (None, None, "accepted"),
    "SIU_S26_msfhirconv_01.hl7": ("AA", None, "accepted"),
}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    e = EngineProcess.start(tmp_path_factory.mktemp("corpus"))
    yield e
    e.stop()


def fields(ack: bytes, seg: str) -> list[str]:
    for line in ack.decode("latin-1").split("\r"):
        if line.startswith(seg):
            if seg == "MSH":  # MSH-1 is the separator itself: MSH-n at index n
                return ["MSH", line[3], *line[4:].split(line[3])]
            return line.split("|")
    return []


def test_the_table_covers_the_whole_corpus(corpus):
    assert sorted(p.name for p in corpus.glob("*.hl7")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_sample_gets_the_right_answer(engine, corpus, name):
    code, err, status = EXPECTED[name]
    (payload,) = read_messages(corpus / name)
    header = read_header(payload)
    with MLLPClient(engine.host, engine.port, timeout=5) as client:
        client.send(payload)
        ack = client.read_frame(timeout=5 if code else 0.5)
    if code is None:
        assert ack is None, "MSH-15 = NE: no accept ACK may be sent"
    else:
        assert ack is not None
        msa = fields(ack, "MSA")
        assert msa[1] == code and msa[2] == header.control_id
        msh = fields(ack, "MSH")
        h = header
        mirrored = (h.receiving_application, h.receiving_facility, h.sending_application, h.sending_facility)
        assert (msh[3], msh[4], msh[5], msh[6]) == mirrored
        # the sender's own delimiters and encoding characters
        assert msh[2] == h.delimiters.msh2 and msh[1] == h.delimiters.field
        if err:
            d = header.delimiters
            errseg = fields(ack, "ERR")
            if header.version in ("2.1", "2.2", "2.3", "2.3.1", "2.4"):  # ERR-1: seg^seq^field^code&text
                got = errseg[1].split(d.component)[3].split(d.subcomponent)[0]
            else:  # ERR-3: code^text^HL70357
                got = errseg[3].split(d.component)[0]
            assert got == err
    db = sqlite3.connect(engine.store)
    rows = db.execute("SELECT status, raw FROM messages WHERE control_id = ? AND message_type = ?",
                      (header.control_id, header.type_and_event)).fetchall()
    assert (status, payload) in rows  # kept, byte for byte, with the right status


def mllp_send(port: int, path: Path) -> list[bytes]:
    out = subprocess.run([str(Path(sys.executable).parent / "mllp_send"), "--loose", "-p", str(port),
                          "-f", str(path), "127.0.0.1"], capture_output=True, timeout=30)
    assert out.returncode == 0, out.stderr.decode()[-500:]
    return [e.payload for e in MLLPFramer().feed(out.stdout) if isinstance(e, Frame)]


# python-hl7's --loose reader needs MSH|^~\&| and no BOM, and waits for an ACK
# even when MSH-15 says NE, so it carries the samples that fit those rules.
def _independent_client_samples():
    if not CORPUS.is_dir():
        return []
    names = []
    for name, (code, _, _) in sorted(EXPECTED.items()):
        data = (CORPUS / name).read_bytes()
        if code is not None and data.startswith(b"MSH|^~\\&|"):
            names.append(name)
    return names


@pytest.fixture(scope="module")
def engine_for_mllp_send(tmp_path_factory):
    # Its own store: mllp_send strips the final CR, so its bytes differ from the
    # framed sends above and the same MSH-10 would (rightly) get AE/205 there.
    e = EngineProcess.start(tmp_path_factory.mktemp("mllp_send"))
    yield e
    e.stop()


@pytest.mark.parametrize("name", _independent_client_samples())
def test_python_hl7_mllp_send_gets_correct_acks(engine_for_mllp_send, name):
    code, err, _ = EXPECTED[name]
    acks = mllp_send(engine_for_mllp_send.port, CORPUS / name)
    assert len(acks) == 1
    msa = fields(acks[0], "MSA")
    control_id = read_header(read_messages(CORPUS / name)[0]).control_id
    assert msa[1] == code and msa[2] == control_id
