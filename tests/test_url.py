import pytest

from hal.url import UrlError, parse_size, parse_url


@pytest.mark.parametrize(
    "text, value",
    [("4096", 4096), ("64MiB", 64 << 20), ("1GiB", 1 << 30), ("16TiB", 16 << 40), ("1G", 1 << 30),
     ("1GB", 10**9), ("512b", 512), ("1.5KiB", 1536), (7, 7)],
)
def test_sizes_parse(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "abc", "1XB", "-1", "1.3b", "0x10"])
def test_bad_sizes_are_refused_with_the_text(text):
    with pytest.raises(UrlError, match="size"):
        parse_size(text)


def test_url_parts():
    u = parse_url("file:///tmp/a%20b.img?size=1GiB&block_size=4096")
    assert (u.scheme, u.path, u.size(), u.int_param("block_size", 512)) == ("file", "/tmp/a b.img", 1 << 30, 4096)
    n = parse_url("nbd://127.0.0.1:10809/vol0")
    assert (n.host, n.port, n.path) == ("127.0.0.1", 10809, "/vol0")


@pytest.mark.parametrize("url, what", [
    ("/tmp/a.img", "not a URL"),
    ("nbd://h:99999999/x", "bad port"),
    ("nvram://[/p.nvram", "Invalid IPv6 URL"),  # urllib raised ValueError (the config fuzz found it)
    ("mem://?size=1&size=2", "given twice"),
])
def test_bad_urls_say_what_is_wrong(url, what):
    with pytest.raises(UrlError, match=what):
        parse_url(url)


def test_unknown_options_are_named():
    with pytest.raises(UrlError, match="unknown option.*colour"):
        parse_url("mem://?size=1MiB&colour=red").check_keys({"size"})
