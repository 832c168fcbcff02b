"""Device URLs: ``scheme://host/path?key=value``, sizes like ``1GiB``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, urlsplit


class UrlError(ValueError):
    """A URL that cannot name a device; the message says what is wrong."""


_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kb": 1000, "kib": 1 << 10,
    "m": 1 << 20, "mb": 1000**2, "mib": 1 << 20,
    "g": 1 << 30, "gb": 1000**3, "gib": 1 << 30,
    "t": 1 << 40, "tb": 1000**4, "tib": 1 << 40,
    "p": 1 << 50, "pb": 1000**5, "pib": 1 << 50,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int) -> int:
    """``"64MiB"`` -> 67108864. Binary units for K/M/G/T/P and *iB; decimal for *B."""
    if isinstance(text, int):
        if text < 0:
            raise UrlError(f"size {text} is negative")
        return text
    m = _SIZE.match(str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise UrlError(f"size {text!r} is not a size (examples: 4096, 64MiB, 1GiB, 16TiB)")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value != int(value):
        raise UrlError(f"size {text!r} is not a whole number of bytes")
    return int(value)


@dataclass
class DeviceUrl:
    url: str
    scheme: str
    host: str
    port: int | None
    path: str
    query: dict[str, str]

    def size(self, default: int | None = None) -> int | None:
        return parse_size(self.query["size"]) if "size" in self.query else default

    def int_param(self, key: str, default: int) -> int:
        if key not in self.query:
            return default
        try:
            return parse_size(self.query[key])
        except UrlError as e:
            raise UrlError(f"{self.url}: {key}={self.query[key]!r}: {e}") from None

    def check_keys(self, allowed: set[str]) -> None:
        unknown = set(self.query) - allowed
        if unknown:
            raise UrlError(
                f"{self.url}: unknown option(s) {', '.join(sorted(unknown))}; "
                f"known: {', '.join(sorted(allowed)) or 'none'}"
            )


def parse_url(url: str) -> DeviceUrl:
    if "://" not in url:
        raise UrlError(f"{url!r} is not a URL (expected scheme://..., e.g. file:///tmp/a.img?size=1GiB)")
    try:
        parts = urlsplit(url)
    except ValueError as e:  # a host like "[" (urllib: "Invalid IPv6 URL")
        raise UrlError(f"{url}: {e}") from None
    try:
        port = parts.port
    except ValueError as e:
        raise UrlError(f"{url}: bad port: {e}") from None
    query: dict[str, str] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False):
        if key in query:
            raise UrlError(f"{url}: option {key!r} given twice")
        query[key] = value
    return DeviceUrl(url, parts.scheme.lower(), parts.hostname or "", port, unquote(parts.path), query)
