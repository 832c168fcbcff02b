"""Seeded synthetic block traces: the same seed and parameters always give the
same records, in time order, streamed (nothing is held but a few cursors).

Model per I/O: arrivals are Poisson at ``iops``, multiplied by
``burst_factor`` during bursts (each second starts a burst with probability
``burst_prob``, lasting ``burst_s``); the device is drawn uniformly; the op
from the read/write/flush/trim mix; the place continues the device's current
sequential run with probability ``seq_prob``, else lands in one of
``hot_spots`` hot regions with probability ``hot_prob``, else anywhere in the
device's span; the size is drawn from ``sizes`` (bytes: weight).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field

from testbench.traces.record import IoRecord

DEFAULT_SIZES = {4096: 50, 8192: 15, 16384: 12, 32768: 8, 65536: 10, 131072: 5}


@dataclass
class GeneratorParams:
    seed: int = 1
    duration_s: float = 10.0
    iops: float = 500.0
    devices: int = 2
    device_prefix: str = "dev"
    span_bytes: int = 256 << 20  # the address range each device uses
    write_ratio: float = 0.7
    flush_ratio: float = 0.0
    trim_ratio: float = 0.0
    seq_prob: float = 0.3
    hot_prob: float = 0.5
    hot_spots: int = 4
    hot_bytes: int = 4 << 20
    burst_prob: float = 0.1
    burst_s: float = 0.5
    burst_factor: float = 4.0
    align_bytes: int = 4096
    sizes: dict[int, float] = field(default_factory=lambda: dict(DEFAULT_SIZES))

    def check(self) -> None:
        if self.duration_s <= 0 or self.iops <= 0 or self.devices < 1:
            raise ValueError("duration_s, iops and devices must be positive")
        for name in ("write_ratio", "flush_ratio", "trim_ratio", "seq_prob", "hot_prob", "burst_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within 0..1")
        if self.write_ratio + self.flush_ratio + self.trim_ratio > 1.0:
            raise ValueError("write_ratio + flush_ratio + trim_ratio must not exceed 1")
        if self.align_bytes < 512 or self.align_bytes % 512:
            raise ValueError("align_bytes must be a multiple of 512")
        if self.span_bytes < max(self.sizes) or self.span_bytes % self.align_bytes:
            raise ValueError("span_bytes must hold the largest size and be a multiple of align_bytes")
        if any(s % 512 or s <= 0 for s in self.sizes):
            raise ValueError("sizes must be positive multiples of 512")


def generate(p: GeneratorParams) -> Iterator[IoRecord]:
    p.check()
    rng = random.Random(p.seed)
    names = [f"{p.device_prefix}{i}" for i in range(p.devices)]
    align = p.align_bytes
    slots = p.span_bytes // align
    hot = [[rng.randrange(0, max(1, (p.span_bytes - p.hot_bytes) // align)) * align for _ in range(p.hot_spots)]
           for _ in names]
    cursor = [rng.randrange(slots) * align for _ in names]
    sizes, weights = list(p.sizes), list(p.sizes.values())
    end_ns = int(p.duration_s * 1e9)
    t_ns = 0
    burst_until = -1
    next_second = 0
    while True:
        if t_ns >= next_second:  # each second may start a burst
            if rng.random() < p.burst_prob:
                burst_until = t_ns + int(p.burst_s * 1e9)
            next_second += 1_000_000_000
        rate = p.iops * (p.burst_factor if t_ns < burst_until else 1.0)
        t_ns += max(1, int(rng.expovariate(rate) * 1e9))
        if t_ns >= end_ns:
            return
        d = rng.randrange(len(names))
        x = rng.random()
        if x < p.flush_ratio:
            yield IoRecord(t_ns, "F", 0, 0, names[d])
            continue
        op = "T" if x < p.flush_ratio + p.trim_ratio else "W" if x < p.flush_ratio + p.trim_ratio + p.write_ratio else "R"
        size = rng.choices(sizes, weights)[0]
        y = rng.random()
        if y < p.seq_prob:
            offset = cursor[d]
        elif y < p.seq_prob + (1 - p.seq_prob) * p.hot_prob and hot[d]:
            base = hot[d][rng.randrange(len(hot[d]))]
            offset = base + rng.randrange(max(1, p.hot_bytes // align)) * align
        else:
            offset = rng.randrange(slots) * align
        if offset + size > p.span_bytes:
            offset = 0
        cursor[d] = offset + size
        yield IoRecord(t_ns, op, offset, size, names[d])
