"""reliability-tests.md sections B (framing) and C (content, NAKs) over real TCP.

Each test names its item; the pass criterion is the assertion.
"""

import socket
import sqlite3
import threading
import time

import pytest

from engine_process import EngineProcess
from hl7referral.send import MLLPClient, interpret_ack
from hl7referral.store import Store
from hl7referral.v2.framer import Frame, MLLPFramer, encode_frame
from messages import ref_i12


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    e = EngineProcess.start(tmp_path_factory.mktemp("rel"))
    yield e
    e.stop()


class Conn:
    """A raw socket: send exact bytes, read whole frames."""

    def __init__(self, engine, timeout=5.0):
        self.sock = socket.create_connection((engine.host, engine.port), timeout=timeout)
        self.framer = MLLPFramer()
        self.frames = []

    def send(self, data: bytes):
        self.sock.sendall(data)

    def read(self, n=1, timeout=5.0):
        deadline = time.monotonic() + timeout
        while len(self.frames) < n and time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except (socket.timeout, TimeoutError):
                break
            if not data:
                break
            self.frames += [e.payload for e in self.framer.feed(data) if isinstance(e, Frame)]
        out, self.frames = self.frames[:n], self.frames[n:]
        return out

    def closed_by_peer(self, timeout=5.0) -> bool:
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
                if any(isinstance(e, Frame) for e in self.framer.feed(data)):
                    return False  # an ACK arrived: not what these tests expect
        except ConnectionResetError:
            return True
        except (socket.timeout, TimeoutError):
            return False

    def close(self):
        self.sock.close()


def msa(ack: bytes) -> tuple[str, str]:
    line = [s for s in ack.split(b"\r") if s.startswith(b"MSA")][0].decode()
    parts = line.split(line[3])
    return parts[1], parts[2]


def stored(engine, control_id):
    store = Store.open(engine.store, readonly=True)
    rows = [store.get_message(r["id"]) for r in reversed(store.list_messages(control_id=control_id))]
    store.close()
    return [(r["status"], r["raw"], r["text"]) for r in rows]


# -- B. framing -----------------------------------------------------------------

def test_13_fs_cr_lf_trailer_and_fs_without_cr(engine):
    c = Conn(engine)
    c.send(b"\x0b" + ref_i12("T13a") + b"\x1c\r\n" + b"\x0b" + ref_i12("T13b") + b"\x1c\x0b"
           + ref_i12("T13c") + b"\x1c\r")
    assert [msa(a) for a in c.read(3)] == [("AA", "T13a"), ("AA", "T13b"), ("AA", "T13c")]
    c.close()


def test_13_stream_ending_at_fs_is_answered_without_waiting(engine):
    c = Conn(engine)
    c.send(b"\x0b" + ref_i12("T13d") + b"\x1c")  # no CR, connection kept open
    assert [msa(a) for a in c.read(1, timeout=5)] == [("AA", "T13d")]
    c.close()


def test_14_junk_nuls_and_blank_lines_between_frames(engine):
    c = Conn(engine)
    c.send(b"junk" + encode_frame(ref_i12("T14a")) + b"\x00\x00\r\n\r\n" + encode_frame(ref_i12("T14b")))
    assert [msa(a) for a in c.read(2)] == [("AA", "T14a"), ("AA", "T14b")]
    assert [r[1] for r in stored(engine, "T14a")] == [ref_i12("T14a")]  # never merged with junk
    c.close()


@pytest.mark.parametrize("hello", [
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    bytes.fromhex("160301006f0100006b03036a3c"),  # the start of a TLS ClientHello
])
def test_14_http_and_tls_hello_on_plain_port_get_no_ack_and_close(engine, hello):
    c = Conn(engine)
    c.send(hello)
    assert c.closed_by_peer()
    c.close()
    # the listener is unharmed
    with MLLPClient(engine.host, engine.port, timeout=5) as client:
        assert client.exchange(ref_i12("T14after" + str(len(hello)))).code == "AA"


def test_15_vt_inside_open_frame_and_frame_without_vt(engine):
    c = Conn(engine)
    c.send(b"\x0bMSH|^~\\&|PARTIAL" + encode_frame(ref_i12("T15a")))
    c.send(ref_i12("T15x") + b"\x1c\r" + encode_frame(ref_i12("T15b")))  # no VT: junk
    assert [msa(a) for a in c.read(2)] == [("AA", "T15a"), ("AA", "T15b")]
    assert stored(engine, "T15x") == []
    c.close()


@pytest.mark.parametrize("name, sep, lead", [
    ("cr", "\r", ""), ("lf", "\n", ""), ("crlf", "\r\n", ""), ("crcr", "\r\r", ""), ("lead", "\r", "\n")])
def test_16_segment_separators_parse_and_raw_bytes_are_kept(engine, name, sep, lead):
    raw = lead.encode() + ref_i12(f"T16{name}", sep=sep)
    with MLLPClient(engine.host, engine.port, timeout=5) as client:
        assert client.exchange(raw).code == "AA"
    ((status, kept, _),) = stored(engine, f"T16{name}")
    assert status == "accepted" and kept == raw


def test_17_client_reads_an_ack_sent_in_one_byte_chunks():
    ack = b"MSH|^~\\&|R|RF|S|SF|20260101||ACK^I12^ACK|A1|P|2.5.1\rMSA|AA|T17\r"
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def dribble():
        conn, _ = server.accept()
        framer = MLLPFramer()
        while not any(isinstance(e, Frame) for e in framer.feed(conn.recv(65536))):
            pass
        for b in encode_frame(ack):
            conn.sendall(bytes([b]))
            time.sleep(0.02)
        conn.close()

    t = threading.Thread(target=dribble, daemon=True)
    t.start()
    with MLLPClient("127.0.0.1", server.getsockname()[1], timeout=10) as client:
        result = client.exchange(ref_i12("T17"))
    server.close()
    assert (result.code, result.ok) == ("AA", True)


def test_17_ack_for_another_message_is_not_taken_as_ours():
    result = interpret_ack(b"MSH|^~\\&|R|RF|S|SF|2026||ACK|A1|P|2.5.1\rMSA|AA|OTHER\r", "MINE")
    assert not result.ok and "OTHER" in result.text


# -- C. content errors and NAKs ---------------------------------------------------

NAK_MATRIX = [
    ("unsupported type", ref_i12("C19a", kind="ADT^A01^ADT_A01"), "AR", "200", "MSH^1^9"),
    ("unsupported event", ref_i12("C19b", kind="REF^I14^REF_I12"), "AR", "201", "MSH^1^9"),
    ("unsupported version", ref_i12("C19c", version="3.1"), "AR", "203", "MSH^1^12"),
    ("processing id T on a P port", ref_i12("C19d", processing="T"), "AR", "202", "MSH^1^11"),
    ("REF^I12 without RF1", ref_i12("C19e", rf1=None), "AE", "101", "RF1^1"),
    ("empty PID-3", ref_i12("C19f", pid="PID|1||"), "AE", "101", "PID^1^3"),
    ("bad data type", ref_i12("C19g", pid="PID|1||M1^^^C^MR||T^P||1970-01-01|F"), "AE", "102", "PID^1^7"),
    ("too long", ref_i12("C19" + "h" * 200), "AE", "104", "MSH^1^10"),
]


@pytest.mark.parametrize("case, raw, code, err3, err2", NAK_MATRIX, ids=[c[0] for c in NAK_MATRIX])
def test_19_nak_matrix(engine, case, raw, code, err3, err2):
    c = Conn(engine)
    c.send(encode_frame(raw))
    (ack,) = c.read(1)
    c.close()
    assert ack.endswith(b"\r")
    segs = {s[:3]: s.split("|") for s in ack.decode().split("\r") if s}
    sent = raw.decode().split("\r")[0].split("|")
    assert segs["MSA"][1] == code and segs["MSA"][2] == sent[9]           # MSA-1, MSA-2 = MSH-10
    assert segs["MSH"][4] == sent[2] and segs["MSH"][5] == sent[3]          # ACK MSH-5/6 = MSH-3/4
    assert segs["ERR"][3].split("^")[0] == err3 and segs["ERR"][3].split("^")[2] == "HL70357"
    assert segs["ERR"][4] == "E" and segs["ERR"][2].rstrip("^") == err2
    assert segs["ERR"][8]  # a readable text
    assert stored(engine, sent[9])[0][0] == "rejected"  # raw bytes kept


NASTY = [
    b"MSH|0|||||||00|||2.7", b"MSHH0\r", b"MSH|0|||||||||||0", b"MSH|^|||||||^A|||2.2\r^AA",
    b"\nMSH|^~\\&|A|B|C|D|2026||REF^I12|N1|P|2.5\r\rPID|1\r", b"MSH|^~&|EPIC||||2026||REF^I12|N2|P|2.5\r",
    b"MSH|^~\\&#|A|B|C|D|2026||REF^I12|N3|P|2.7\r", b"MSH|^~\\&|A|B|C|D|2026||REF^I12\r", b"MSH#^~\\&#A#B\r", b"",
]


def test_20_nak_builder_never_crashes_on_hostile_inputs(engine):
    for raw in NASTY:
        c = Conn(engine)
        c.send(encode_frame(raw))
        acks = c.read(1, timeout=3)
        if acks:
            code, _ = msa(acks[0])
            assert code in ("AR", "AE"), raw
        else:
            assert c.closed_by_peer(timeout=2), raw
        c.close()
    with MLLPClient(engine.host, engine.port, timeout=5) as client:
        assert client.exchange(ref_i12("C20ok")).code == "AA"
    assert "Unhandled error" not in engine.log and "Traceback" not in engine.log


def test_21_declared_delimiters_and_literal_ampersand(engine):
    raw = ("MSH#$%*!#EHR#CLINIC#HL7REF#HUB#20260101120000##REF$I12$REF_I12#C21#P#2.5.1\r"
           "RF1#P#R#MED#RP#O#REF21\rPID#1##M21$$$C$MR##Smith & Jones$Pat##19700101#F\r").encode()
    c = Conn(engine)
    c.send(encode_frame(raw))
    (ack,) = c.read(1)
    c.close()
    assert ack.startswith(b"MSH#$%*!#HL7REF#HUB#EHR#CLINIC#") and b"\rMSA#AA#C21" in ack
    ((status, kept, text),) = stored(engine, "C21")
    assert kept == raw and "Smith & Jones" in text


@pytest.mark.parametrize("msh18, codec, name", [
    ("", "ascii", "Plain"), ("8859/1", "latin-1", "Sørensen"), ("UNICODE UTF-8", "utf-8", "Søren 中文 é"),
    ("UNICODE", "utf-8", "Zoë"),
])
def test_22_charset_matrix_stored_as_unicode_plus_raw(engine, msh18, codec, name):
    cid = f"C22{codec}{len(msh18)}"
    raw = ref_i12(cid, msh_extra=f"||||||{msh18}" if msh18 else "",
                  pid=f"PID|1||M22^^^C^MR||{name}^Pat||19700101|F").decode().encode(codec)
    c = Conn(engine)
    c.send(encode_frame(raw))
    (ack,) = c.read(1)
    c.close()
    assert msa(ack) == ("AA", cid)
    if msh18:
        assert ack.split(b"\r")[0].endswith(f"|{msh18}".encode())  # ACK declares the sender's charset
    ((_, kept, text),) = stored(engine, cid)
    assert kept == raw and name in text


@pytest.mark.parametrize("case, raw", [
    ("latin1 declared, utf8 bytes", ref_i12("C22m", msh_extra="||||||8859/1",
                                            pid="PID|1||M^^^C^MR||Sørensen||19700101|F")),
    ("invalid utf8", ref_i12("C22i", msh_extra="||||||UNICODE UTF-8").replace(b"Testpatient", b"Test\xc3\x28")),
])
def test_22_charset_mismatch_is_ae_102_and_raw_kept(engine, case, raw):
    c = Conn(engine)
    c.send(encode_frame(raw))
    (ack,) = c.read(1)
    c.close()
    assert msa(ack)[0] == "AE" and b"|102^" in ack
    cid = raw.split(b"|")[9].decode()
    ((status, kept, _),) = stored(engine, cid)
    assert status == "rejected" and kept == raw


def test_23_no_xml_on_mllp(engine, tmp_path):
    canary = socket.socket()
    canary.bind(("127.0.0.1", 0))
    canary.listen(5)
    canary.settimeout(1.0)
    port = canary.getsockname()[1]
    secret = tmp_path / "secret.txt"
    secret.write_text("CANARY-SECRET")
    xml = (f"<?xml version=\"1.0\"?><!DOCTYPE hl7 [<!ENTITY f SYSTEM \"file://{secret}\">"
           f"<!ENTITY n SYSTEM \"http://127.0.0.1:{port}/canary\">]>"
           f"<REF_I12><MSH><MSH.10>X23</MSH.10></MSH><PID>&f;&n;</PID></REF_I12>").encode()
    c = Conn(engine)
    c.send(encode_frame(xml))
    assert c.closed_by_peer()  # no ACK
    c.close()
    with pytest.raises((socket.timeout, TimeoutError)):
        canary.accept()  # nobody fetched the external entity
    canary.close()
    db = sqlite3.connect(engine.store)
    kept = [r for r in db.execute("SELECT raw, text FROM messages WHERE status = 'not_hl7'") if b"X23" in r[0]]
    assert kept and kept[-1][0] == xml and kept[-1][1] is None  # kept as bytes, never parsed
    assert b"CANARY-SECRET" not in b"".join(r[0] for r in db.execute("SELECT raw FROM messages"))
