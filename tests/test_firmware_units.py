"""Unit tests of the firmware pieces: CG transition table, NVRAM layout
(round trips and a hand-made header fixture), TrackBitmap against a shadow
set, SessionParams parsing."""

from __future__ import annotations

import struct

import crc32c
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware import layout as L
from firmware.bitmap import TrackBitmap
from firmware.cg import CgMachine, Event, Phase
from firmware.double_record import DoubleRecord
from firmware.errors import InvalidTransition, NvramError
from firmware.params import SessionParams
from firmware.track_masks import TrackMasks
from tests.firmware_doubles import MemNvram

# -- the transition table ---------------------------------------------------------
# Written from the claims and DESIGN.md section 1, not from firmware/cg.py, so a
# wrong entry in cg.NEXT fails here. The cycle: quiesce (acks held) -> CR created
# and held acks released (claims 1, 2, 10) -> drain OOS (claims 8, 9) -> commit
# at the secondary -> swap (CR becomes OOS) -> idle. A failure or a time limit
# (max coordination time while quiescing, max drain time, a failed commit)
# ends the CG: back to idle, CR folded back into OOS.
CLAIMED_CYCLE = {
    (Phase.IDLE, Event.START): Phase.QUIESCING,
    (Phase.QUIESCING, Event.RECORDING_ON): Phase.DRAINING,
    (Phase.DRAINING, Event.DRAINED): Phase.COMMITTING,
    (Phase.COMMITTING, Event.COMMITTED): Phase.IDLE,
    (Phase.QUIESCING, Event.FAIL): Phase.IDLE,
    (Phase.QUIESCING, Event.TIMEOUT): Phase.IDLE,
    (Phase.DRAINING, Event.FAIL): Phase.IDLE,
    (Phase.DRAINING, Event.TIMEOUT): Phase.IDLE,
    (Phase.COMMITTING, Event.FAIL): Phase.IDLE,
    (Phase.COMMITTING, Event.TIMEOUT): Phase.IDLE,
}
# Change recording (new writes set CR, not OOS) is on from CR creation until
# the swap, and off while the acks are held: CR does not exist yet then.
CLAIMED_RECORDING = {Phase.IDLE: False, Phase.QUIESCING: False, Phase.DRAINING: True, Phase.COMMITTING: True}


@pytest.mark.parametrize("phase", list(Phase), ids=lambda p: p.value)
@pytest.mark.parametrize("event", list(Event), ids=lambda e: e.value)
def test_every_phase_event_pair(phase, event):
    entered = []
    m = CgMachine({p: (lambda ev, p=p: entered.append((p, ev))) for p in Phase})
    m.phase = phase
    assert m.recording is CLAIMED_RECORDING[phase]
    if (phase, event) in CLAIMED_CYCLE:
        assert m.handle(event) is CLAIMED_CYCLE[phase, event]
        assert m.phase is CLAIMED_CYCLE[phase, event]
        assert entered == [(CLAIMED_CYCLE[phase, event], event)]
    else:
        with pytest.raises(InvalidTransition, match=event.value):
            m.handle(event)
        assert m.phase is phase and entered == []


def test_one_cycle_walks_the_claimed_steps_in_order():
    m = CgMachine()
    walked = [(m.phase, m.recording)]
    for ev in (Event.START, Event.RECORDING_ON, Event.DRAINED, Event.COMMITTED):
        m.handle(ev)
        walked.append((m.phase, m.recording))
    assert walked == [(Phase.IDLE, False), (Phase.QUIESCING, False), (Phase.DRAINING, True),
                      (Phase.COMMITTING, True), (Phase.IDLE, False)]


# -- layout ---------------------------------------------------------------------------
def test_header_round_trip_and_hand_made_fixture():
    plan = L.plan_region(b"MFWP", 8 << 20, [("vol0", 1 << 20)], 65536, "demo", with_cache=True)
    fields = plan.header_fields(generation=7, clean=1)
    raw = L.Header.build(fields)
    back = L.Header.parse(raw)
    assert back.magic == b"MFWP" and back.generation == 7 and back.volumes[0].name == "vol0"
    assert L.RegionPlan.from_header(back) == plan
    # Hand-made from the documented field order (little-endian), not from construct.
    expect = (b"MFWP" + struct.pack("<HQBIIIIQQQ", 4, 7, 1, 65536, 512, plan.n_slots, plan.entry_bytes,
                                    plan.dir_offset, plan.slots_offset, plan.total_bytes)
              + b"demo".ljust(64, b"\0") + struct.pack("<H", 1)
              + b"vol0".ljust(32, b"\0") + struct.pack("<QQQQ", 1 << 20, 16, 4 * 4096, 4096)
              + struct.pack("<Q", 6 * 4096))  # the track mask area, after the two bitmap areas
    assert raw == expect
    # 16 tracks of 4-byte records, 64-byte aligned, then the directory.
    assert plan.masks_offset == 6 * 4096 and plan.masks_bytes == 64 and plan.dir_offset == 6 * 4096 + 64
    # A version 3 header has no masks_offset: it parses to a plan without the area.
    v3 = L.Header.build(dict(fields, version=3, masks_offset=None))
    assert v3 == expect[:-8].replace(struct.pack("<H", 4), struct.pack("<H", 3), 1)
    assert L.RegionPlan.from_header(L.Header.parse(v3)).masks_offset == 0


def test_track_mask_records():
    assert L.mask_record_bytes(65536) == 4  # tag + 16 segment bits
    assert L.mask_record_bytes(4096) == 4
    assert L.mask_record_bytes(128 << 10) == 8  # tag + 32 bits, one aligned word
    assert L.mask_record_bytes(4 << 20) == 136  # 1,024 segments
    assert [L.mask_tag(e) for e in (1, 2, 0xFFFF, 0x10000, 0x10001, 0xFFFFFFFF)] == [1, 2, 0xFFFF, 1, 2, 0xFFFF]
    plan = L.plan_region(b"MFWP", 8 << 20, [("a", 3 * 65536), ("b", 65536)], 65536, "s", with_cache=True)
    nv = MemNvram(plan.total_bytes)
    masks = TrackMasks(nv, plan)
    masks.put(1, 0, 0x8001, 7)
    at = plan.masks_offset + 3 * 4  # volume b's first track follows volume a's three
    assert bytes(nv.buf[at : at + 4]) == struct.pack("<HH", 7, 0x8001) and nv.persists == 1
    assert masks.get(1, 0, 7) == 0x8001 and masks.get(1, 0, 8) is None and masks.get(0, 0, 7) is None
    assert masks.get(1, 0, 7 + 0xFFFF) == 0x8001  # the same tag: why the area is zeroed as it comes round
    masks.zero()
    assert masks.get(1, 0, 7) is None


def test_sealed_record_survives_a_torn_update():
    view = memoryview(bytearray(4 * 4096))
    rec = DoubleRecord(view, lambda o, n: None, 0, L.CgRecord)
    base = {"seq": 1, "phase": 0, "recording": 0, "oos_select": 0, "start_wall": 0.0, "committed_seq": 0,
            "cut_wall": 0.0, "commit_wall": 0.0, "successful": 0, "failed": 0, "consecutive": 0, "generation": 9,
            "mask_epoch": 1}
    rec.write(base)
    rec.write(dict(base, seq=2))
    assert DoubleRecord(view, None, 0, L.CgRecord).read()["seq"] == 2
    # Tear the newest copy (copy 1): the previous version stays readable.
    view[4096 + 20] ^= 0xFF
    assert DoubleRecord(view, None, 0, L.CgRecord).read()["seq"] == 1
    view[20] ^= 0xFF
    assert DoubleRecord(view, None, 0, L.CgRecord).read() is None


def test_dir_entry_fast_pack_equals_construct_and_crc_rejects_damage():
    valid = bytes(range(16))
    fast = L.pack_entry(9, L.STATE_NEW, 1, 2, 12345, valid, b"\x05\x80", 77)
    slow = L.dir_entry_struct(16, 2).build({"gen": 9, "state": 2, "dirty": 1, "volume": 2, "mask_epoch": 77,
                                            "track": 12345, "valid": valid, "segments": b"\x05\x80",
                                            "crc": crc32c.crc32c(fast[:-4])})
    assert fast == slow
    assert L.unpack_entry(fast, 16, 2) == {"gen": 9, "state": 2, "dirty": 1, "volume": 2, "track": 12345,
                                           "valid": valid, "segments": b"\x05\x80", "mask_epoch": 77}
    torn = bytearray(fast)
    torn[10] ^= 1
    assert L.unpack_entry(bytes(torn), 16) is None


def test_dir_entry_bytes_match_a_hand_made_fixture():
    """The on-disk entry as the layout docstring specifies it, byte by byte
    (so a mistake shared by the declaration and its derived struct cannot pass)."""
    valid = bytes([0xF0, 0x0F])
    head = (bytes.fromhex("0900000000000000")  # gen 9, u64 LE
            + bytes([2])                      # state NEW
            + bytes([1])                      # dirty
            + bytes.fromhex("0200")           # volume 2, u16 LE
            + bytes.fromhex("2a000000")       # mask epoch 42, u32 LE
            + bytes.fromhex("3930000000000000"))  # track 12345, u64 LE
    segments = bytes([0x03])  # segments 0 and 1 (an 8 KiB track: 16 sectors, 2 segments)
    body = head + valid + segments
    want = body + crc32c.crc32c(body).to_bytes(4, "little")
    assert L.pack_entry(9, L.STATE_NEW, 1, 2, 12345, valid, segments, 42) == want
    assert L.entry_bytes_for(2, 1) == 32  # 24 + 2 + 1 + 4, rounded up to 8
    assert L.entry_bytes_for(16, 2) == 48  # 64 KiB tracks: the entry did not grow with its mask
    assert L.segment_bytes_for(65536) == 2 and L.segment_bytes_for(8192) == 1 and L.segment_bytes_for(512) == 1
    assert [int(s) for s in (L.STATE_FREE, L.STATE_CUR, L.STATE_NEW)] == [0, 1, 2]


def test_dir_entry_state_is_an_enum_in_both_directions():
    raw = L.pack_entry(3, L.EntryState.CUR, 0, 1, 7, bytes(16), bytes(2))
    entry = L.unpack_entry(raw, 16, 2)
    assert entry["state"] is L.EntryState.CUR is L.STATE_CUR
    assert L.dir_entry_struct(16, 2).parse(raw).state == "CUR"  # construct's Enum names it
    assert L.dir_entry_struct(16, 2).build(dict(L.dir_entry_struct(16, 2).parse(raw))) == raw
    # A state no member names (a CRC-valid entry from another layout) comes back as its number,
    # so recovery can report it instead of failing to parse.
    body = bytearray(raw[:-4])
    body[8] = 7
    odd = bytes(body) + crc32c.crc32c(bytes(body)).to_bytes(4, "little")
    assert L.unpack_entry(odd, 16, 2)["state"] == 7


def test_region_too_small_is_a_clear_error():
    with pytest.raises(NvramError, match="too small"):
        L.plan_region(b"MFWP", 64 << 10, [("v", 1 << 30)], 65536, "s", with_cache=True)
    with pytest.raises(NvramError, match="1..32 bytes"):
        L.plan_region(b"MFWP", 64 << 20, [("x" * 40, 1 << 20)], 65536, "s", with_cache=True)


# -- bitmap against a shadow model ------------------------------------------------------
ops = st.lists(st.tuples(st.sampled_from(["set", "clear", "range", "merge", "clear_all"]),
                         st.integers(0, 299), st.integers(0, 299)), max_size=60)


@settings(max_examples=60, deadline=None)
@given(ops)
def test_bitmap_matches_shadow_set_after_every_step(steps):
    buf = memoryview(bytearray(64))
    bm = TrackBitmap(300, buf)
    other = TrackBitmap(300)
    other.set_range(100, 140)
    shadow: set[int] = set()
    for op, a, b in steps:
        if op == "set":
            assert bm.set(a) == (a not in shadow)
            shadow.add(a)
        elif op == "clear":
            assert bm.clear(a) == (a in shadow)
            shadow.discard(a)
        elif op == "range":
            lo, hi = min(a, b), max(a, b)
            bm.set_range(lo, hi)
            shadow |= set(range(lo, hi))
        elif op == "merge":
            bm.or_merge(other)
            shadow |= set(range(100, 140))
        else:
            bm.clear_all()
            shadow.clear()
        assert bm.count() == len(shadow) == bm.recount()
        assert bm.set_tracks() == sorted(shadow)
        assert bm.next_set(a) == min((t for t in shadow if t >= a), default=-1)
        runs = bm.runs(0, None, 1000)
        assert sorted(t for r in runs for t in range(*r)) == sorted(shadow)
    # the bits live in the buffer: a new bitmap on it sees the same set
    assert TrackBitmap(300, buf).set_tracks() == sorted(shadow)


def test_bitmap_of_a_16_tib_volume_finds_bits_without_python_scanning():
    tracks = (16 << 40) // 65536  # 256 Mi bits
    bm = TrackBitmap(tracks, memoryview(bytearray(tracks // 8)))
    bm.set(tracks - 1)
    bm.set(5)
    assert bm.next_set(6) == tracks - 1 and bm.next_set(0) == 5
    assert bm.runs(0, None, 8) == [[5, 6], [tracks - 1, tracks]]
    assert bm.count() == 2


# -- params ------------------------------------------------------------------------------------
def test_params_parse_and_refuse():
    p = SessionParams()
    p.set("max_coord_ms", "20")
    p.set("track_bytes", "16KiB")
    p.set("collision_policy", "send-first")
    assert (p.max_coord_ms, p.track_bytes, p.collision_policy) == (20.0, 16384, "send-first")
    for name, text in [("track_bytes", "3000"), ("max_coord_ms", "-1"), ("collision_policy", "x"),
                       ("nope", "1"), ("drain_inflight", "zero")]:
        with pytest.raises(ValueError, match=name):
            p.set(name, text)
    assert (p.max_coord_ms, p.track_bytes) == (20.0, 16384)
