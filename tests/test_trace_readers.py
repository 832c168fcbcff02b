"""Every reader on the committed samples, on malformed input (with line numbers),
and the format-specific cases: per-CPU blktrace merge, byte order, summaries, gzip."""

from __future__ import annotations

import gzip
import pathlib
import struct

import pytest

from testbench.errors import TraceError
from testbench.traces import FORMATS, detect_format, read_trace, scan
from testbench.traces import blktrace as bt
from testbench.traces.generic_csv import CsvSpec

DATA = pathlib.Path(__file__).parent / "data" / "traces"
SAMPLES = {f.name: DATA / ("sample" + f.suffix) for f in FORMATS.values()}
CSV_SPEC = CsvSpec.parse("ts=0:ns,op=1,offset=2,length=3,device=4")


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_sample_is_detected_and_read(fmt):
    path = SAMPLES[fmt]
    assert path.exists(), f"regenerate with: mirrorfw trace generate {DATA} --format all ..."
    if fmt == "csv":
        with pytest.raises(TraceError, match="cannot tell"):
            detect_format(path)
        recs = list(read_trace(path, "csv", spec=CSV_SPEC))
    else:
        assert detect_format(path).name == fmt
        recs = list(read_trace(path))
    assert len(recs) > 40
    assert all(r.op in "RWTF" and r.offset_bytes >= 0 and r.length_bytes >= 0 for r in recs)
    st = scan(iter(recs))
    assert st.records == len(recs) and len(st.devices) == 2


# (format, file text with a bad line, the bad line's number, words the message must have)
MALFORMED = [
    ("fio2", "fio version 2 iolog\ndev0 add\ndev0 write 0 4096\ndev0 write x 4096\n", 4, "offset"),
    ("fio2", "fio version 2 iolog\ndev0 add\ndev0 frobnicate 0 4096\n", 3, "unknown action"),
    ("fio3", "fio version 3 iolog\n0 dev0 add\n5 dev0 write 0\n", 3, "OFFSET and LENGTH"),
    ("fio3", "fio version 3 iolog\n0 dev0 add\n-5 dev0 write 0 512\n", 3, "timestamp"),
    ("fio3", "fio version 9 iolog\n", 1, "not a fio iolog"),
    ("blkparse", "  8,0    0        1     0.000000000   697  Q  WS 100 + 8 [a]\nhello world\n", 2, "not a blkparse"),
    ("blkparse", "  8,0    0        1     0.000000000   697  Q  WS [a]\n", 1, "SECTOR + COUNT"),
    ("msr", "128166372003061629,web,1,Read,3154152960,32768,1127\n128166372003061630,web,1,Fetch,0,512,1\n", 2, "Type"),
    ("msr", "128166372003061629,web,1,Read,3154152960\n", 1, "7 fields"),
    ("alibaba", "1,R,0,4096,100\n1,W,abc,4096,200\n", 2, "offset"),
    ("alibaba", "1,X,0,4096,100\n", 1, "opcode"),
    ("tencent", "1538323200,100,8,1,1283\n1538323200,100,8,2,1283\n", 2, "IOType"),
    ("tencent", "1538323200,100,8\n", 1, "5 fields"),
    ("fiu", "89966527132073 4613 syslogd 29376 8 W 8 0 0ef1d67e\n89966527132080 4613 syslogd 29376 8 Q 8 0 0ef1d67e\n", 2, "op"),
    ("fiu", "89966527132073 4613 syslogd 29376 x W 8 0 0ef1d67e\n", 1, "size"),
    ("csv", "1,read,0,512,d\n2,write,0,512\n", 2, "fields"),
    ("csv", "1,read,0,512,d\n2,erase,0,512,d\n", 2, "not mapped"),
]


@pytest.mark.parametrize("fmt,text,line_no,words", MALFORMED, ids=[f"{m[0]}-{i}" for i, m in enumerate(MALFORMED)])
def test_malformed_line_is_reported_with_its_number(tmp_path, fmt, text, line_no, words):
    path = tmp_path / "bad.trace"
    path.write_text(text)
    opts = {"spec": CSV_SPEC} if fmt == "csv" else {}
    with pytest.raises(TraceError) as info:
        list(read_trace(path, fmt, **opts))
    assert info.value.line_no == line_no
    assert info.value.file == str(path)
    assert words.lower() in info.value.message.lower()
    assert f"{path}:{line_no}:" in str(info.value)


def test_known_real_world_lines_parse(tmp_path):
    cases = {
        "msr": ("128166372003061629,web,1,Read,3154152960,32768,1127\n", (12816637200306162900, "R", 3154152960, 32768, "web_1")),
        "alibaba": ("3,W,1048576,4096,1577808000000123\n", (1577808000000123000, "W", 1048576, 4096, "3")),
        "tencent": ("1538323200,2048,16,1,1283\n", (1538323200 * 10**9, "W", 2048 * 512, 16 * 512, "1283")),
        "fiu": ("89966527132073 4613 syslogd 29376 8 W 8 0 0ef1d67e9f1a8e3d4fa7b6f17c2d8a12\n", (89966527132073, "W", 29376 * 512, 4096, "8,0")),
        "blkparse": ("  8,16   3       12     1.000000200   697  Q  WS 223490 + 8 [kjournald]\n", (1_000_000_200, "W", 223490 * 512, 4096, "8,16")),
    }
    for fmt, (line, want) in cases.items():
        path = tmp_path / f"{fmt}.txt"
        path.write_text(line)
        (rec,) = read_trace(path, fmt)
        assert (rec.ts_ns, rec.op, rec.offset_bytes, rec.length_bytes, rec.device) == want, fmt
        assert detect_format(path).name == fmt


def test_unknown_trailing_fields_are_tolerated(tmp_path):
    path = tmp_path / "msr.csv"
    path.write_text("Timestamp,Hostname,DiskNumber,Type,Offset,Size,ResponseTime,Extra\n"
                    "128166372003061629,web,1,Write,0,4096,1127,whatever\n")
    (rec,) = read_trace(path, "msr")
    assert rec.op == "W" and rec.length_bytes == 4096


def test_blkparse_summary_ends_the_events(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("  8,0    0        1     0.000000000   697  Q   W 100 + 8 [a]\n"
                    "  8,0    0        2     0.000001000   697  D   W 100 + 8 [a]\n"
                    "  8,0    0        3     0.000002000   697  P   N [a]\n"
                    "  8,0    0        4     0.000003000   697  Q  FWS [a]\n\n"
                    "CPU0 (8,0):\n Reads Queued:           0,        0KiB\n"
                    "Total (8,0):\n Writes Queued: 1, 4KiB\n")
    q = list(read_trace(path, "blkparse"))
    assert [(r.op, r.offset_bytes) for r in q] == [("W", 51200), ("F", 0)]
    assert [r.ts_ns for r in read_trace(path, "blkparse", events="D")] == [1000]


def _raw(order: str, seq: int, t: int, sector: int, nbytes: int, action: int, cpu: int, pdu: bytes = b"") -> bytes:
    s = bt.BlkIoTraceLE if order == "<" else bt.BlkIoTraceBE
    return s.build(dict(magic=bt.MAGIC | bt.VERSION, sequence=seq, time=t, sector=sector, bytes=nbytes,
                        action=action, pid=1, device=(8 << 20) | 16, cpu=cpu, error=0, pdu_len=len(pdu))) + pdu


def test_blktrace_per_cpu_files_merge_by_time_and_skip_payloads(tmp_path):
    q_write = bt.TA_QUEUE | (bt.TC_QUEUE | bt.TC_WRITE) << 16
    q_read = bt.TA_QUEUE | (bt.TC_QUEUE | bt.TC_READ) << 16
    notify = 0 | bt.TC_NOTIFY << 16
    (tmp_path / "sdb.blktrace.0").write_bytes(
        _raw("<", 1, 100, 8, 4096, q_write, 0) + _raw("<", 2, 300, 16, 512, q_read, 0, b"pdu-bytes"))
    (tmp_path / "sdb.blktrace.1").write_bytes(
        _raw("<", 1, 50, 0, 512, q_read, 1) + _raw("<", 2, 200, 24, 1024, q_write, 1) + _raw("<", 3, 250, 0, 0, notify, 1, b"x" * 7))
    recs = list(read_trace(tmp_path / "sdb", "blktrace"))
    assert [(r.ts_ns, r.op, r.offset_bytes) for r in recs] == [(50, "R", 0), (100, "W", 4096), (200, "W", 12288), (300, "R", 8192)]
    assert {r.device for r in recs} == {"8,16"}
    # naming one per-CPU file finds its siblings too
    assert len(list(read_trace(tmp_path / "sdb.blktrace.1"))) == 4


def test_blktrace_big_endian_and_bad_records(tmp_path):
    q_write = bt.TA_QUEUE | (bt.TC_QUEUE | bt.TC_WRITE) << 16
    path = tmp_path / "be.blktrace.0"
    path.write_bytes(_raw(">", 1, 7, 2, 512, q_write, 0))
    (rec,) = read_trace(path)
    assert (rec.ts_ns, rec.offset_bytes) == (7, 1024)
    path.write_bytes(_raw("<", 1, 7, 2, 512, q_write, 0) + b"\x00" * 20)
    with pytest.raises(TraceError, match="cut short") as info:
        list(read_trace(path, "blktrace"))
    assert info.value.line_no == 2
    bad = bytearray(_raw("<", 1, 7, 2, 512, q_write, 0))
    bad[0] = 0x06  # version 6
    path.write_bytes(bytes(bad))
    with pytest.raises(TraceError, match="version 6"):
        list(read_trace(path, "blktrace"))
    path.write_bytes(struct.pack("<I", 0x12345678) + bytes(44))
    with pytest.raises(TraceError, match="magic"):
        list(read_trace(path, "blktrace"))


def test_gzip_traces_are_read_transparently(tmp_path):
    path = tmp_path / "a.csv.gz"
    path.write_bytes(gzip.compress(SAMPLES["alibaba"].read_bytes()))
    assert detect_format(path).name == "alibaba"
    assert len(list(read_trace(path))) == len(list(read_trace(SAMPLES["alibaba"])))


def test_undetectable_and_unknown_format_are_clear_errors(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("nothing to see here\n")
    with pytest.raises(TraceError, match="cannot tell"):
        detect_format(path)
    with pytest.raises(TraceError, match="unknown trace format"):
        read_trace(path, "nope")
    with pytest.raises(FileNotFoundError):
        list(read_trace(tmp_path / "missing.iolog", "fio3"))


def test_reader_streams_without_loading_the_file(tmp_path):
    path = tmp_path / "big.iolog"
    with open(path, "w") as f:
        f.write("fio version 3 iolog\n0 d add\n")
        for i in range(200_000):
            f.write(f"{i} d write {i * 4096} 4096\n")
        f.write("oops\n")
    it = read_trace(path)
    first = next(it)  # the first record arrives before the bad last line is reached
    assert first.offset_bytes == 0
    with pytest.raises(TraceError) as info:
        for _ in it:
            pass
    assert info.value.line_no == 200_003


def test_a_damaged_gzip_trace_is_a_trace_error(tmp_path):
    """The trace fuzz found BadGzipFile escaping the readers (82 in 20k cases):
    a gzip header with a bad compression method, or a cut-off stream."""
    import gzip

    from testbench.errors import TraceError
    from testbench.traces import read_trace

    good = gzip.compress(b"0 replay 8:0 0 W 0 8\n" * 50)
    for name, raw in (("method.gz", b"\x1f\x8b\x32" + good[3:]), ("cut.gz", good[: len(good) // 2])):
        path = tmp_path / name
        path.write_bytes(raw)
        with pytest.raises(TraceError, match=name):
            list(read_trace(str(path), "blkparse"))
