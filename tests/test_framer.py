"""MLLP framer: reliability-tests.md section B (12-15) without sockets."""

from hypothesis import given, settings, strategies as st

from hl7referral.v2.framer import (Frame, FrameAbandoned, FrameTooLarge, Junk, MissingCR,
                                   MLLPFramer, encode_frame)

MSG = b"MSH|^~\\&|A|B|C|D|20260101||REF^I12|1|P|2.5.1\rPID|1||X\r"


def frames(events):
    return [e.payload for e in events if isinstance(e, Frame)]


def feed_all(chunks, **kw):
    f = MLLPFramer(**kw)
    out = []
    for c in chunks:
        out += f.feed(c)
    return out


def test_one_frame():
    assert frames(MLLPFramer().feed(encode_frame(MSG))) == [MSG]


def test_several_frames_in_one_read():
    data = b"".join(encode_frame(MSG + bytes([65 + i])) for i in range(5))
    assert frames(MLLPFramer().feed(data)) == [MSG + bytes([65 + i]) for i in range(5)]


def test_byte_at_a_time_including_between_fs_and_cr():
    data = encode_frame(MSG) * 3
    assert frames(feed_all([data[i:i + 1] for i in range(len(data))])) == [MSG] * 3


def test_fs_cr_lf_trailer_loses_nothing():
    data = b"\x0b" + MSG + b"\x1c\r\n" + b"\x0b" + MSG + b"\x1c\r\n"
    events = MLLPFramer().feed(data)
    assert frames(events) == [MSG, MSG]
    assert not [e for e in events if isinstance(e, Junk)]


def test_fs_then_vt_without_cr_is_accepted_and_reported():
    events = MLLPFramer().feed(b"\x0b" + MSG + b"\x1c\x0b" + MSG + b"\x1c\r")
    assert frames(events) == [MSG, MSG]
    assert sum(isinstance(e, MissingCR) for e in events) == 1


def test_stream_ending_at_fs_delivers_the_frame_at_once():
    # The ACK must not wait for the CR (or a timeout): the frame ends at FS.
    assert frames(MLLPFramer().feed(b"\x0b" + MSG + b"\x1c")) == [MSG]


def test_junk_before_vt_and_nuls_between_frames_are_counted_never_merged():
    data = b"garbage" + encode_frame(MSG) + b"\x00\x00\x00" + b"\r\n" + encode_frame(MSG)
    events = MLLPFramer().feed(data)
    assert frames(events) == [MSG, MSG]
    junk = [e for e in events if isinstance(e, Junk)]
    # NULs and the blank line are junk: an LF is tolerated only right after <FS><CR>.
    assert sum(j.length for j in junk) == len(b"garbage") + 3 + 2


def test_vt_inside_open_frame_abandons_partial_and_keeps_the_new_frame():
    events = MLLPFramer().feed(b"\x0bMSH|partial" + encode_frame(MSG))
    assert frames(events) == [MSG]
    assert [e.length for e in events if isinstance(e, FrameAbandoned)] == [len(b"MSH|partial")]


def test_frame_without_vt_is_junk_not_a_message():
    events = MLLPFramer().feed(MSG + b"\x1c\r" + encode_frame(MSG))
    assert frames(events) == [MSG]
    assert any(isinstance(e, Junk) for e in events)


def test_oversized_frame_stops_the_framer_and_keeps_the_prefix():
    f = MLLPFramer(max_frame=1000)
    events = f.feed(b"\x0b" + MSG + b"X" * 2000)
    big = [e for e in events if isinstance(e, FrameTooLarge)]
    assert big and big[0].prefix.startswith(MSG) and big[0].limit == 1000
    assert f.closed and f.buffered == 0
    assert f.feed(encode_frame(MSG)) == []  # closed for good


def test_oversized_in_small_chunks_never_buffers_past_the_cap():
    f = MLLPFramer(max_frame=4096)
    f.feed(b"\x0b")
    peak = 0
    for _ in range(100):
        f.feed(b"A" * 100)
        peak = max(peak, f.buffered)
        if f.closed:
            break
    assert f.closed and peak <= 4096


def test_frame_exactly_at_the_cap_is_accepted():
    payload = b"M" * 1000
    assert frames(MLLPFramer(max_frame=1000).feed(encode_frame(payload))) == [payload]


def test_in_frame_tracks_an_open_frame():
    f = MLLPFramer()
    f.feed(b"\x0bMSH")
    assert f.in_frame
    f.feed(b"|x\x1c\r")
    assert not f.in_frame


# -- test 12: chunking invariance (property) --------------------------------------

payloads = st.binary(min_size=0, max_size=300).map(lambda b: bytes(c for c in b if c not in (0x0B, 0x1C)))
trailers = st.sampled_from([b"\x1c\r", b"\x1c\r\n", b"\x1c"])
junk = st.sampled_from([b"", b"\x00", b"\r\n", b"xx"])


@st.composite
def streams(draw):
    parts = []
    expected = []
    for _ in range(draw(st.integers(1, 10))):
        p = draw(payloads)
        parts.append(draw(junk) + b"\x0b" + p + draw(trailers))
        expected.append(p)
    return b"".join(parts), expected


@settings(max_examples=300, deadline=None)
@given(streams(), st.lists(st.integers(min_value=0), max_size=40))
def test_any_split_of_a_stream_decodes_to_the_same_messages(stream, cuts):
    data, expected = stream
    positions = sorted({c % (len(data) + 1) for c in cuts})
    chunks = [data[a:b] for a, b in zip([0, *positions], [*positions, len(data)])]
    whole = MLLPFramer().feed(data)
    split = feed_all(chunks)
    assert frames(split) == frames(whole) == expected
    # Junk is reported per read, so compare totals, not events.
    assert sum(e.length for e in split if isinstance(e, Junk)) == sum(e.length for e in whole if isinstance(e, Junk))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000), st.integers(1, 64))
def test_fuzz_never_raises_and_never_exceeds_the_cap(data, step):
    f = MLLPFramer(max_frame=512)
    for i in range(0, len(data), step):
        for e in f.feed(data[i:i + step]):
            if isinstance(e, Frame):
                assert len(e.payload) <= 512
        assert f.buffered <= 512
