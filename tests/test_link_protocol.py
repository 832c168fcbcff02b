"""Replication link frames: round trips, a hand-made fixture, and a fuzzed
decoder that only ever raises ProtocolError."""

from __future__ import annotations

import struct

import crc32c
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware import protocol as p

EXAMPLES = [
    p.Hello(seq=1, version=p.PROTOCOL_VERSION, session_id="demo", volumes=[("vol0", 1 << 30, 65536), ("v1", 4096, 512)]),
    p.AuthChallenge(seq=2, nonce=bytes(range(32))),
    p.AuthResponse(seq=3, mac=b"\xaa" * 32, challenge=b"\x55" * 32),
    p.AuthResponse(seq=4, mac=b"\xaa" * 32),
    p.Data(seq=5, volume=1, track=123456, cg_seq=77, payload=b"\x00\x01" * 32768),
    p.Data(seq=6, volume=0, track=0, cg_seq=1, payload=b""),
    p.DrainDone(seq=7, cg_seq=77),
    p.Prepare(seq=8, cg_seq=77),
    p.Commit(seq=9, cg_seq=77),
    p.Abort(seq=10, cg_seq=78),
    p.Ack(acked=5),
    p.Ack(acked=6, status=p.AckStatus.REFUSED, message="volume völ0 unknown"),
    p.Status(acked=1, session_id="demo", committed_cg=76, new=False, volumes=[("vol0", 1 << 30, 65536)]),
    p.Error(code=p.ErrorCode.AUTH, message="wrong secret"),
]


@pytest.mark.parametrize("frame", EXAMPLES, ids=lambda f: type(f).__name__)
def test_every_kind_round_trips(frame):
    assert p.decode(p.encode(frame)) == frame


def test_crc32c_is_castagnoli():
    # The check value of CRC-32C (iSCSI), so the library cannot silently be another CRC.
    assert crc32c.crc32c(b"123456789") == 0xE3069283


def hello_fixture() -> bytes:
    """HELLO seq 3, session "demo", one volume vol0 of 1 MiB in 64 KiB tracks, from the layout by hand."""
    body = (
        struct.pack(">H", 1)  # hello version
        + struct.pack(">H", 4) + b"demo"
        + struct.pack(">H", 1)  # one volume
        + struct.pack(">H", 4) + b"vol0" + struct.pack(">QI", 1 << 20, 65536)
    )
    header = b"MFWL" + struct.pack(">BBHQI", 1, 1, 0, 3, len(body))
    return header + body + struct.pack(">I", crc32c.crc32c(header + body))


def test_hand_made_fixture_decodes_and_encodes_identically():
    raw = hello_fixture()
    frame = p.decode(raw)
    assert frame == p.Hello(seq=3, version=1, session_id="demo", volumes=[("vol0", 1 << 20, 65536)])
    assert p.encode(frame) == raw
    assert len(raw) == p.HEADER_BYTES + 28 + 4


def test_data_fixture_payload_offset():
    raw = p.encode(p.Data(seq=9, volume=2, track=5, cg_seq=6, payload=b"PAYLOAD"))
    assert raw[:4] == b"MFWL" and raw[5] == p.Kind.DATA
    body = raw[p.HEADER_BYTES:-4]
    assert body == struct.pack(">HQQ", 2, 5, 6) + b"PAYLOAD"


def corrupt(raw: bytes, index: int, value: int) -> bytes:
    b = bytearray(raw)
    b[index] = value
    return bytes(b)


def recrc(raw: bytes) -> bytes:
    return raw[:-4] + struct.pack(">I", crc32c.crc32c(raw[:-4]))


@pytest.mark.parametrize(
    "mangle, error, words",
    [
        (lambda r: b"XXXX" + r[4:], p.BadMagic, "magic"),
        (lambda r: recrc(corrupt(r, 4, 9)), p.BadVersion, "version 9"),
        (lambda r: recrc(corrupt(r, 5, 200)), p.BadKind, "kind 200"),
        (lambda r: corrupt(r, 30, r[30] ^ 1), p.BadCrc, "CRC32C"),
        (lambda r: r[:-1], p.BadLength, "header says"),
        (lambda r: r + b"\0", p.BadLength, "header says"),
        (lambda r: r[:10], p.BadLength, "shorter"),
        (lambda r: recrc(r[:16] + struct.pack(">I", p.MAX_BODY_BYTES + 1) + r[20:]), p.BadLength, "limit"),
        (lambda r: recrc(corrupt(r, 7, 0x80)), p.BadBody, "flags"),
        # a body one byte longer than HELLO uses: trailing bytes
        (lambda r: recrc(r[:16] + struct.pack(">I", 29) + r[20:-4] + b"\0" + r[-4:]), p.BadBody, "trailing"),
        # a session id that claims more bytes than the body has
        (lambda r: recrc(r[:22] + struct.pack(">H", 200) + r[24:]), p.BadBody, "HELLO"),
    ],
)
def test_bad_frames_raise_clear_protocol_errors(mangle, error, words):
    with pytest.raises(error, match=words):
        p.decode(mangle(hello_fixture()))


def test_rest_length_reads_the_header():
    raw = hello_fixture()
    assert p.rest_length(raw[: p.HEADER_BYTES]) == len(raw) - p.HEADER_BYTES
    assert p.rest_length(b"GET / HTTP/1.1\r\nHost") == 0  # not ours: decode names the problem
    huge = raw[:16] + struct.pack(">I", p.MAX_BODY_BYTES + 1)
    assert p.rest_length(huge) == 0


def test_encode_refuses_values_that_do_not_fit():
    with pytest.raises(p.ProtocolError):
        p.encode(p.Data(seq=1, volume=70000, track=0, cg_seq=0, payload=b""))
    with pytest.raises(p.ProtocolError):
        p.encode(p.Ack(acked=-1))


def test_mac_depends_on_role_nonce_session_and_secret():
    base = p.auth_mac(b"k", "primary", b"n" * 32, "s")
    assert p.check_mac(b"k", "primary", b"n" * 32, "s", base)
    for args in [(b"K", "primary", b"n" * 32, "s"), (b"k", "secondary", b"n" * 32, "s"),
                 (b"k", "primary", b"m" * 32, "s"), (b"k", "primary", b"n" * 32, "t")]:
        assert not p.check_mac(*args, base)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_decoder_fuzz_random_bytes_only_protocol_errors(data):
    try:
        p.decode(data)
    except p.ProtocolError:
        pass


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(EXAMPLES), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
       st.booleans(), st.integers(0, 40))
def test_decoder_fuzz_mutated_frames(frame, edits, fix_crc, cut):
    raw = bytearray(p.encode(frame))
    for index, value in edits:
        raw[index % len(raw)] = value
    raw = bytes(raw)
    if cut:
        raw = raw[:-cut]
    if fix_crc and len(raw) > 4:
        raw = recrc(raw)  # reach the body parser with bad bodies
    try:
        decoded = p.decode(raw)
    except p.ProtocolError:
        return
    # Whatever decodes must re-encode to the same bytes (no silent reinterpretation),
    # except a Flag byte, which parses any non-zero value as true.
    if not isinstance(decoded, p.Status):
        assert p.encode(decoded) == raw
