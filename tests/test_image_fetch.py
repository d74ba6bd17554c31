"""consumer.tagging.images: the SSRF-safe image fetcher, against a real local HTTP server.

Name resolution is faked (monkeypatched `socket.getaddrinfo`) only for made-up names such as
`metadata.test`; every request goes over a real socket to 127.0.0.1.
"""

from __future__ import annotations

import base64
import io
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from PIL import Image

from consumer.tagging.images import REASONS, Fetched, FetchPolicy, ImageFetcher
from tagsys.errors import TagstreamError

LOCAL = ("127.0.0.1",)


def _image_bytes(fmt: str, size: tuple[int, int] = (32, 24), color: str = "red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, fmt)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR claiming `width`x`height`: a bomb in a few dozen bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _two_frame_gif() -> bytes:
    buf = io.BytesIO()
    first, second = Image.new("RGB", (8, 8), "blue"), Image.new("RGB", (8, 8), "yellow")
    first.save(buf, "GIF", save_all=True, append_images=[second])
    return buf.getvalue()


PNG = _image_bytes("PNG")
JPEG = _image_bytes("JPEG", (16, 16), "green")


@dataclass
class ServerState:
    """What the handlers saw, for assertions; reset per test."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    active: int = 0
    max_active: int = 0
    hosts: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)


class Handler(BaseHTTPRequestHandler):
    state: ServerState

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, body: bytes, ctype: str = "image/png", status: int = 200) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str, status: int = 302) -> None:
        self.send_response(status)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        with self.state.lock:
            self.state.hosts.append(self.headers.get("Host", ""))
            self.state.paths.append(url.path)
        route: dict[str, Callable[[], None]] = {
            "/png": lambda: self._send(PNG),
            "/jpeg": lambda: self._send(JPEG, "image/jpeg; charset=binary"),
            "/gif": lambda: self._send(_two_frame_gif(), "image/gif"),
            "/redirect": lambda: self._redirect("/png", 301),
            "/redirect-303": lambda: self._redirect("redirect", 303),  # relative, then 301
            "/to-metadata": lambda: self._redirect("http://169.254.169.254/latest/meta-data/"),
            "/to-metadata-name": lambda: self._redirect("http://metadata.test/latest/"),
            "/to-other": lambda: self._redirect("http://not-allowed.test/x.png", 307),
            "/to-ftp": lambda: self._redirect("ftp://127.0.0.1/x.png", 308),
            "/loop": lambda: self._redirect("/loop"),
            "/sleep": self._sleep,
            "/trickle": self._trickle,
            "/stall": self._stall,
            "/big-declared": self._big_declared,
            "/big-undeclared": self._big_undeclared,
            "/html": lambda: self._send(b"<html>hi</html>", "text/html"),
            "/fake-png": lambda: self._send(b"hello, not a picture", "image/png"),
            "/mismatch": lambda: self._send(JPEG, "image/png"),
            "/truncated": lambda: self._send(PNG[: len(PNG) // 2]),
            "/bomb": lambda: self._send(_png_header_only(20_000, 20_000)),
            "/warn-bomb": lambda: self._send(_png_header_only(10_000, 10_000)),
            "/missing": lambda: self._send(b"no", "text/plain", 404),
            "/slow": lambda: self._slow(int(query["i"][0])),
        }
        handler = route.get(url.path)
        if handler is None:
            self._send(b"", "text/plain", 404)
        else:
            handler()

    def _sleep(self) -> None:
        time.sleep(2.0)
        self._send(PNG)

    def _trickle(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(PNG)))
        self.end_headers()
        for byte in PNG:  # one byte per 0.2 s: every read returns well within the read timeout
            self.wfile.write(bytes([byte]))
            self.wfile.flush()
            time.sleep(0.2)

    def _stall(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(PNG)))
        self.end_headers()
        self.wfile.flush()
        time.sleep(0.8)
        self.wfile.write(PNG[:1])  # one byte late in the budget, then nothing
        self.wfile.flush()
        time.sleep(2.0)

    def _big_declared(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", "10000000")
        self.end_headers()
        self.wfile.write(PNG[:8])
        self.wfile.flush()
        time.sleep(2.0)  # a client that reads instead of refusing at once waits for this

    def _big_undeclared(self) -> None:
        self.send_response(200)  # HTTP/1.0, no Content-Length: the body ends at close
        self.send_header("Content-Type", "image/png")
        self.end_headers()
        self.wfile.write(PNG[:8] + b"\0" * 300_000)

    def _slow(self, i: int) -> None:
        with self.state.lock:
            self.state.active += 1
            self.state.max_active = max(self.state.max_active, self.state.active)
        time.sleep(0.3 - 0.02 * i)  # later URLs finish first: order must come from the input
        with self.state.lock:
            self.state.active -= 1
        self._send(_image_bytes("PNG", (i + 1, 1)))


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients hang up on purpose (timeouts, oversize bodies)


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    srv = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(autouse=True)
def state(server: Server) -> ServerState:
    Handler.state = ServerState()
    return Handler.state


@pytest.fixture
def base(server: Server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def port(server: Server) -> int:
    return int(server.server_address[1])


@pytest.fixture
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Names in the returned dict resolve to their listed addresses; others resolve normally."""
    table: dict[str, list[str]] = {}
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(host, str) and host in table:
            return [
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", (addr, port)) for addr in table[host]
            ]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return table


def make(hosts: tuple[str, ...] = LOCAL, **kw: Any) -> ImageFetcher:
    kw.setdefault("schemes", ("http",))
    return ImageFetcher(FetchPolicy(hosts=hosts, **kw))


@pytest.fixture
def fetcher() -> Iterator[ImageFetcher]:
    f = make(read_timeout_s=3.0)
    yield f
    f.close()


def assert_refused(result: Fetched, reason: str, detail: str = "") -> None:
    assert result.image is None, result
    assert result.reason == reason, result
    assert reason in REASONS
    assert detail.lower() in result.detail.lower(), result


# ---- success ----------------------------------------------------------------------------------


def test_fetches_png_and_jpeg_as_loaded_rgb(fetcher: ImageFetcher, base: str) -> None:
    png = fetcher.fetch(f"{base}/png")
    assert png.reason is None and png.image is not None
    assert (png.image.mode, png.image.size) == ("RGB", (32, 24))
    assert png.image.getpixel((0, 0)) == (255, 0, 0)
    assert png.nbytes == len(PNG)
    jpeg = fetcher.fetch(f"{base}/jpeg")  # Content-Type parameters are ignored
    assert jpeg.image is not None and jpeg.image.size == (16, 16)


def test_gif_gives_its_first_frame(fetcher: ImageFetcher, base: str) -> None:
    result = fetcher.fetch(f"{base}/gif")
    assert result.image is not None and result.image.mode == "RGB"
    assert result.image.getpixel((0, 0)) == (0, 0, 255)


# ---- allow-list, scheme, userinfo --------------------------------------------------------------


def test_parse_hosts_normalizes_valid_entries() -> None:
    spec = " a.com,*.CDN.net , 10.0.0.0/8,127.0.0.1,MinIO.Storage.SVC.,[::1],fd00::/8,"
    assert FetchPolicy.parse_hosts(spec) == (
        "a.com",
        "*.cdn.net",
        "10.0.0.0/8",
        "127.0.0.1",
        "minio.storage.svc",
        "::1",
        "fd00::/8",
    )
    assert FetchPolicy.parse_hosts("") == ()


@pytest.mark.parametrize(
    "entry",
    [
        "*",
        "*.com",
        "a.*.com",
        "*example.com",
        "http://a.com",
        "a.com:8080",
        "a.com/path",
        "10.0.0.0/33",
        "10.0.0.1/8",  # host bits set: probably a typo
        "bad host",
        "-a.com",
        "a_b.com",
        "2130706433",
        "u@a.com",
    ],
)
def test_parse_hosts_rejects_bad_entries(entry: str) -> None:
    with pytest.raises(TagstreamError, match="allow-list"):
        FetchPolicy.parse_hosts(f"ok.com,{entry}")
    with pytest.raises(TagstreamError):
        FetchPolicy(hosts=(entry,))  # a policy built in code is checked too


def test_bad_policy_values_raise() -> None:
    with pytest.raises(TagstreamError):
        FetchPolicy(schemes=("ftp",))
    with pytest.raises(TagstreamError):
        FetchPolicy(max_bytes=0)
    with pytest.raises(TagstreamError):
        FetchPolicy(max_redirects=-1)


def test_empty_allow_list_fetches_nothing(base: str) -> None:
    policy = FetchPolicy()
    assert not policy.enabled and policy.schemes == ("https",)
    with ImageFetcher(policy) as f:
        assert_refused(f.fetch(f"{base}/png"), "host", "off")


def test_scheme_must_be_allowed(base: str) -> None:
    with ImageFetcher(FetchPolicy(hosts=LOCAL)) as f:  # default: https only
        assert_refused(f.fetch(f"{base}/png"), "scheme")
    with make() as f:
        assert_refused(f.fetch("ftp://127.0.0.1/x.png"), "scheme")
        assert_refused(f.fetch("file:///etc/passwd"), "scheme")


def test_host_must_be_on_the_list(fetcher: ImageFetcher, port: int) -> None:
    assert_refused(fetcher.fetch(f"http://127.0.0.2:{port}/png"), "host", "allow-list")
    assert_refused(fetcher.fetch(f"http://localhost:{port}/png"), "host")  # names need entries
    assert_refused(fetcher.fetch(f"http://2130706433:{port}/png"), "host")  # 127.0.0.1 in disguise
    assert_refused(fetcher.fetch(f"http://127.0.0.1\t:{port}/png"), "host", "control")


def test_userinfo_is_refused(fetcher: ImageFetcher, port: int) -> None:
    assert_refused(fetcher.fetch(f"http://u:p@127.0.0.1:{port}/png"), "host", "userinfo")
    assert_refused(fetcher.fetch(f"http://127.0.0.1:{port}@evil.test/png"), "host")


def test_wildcard_matches_subdomains_only(fake_dns: dict[str, list[str]], port: int) -> None:
    for name in ("a.example.com", "x.y.example.com", "example.com", "badexample.com"):
        fake_dns[name] = ["127.0.0.1"]
    with make(("*.example.com", "127.0.0.1")) as f:
        assert f.fetch(f"http://a.example.com:{port}/png").reason is None
        assert f.fetch(f"http://X.Y.Example.COM:{port}/png").reason is None
        assert_refused(f.fetch(f"http://example.com:{port}/png"), "host")
        assert_refused(f.fetch(f"http://badexample.com:{port}/png"), "host")


# ---- addresses ---------------------------------------------------------------------------------


def test_allowed_name_resolving_to_loopback_is_private(state: ServerState, port: int) -> None:
    with make(("localhost",)) as f:
        assert_refused(f.fetch(f"http://localhost:{port}/png"), "private_address", "loopback")
    assert state.paths == []  # refused before connecting


def test_cidr_entry_opens_the_private_address(port: int) -> None:
    with make(("localhost", "127.0.0.0/8", "::1/128")) as f:
        result = f.fetch(f"http://localhost:{port}/png")
    assert result.reason is None and result.image is not None


def test_every_resolved_address_is_checked(fake_dns: dict[str, list[str]], port: int) -> None:
    fake_dns["mixed.test"] = ["8.8.8.8", "169.254.169.254"]
    with make(("mixed.test",), connect_timeout_s=0.5) as f:
        assert_refused(f.fetch(f"http://mixed.test:{port}/png"), "private_address", "169.254")


def test_ipv4_mapped_forms_are_checked(fake_dns: dict[str, list[str]], port: int) -> None:
    fake_dns["mapped.test"] = ["8.8.8.8"]
    real = socket.getaddrinfo

    def v6(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "mapped.test":
            return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::ffff:10.0.0.1", port, 0, 0))]
        if host == "sixtofour.test":  # 2002:a9fe:a9fe:: embeds 169.254.169.254
            return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("2002:a9fe:a9fe::1", port, 0, 0))]
        return real(host, port, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket, "getaddrinfo", v6)
        with make(("mapped.test", "sixtofour.test")) as f:
            assert_refused(f.fetch(f"http://mapped.test:{port}/"), "private_address", "10.0.0.1")
            assert_refused(f.fetch(f"http://sixtofour.test:{port}/"), "private_address", "embeds")
    with make() as f:  # the literal [::ffff:127.0.0.1] is 127.0.0.1, which is listed
        assert f.fetch(f"http://[::ffff:127.0.0.1]:{port}/png").reason is None


def test_connects_to_the_checked_address_with_the_original_host(
    fake_dns: dict[str, list[str]], state: ServerState, port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DNS rebinding: the name resolves once; a second lookup (here: 10.0.0.1) is never made."""
    calls: list[str] = []
    fake = socket.getaddrinfo

    def rebinding(host: Any, *args: Any, **kwargs: Any) -> Any:
        answer = fake(host, *args, **kwargs)
        if host == "minio.storage.svc":
            calls.append(host)
            fake_dns[host] = ["10.0.0.1"]  # what a rebinding server answers the next time
        return answer

    fake_dns["minio.storage.svc"] = ["127.0.0.1"]
    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    with make(("MinIO.storage.svc", "127.0.0.1"), connect_timeout_s=0.5) as f:
        result = f.fetch(f"http://Minio.Storage.Svc:{port}/png")
    assert result.reason is None, result
    assert calls == ["minio.storage.svc"]
    assert state.hosts == [f"minio.storage.svc:{port}"]


def test_connection_refused_and_dns_failure_are_connect(
    fake_dns: dict[str, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    with make(("127.0.0.1", "nowhere.test")) as f:
        assert_refused(f.fetch(f"http://127.0.0.1:{closed_port}/png"), "connect")
        real = socket.getaddrinfo

        def nxdomain(host: Any, *args: Any, **kwargs: Any) -> Any:
            if host == "nowhere.test":
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            return real(host, *args, **kwargs)

        monkeypatch.setattr(socket, "getaddrinfo", nxdomain)
        assert_refused(f.fetch("http://nowhere.test/png"), "connect", "resolve")


# ---- redirects ---------------------------------------------------------------------------------


def test_follows_allowed_redirects(fetcher: ImageFetcher, base: str, state: ServerState) -> None:
    result = fetcher.fetch(f"{base}/redirect-303")
    assert result.image is not None and result.image.size == (32, 24)
    assert state.paths == ["/redirect-303", "/redirect", "/png"]


def test_redirect_limit(base: str) -> None:
    with make(max_redirects=1) as f:
        assert f.fetch(f"{base}/redirect").reason is None
        assert_refused(f.fetch(f"{base}/redirect-303"), "redirect", "more than 1")
    with make(max_redirects=0) as f:
        assert_refused(f.fetch(f"{base}/redirect"), "redirect")


def test_redirect_loop(fetcher: ImageFetcher, base: str, state: ServerState) -> None:
    assert_refused(fetcher.fetch(f"{base}/loop"), "redirect", "more than 3")
    assert state.paths == ["/loop"] * 4


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("/to-metadata", "169.254.169.254 is not on the allow-list"),
        ("/to-other", "not-allowed.test is not on the allow-list"),
        ("/to-ftp", "scheme"),
    ],
)
def test_redirect_to_disallowed_target(
    fetcher: ImageFetcher, base: str, state: ServerState, path: str, why: str
) -> None:
    assert_refused(fetcher.fetch(f"{base}{path}"), "redirect", why)
    assert state.paths == [path]


def test_redirect_to_allowed_name_on_metadata_address(
    fake_dns: dict[str, list[str]], base: str
) -> None:
    fake_dns["metadata.test"] = ["169.254.169.254"]
    with make(("127.0.0.1", "metadata.test")) as f:
        assert_refused(f.fetch(f"{base}/to-metadata-name"), "redirect", "private_address")


# ---- timeouts, status, size --------------------------------------------------------------------


def test_read_timeout(base: str) -> None:
    with make(read_timeout_s=0.5) as f:
        start = time.monotonic()
        assert_refused(f.fetch(f"{base}/sleep"), "timeout")
    assert time.monotonic() - start < 1.5


def test_trickling_server_hits_the_overall_deadline(base: str) -> None:
    with make(read_timeout_s=1.0) as f:
        start = time.monotonic()
        result = f.fetch(f"{base}/trickle")
    assert_refused(result, "timeout")
    assert time.monotonic() - start < 1.8
    assert 0 < result.nbytes < len(PNG)


def test_stalled_read_ends_at_the_deadline_not_a_read_timeout_later(base: str) -> None:
    with make(read_timeout_s=1.0) as f:
        start = time.monotonic()
        result = f.fetch(f"{base}/stall")
    assert_refused(result, "timeout")
    assert time.monotonic() - start < 1.5  # a plain 1 s read timeout after the byte: 1.8 s


def test_http_status(fetcher: ImageFetcher, base: str) -> None:
    assert_refused(fetcher.fetch(f"{base}/missing"), "http_status", "404")


def test_declared_oversize_is_refused_before_reading(base: str) -> None:
    with make(max_bytes=100_000) as f:
        start = time.monotonic()
        assert_refused(f.fetch(f"{base}/big-declared"), "too_large", "content-length")
    assert time.monotonic() - start < 1.0  # the server holds the body back for 2 s


def test_undeclared_oversize_stops_at_the_cap(base: str) -> None:
    with make(max_bytes=100_000) as f:
        result = f.fetch(f"{base}/big-undeclared")
    assert_refused(result, "too_large")
    assert 100_000 < result.nbytes <= 100_001


# ---- content checks ----------------------------------------------------------------------------


def test_content_type_must_be_an_image(fetcher: ImageFetcher, base: str) -> None:
    assert_refused(fetcher.fetch(f"{base}/html"), "content_type", "text/html")


@pytest.mark.parametrize(
    ("path", "detail"),
    [("/fake-png", "magic"), ("/mismatch", "content-type says png"), ("/truncated", "decode")],
)
def test_bytes_must_be_the_declared_image(
    fetcher: ImageFetcher, base: str, path: str, detail: str
) -> None:
    assert_refused(fetcher.fetch(f"{base}{path}"), "not_an_image", detail)


def test_pixel_limit_is_checked_before_decoding(base: str) -> None:
    with make(max_pixels=32 * 24 - 1) as f:
        assert_refused(f.fetch(f"{base}/png"), "bomb", "768 pixels")
    with make(max_pixels=32 * 24) as f:
        assert f.fetch(f"{base}/png").reason is None


def test_decompression_bomb(fetcher: ImageFetcher, base: str) -> None:
    start = time.monotonic()
    assert_refused(fetcher.fetch(f"{base}/bomb"), "bomb")  # 400 M pixels > 40 M
    assert time.monotonic() - start < 1.0
    max_before = Image.MAX_IMAGE_PIXELS
    # Past our own limit, Pillow's error and warning are bombs too (and its global is untouched)
    with make(max_pixels=10**9) as f:
        assert_refused(f.fetch(f"{base}/bomb"), "bomb", "decompression bomb")
        assert_refused(f.fetch(f"{base}/warn-bomb"), "bomb", "decompression bomb")
    assert max_before == Image.MAX_IMAGE_PIXELS


# ---- base64 ------------------------------------------------------------------------------------


def test_decode_b64() -> None:
    with make(hosts=()) as f:  # no network involved: works with fetching off
        good = f.decode_b64(base64.b64encode(JPEG).decode())
        assert good.image is not None and good.image.size == (16, 16) and good.nbytes == len(JPEG)
        assert_refused(f.decode_b64("not base64!!"), "bad_base64")
        png64 = base64.b64encode(PNG).decode()
        assert f.decode_b64(f" {png64}\n").reason is None  # surrounding whitespace is fine
        assert_refused(f.decode_b64(f"{png64[:20]}!{png64[20:]}"), "bad_base64")
        assert_refused(f.decode_b64(f"{png64[:76]}\n{png64[76:]}"), "bad_base64")
        assert_refused(f.decode_b64(base64.b64encode(PNG).decode()[:-3]), "bad_base64")
        assert_refused(f.decode_b64(base64.b64encode(b"<html>").decode()), "not_an_image")
        bomb = base64.b64encode(_png_header_only(20_000, 20_000)).decode()
        assert_refused(f.decode_b64(bomb), "bomb")
    with make(hosts=(), max_bytes=len(PNG) - 1) as f:
        assert_refused(f.decode_b64(base64.b64encode(PNG).decode()), "too_large")
        assert_refused(f.decode_b64("A" * 10_000_000), "too_large", "chars")


def test_b64_webp_and_transparency() -> None:
    with make() as f:
        webp = f.decode_b64(base64.b64encode(_image_bytes("WEBP", (10, 6))).decode())
        assert webp.image is not None and webp.image.size == (10, 6)
        buf = io.BytesIO()
        Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(buf, "PNG")  # fully transparent red
        clear = f.decode_b64(base64.b64encode(buf.getvalue()).decode())
        assert clear.image is not None and clear.image.getpixel((0, 0)) == (255, 255, 255)


def test_junk_input_never_raises() -> None:
    junk: list[Any] = [None, 42, "", "http://", "http://[::1", "http://127.0.0.1:99999/", "//x/"]
    with make() as f:
        for url in junk:
            result = f.fetch(url)
            assert result.image is None and result.reason in ("host", "scheme"), (url, result)
        assert f.decode_b64(None).reason == "bad_base64"  # type: ignore[arg-type]
        assert f.decode_b64("").reason == "not_an_image"


# ---- many, callback ----------------------------------------------------------------------------


def test_fetch_many_keeps_order_and_bounds_concurrency(base: str, state: ServerState) -> None:
    urls = [f"{base}/slow?i={i}" for i in range(9)] + [f"{base}/html"]
    with ImageFetcher(FetchPolicy(hosts=LOCAL, schemes=("http",)), concurrency=3) as f:
        results = f.fetch_many(urls)
    sizes = [r.image.size if r.image else None for r in results]
    assert sizes == [(i + 1, 1) for i in range(9)] + [None]
    assert results[-1].reason == "content_type"
    assert state.max_active == 3


def test_on_result_is_called_once_per_fetch(base: str) -> None:
    seen: list[tuple[str, str | None]] = []
    with ImageFetcher(
        FetchPolicy(hosts=LOCAL, schemes=("http",)),
        on_result=lambda source, reason: seen.append((source, reason)),
    ) as f:
        f.fetch(f"{base}/png")
        f.fetch(f"{base}/redirect")
        f.fetch(f"{base}/html")
        f.decode_b64("%%%")
        f.fetch_many([f"{base}/png", "http://elsewhere.test/"])
    assert sorted(seen, key=str) == sorted(
        [
            ("url", None),
            ("url", None),
            ("url", "content_type"),
            ("b64", "bad_base64"),
            ("url", None),
            ("url", "host"),
        ],
        key=str,
    )


def test_a_failing_on_result_hook_does_not_break_the_fetch(base: str) -> None:
    def broken(source: str, reason: str | None) -> None:
        raise RuntimeError("metrics down")

    with ImageFetcher(FetchPolicy(hosts=LOCAL, schemes=("http",)), on_result=broken) as f:
        assert f.fetch(f"{base}/png").reason is None


def test_closed_fetcher_refuses(base: str) -> None:
    f = make()
    f.close()
    assert_refused(f.fetch_many([f"{base}/png"])[0], "connect", "closed")


# ---- https -------------------------------------------------------------------------------------


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """An https server on 127.0.0.1 whose self-signed certificate names `pinned.test`."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            *(
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
            ),
            *("-nodes", "-days", "1", "-subj", "/CN=pinned.test", "-addext"),
            *("subjectAltName=DNS:pinned.test", "-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    Handler.state = ServerState()
    srv = Server(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield int(srv.server_address[1]), cert
    srv.shutdown()
    srv.server_close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_https_checks_the_certificate_against_the_url_name(
    tls_server: tuple[int, Path], fake_dns: dict[str, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    port, cert = tls_server
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # trust the test CA (OpenSSL default paths)
    fake_dns["pinned.test"] = ["127.0.0.1"]
    fake_dns["other.test"] = ["127.0.0.1"]
    with ImageFetcher(FetchPolicy(hosts=("pinned.test", "other.test", "127.0.0.1"))) as f:
        ok = f.fetch(f"https://pinned.test:{port}/png")
        assert ok.reason is None, ok
        assert Handler.state.hosts == [f"pinned.test:{port}"]
        assert_refused(f.fetch(f"https://other.test:{port}/png"), "connect", "doesn't match")
