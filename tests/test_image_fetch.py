"""consumer.tagging.images: the SSRF-safe image fetcher, against a real local HTTP server.

Name resolution is faked (monkeypatched `socket.getaddrinfo`) only for made-up names such as
`metadata.test`; every request goes over a real socket to 127.0.0.1. The server listens on a
random port, so the allow-lists here name it (`127.0.0.1:<port>`): an entry without a port allows
only 80/443.
"""

from __future__ import annotations

import base64
import io
import shutil
import socket
import ssl
import struct
import subprocess
import sys
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
from PIL import Image, JpegImagePlugin

from consumer.tagging.images import Fetched, FetchPolicy, ImageFetcher
from tagsys.errors import TagstreamError

REPO = Path(__file__).resolve().parents[1]


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


def _b64(fmt: str, size: tuple[int, int], color: str = "red") -> str:
    return base64.b64encode(_image_bytes(fmt, size, color)).decode()


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
            "/to-port-80": lambda: self._redirect("http://127.0.0.1/png"),
            "/loop": lambda: self._redirect("/loop"),
            "/sleep": self._sleep,
            "/trickle": self._trickle,
            "/trickle-headers": self._trickle_headers,
            "/trickle-undeclared": self._trickle_undeclared,
            "/stall": self._stall,
            "/big-declared": self._big_declared,
            "/big-undeclared": self._big_undeclared,
            "/html": lambda: self._send(b"<html>hi</html>", "text/html"),
            "/fake-png": lambda: self._send(b"hello, not a picture", "image/png"),
            "/mismatch": lambda: self._send(JPEG, "image/png"),
            "/truncated": lambda: self._send(PNG[: len(PNG) // 2]),
            "/bomb": lambda: self._send(_png_header_only(20_000, 20_000)),
            "/strip": lambda: self._send(_png_header_only(40_000, 1)),  # 69 bytes
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

    def _trickle_headers(self) -> None:
        """The status line, then a header a byte per 0.2 s (3 s in all), then a good image:
        every read returns within any per-read timeout."""
        self.close_connection = True
        self.wfile.write(b"HTTP/1.1 200 OK\r\n")
        self.wfile.flush()
        for byte in b"X-Slow: 123456\r\n":
            self.wfile.write(bytes([byte]))
            self.wfile.flush()
            time.sleep(0.2)
        self.wfile.write(
            b"Content-Type: image/png\r\nContent-Length: %d\r\n\r\n%s" % (len(PNG), PNG)
        )

    def _trickle_undeclared(self) -> None:
        """No Content-Length (HTTP/1.0): the body ends where the connection does."""
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()
        for byte in PNG:
            self.wfile.write(bytes([byte]))
            self.wfile.flush()
            time.sleep(0.1)

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


@pytest.fixture
def local(port: int) -> tuple[str, ...]:
    """The allow-list that admits the local server (and only its port)."""
    return (f"127.0.0.1:{port}",)


Make = Callable[..., ImageFetcher]


@pytest.fixture
def make(local: tuple[str, ...]) -> Make:
    """An http-allowing fetcher; `hosts` defaults to the local server."""

    def build(hosts: tuple[str, ...] | None = None, **kw: Any) -> ImageFetcher:
        kw.setdefault("schemes", ("http",))
        return ImageFetcher(FetchPolicy(hosts=local if hosts is None else hosts, **kw))

    return build


@pytest.fixture
def fetcher(make: Make) -> Iterator[ImageFetcher]:
    f = make(read_timeout_s=3.0)
    yield f
    f.close()


def assert_refused(result: Fetched, reason: str, detail: str = "") -> None:
    assert result.image is None, result
    assert result.reason == reason, result
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
    spec = (
        " a.com,*.CDN.net , 10.0.0.0/8,127.0.0.1,MinIO.Storage.SVC.,[::1],fd00::/8,"
        "Minio.svc:9000,*.example.com:08443,10.0.0.5:9000,[FD00::1]:9000,fd00::1:9000,"
        "[::ffff:10.0.0.6]:80,10.96.0.7/32,"
    )
    assert FetchPolicy.parse_hosts(spec) == (
        "a.com",
        "*.cdn.net",
        "10.0.0.0/8",
        "127.0.0.1",
        "minio.storage.svc",
        "::1",
        "fd00::/8",
        "minio.svc:9000",
        "*.example.com:8443",
        "10.0.0.5:9000",
        "[fd00::1]:9000",
        "fd00::1:9000",  # a bare IPv6 address (no port): ports need the brackets
        "10.0.0.6:80",
        "10.96.0.7/32",
    )
    assert FetchPolicy.parse_hosts("") == ()


@pytest.mark.parametrize(
    "entry",
    [
        "*",
        "*.com",
        "*.com:443",
        "a.*.com",
        "*example.com",
        "http://a.com",
        "a.com/path",
        "a.com:",
        "a.com:0",
        "a.com:65536",
        "a.com:x",
        "a.com:+80",
        "a.com:80:80",
        "10.0.0.0/33",
        "10.0.0.1/8",  # host bits set: probably a typo
        "10.0.0.0/8:80",  # a CIDR takes no port
        "[10.0.0.1]:80",  # brackets are for IPv6
        "[a.com]:80",
        "[fd00::1]:",
        "[fd00::1]x",
        "[fd00::/8]",
        "bad host",
        "-a.com",
        "a_b.com",
        "2130706433",
        "2130706433:80",
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
    with pytest.raises(TagstreamError, match="max_side"):
        FetchPolicy(max_side=31)
    assert FetchPolicy(max_side=32).max_side == 32


def test_empty_allow_list_fetches_nothing(base: str) -> None:
    policy = FetchPolicy()
    assert not policy.enabled and policy.schemes == ("https",)
    with ImageFetcher(policy) as f:
        assert_refused(f.fetch(f"{base}/png"), "host", "off")


def test_scheme_must_be_allowed(make: Make, local: tuple[str, ...], base: str) -> None:
    with ImageFetcher(FetchPolicy(hosts=local)) as f:  # default: https only
        assert_refused(f.fetch(f"{base}/png"), "scheme")
    with make() as f:
        assert_refused(f.fetch("ftp://127.0.0.1/x.png"), "scheme")
        assert_refused(f.fetch("file:///etc/passwd"), "scheme")


def test_host_must_be_on_the_list(fetcher: ImageFetcher, base: str, port: int) -> None:
    assert fetcher.fetch(f"{base}/png").reason is None  # 127.0.0.1:<port> is listed, ...
    assert_refused(fetcher.fetch(f"http://127.0.0.2:{port}/png"), "host", "allow-list")
    assert_refused(fetcher.fetch(f"http://localhost:{port}/png"), "host")  # names need entries
    # ... but not its other spellings, which some resolvers would turn into 127.0.0.1
    for disguise in ("2130706433", "0x7f000001", "127.1", "0177.0.0.1"):
        result = fetcher.fetch(f"http://{disguise}:{port}/png")
        assert_refused(result, "host", "is not on the allow-list")
    assert_refused(fetcher.fetch(f"http://127.0.0.1\t:{port}/png"), "host", "control")


def test_userinfo_is_refused(fetcher: ImageFetcher, port: int) -> None:
    assert_refused(fetcher.fetch(f"http://u:p@127.0.0.1:{port}/png"), "host", "userinfo")
    assert_refused(fetcher.fetch(f"http://127.0.0.1:{port}@evil.test/png"), "host")


def test_long_urls_are_refused(fetcher: ImageFetcher, base: str) -> None:
    at_limit = f"{base}/png?" + "a" * (2048 - len(base) - 5)
    assert len(at_limit) == 2048
    assert fetcher.fetch(at_limit).reason is None
    assert_refused(fetcher.fetch(at_limit + "a"), "host", "2049 characters")


def test_wildcard_matches_subdomains_only(
    make: Make, fake_dns: dict[str, list[str]], port: int
) -> None:
    for name in ("a.example.com", "x.y.example.com", "example.com", "badexample.com"):
        fake_dns[name] = ["127.0.0.1"]
    with make((f"*.example.com:{port}", "127.0.0.1")) as f:
        assert f.fetch(f"http://a.example.com:{port}/png").reason is None
        assert f.fetch(f"http://X.Y.Example.COM:{port}/png").reason is None
        assert_refused(f.fetch(f"http://example.com:{port}/png"), "host")
        assert_refused(f.fetch(f"http://badexample.com:{port}/png"), "host")


# ---- ports -------------------------------------------------------------------------------------


def test_a_port_must_be_named_by_the_entry(
    make: Make, fake_dns: dict[str, list[str]], base: str, port: int
) -> None:
    fake_dns["a.test"] = fake_dns["x.w.test"] = ["127.0.0.1"]
    # no port in the entry: 80/443 only; the IP entry only opens the loopback address
    with make(("127.0.0.1", "a.test", "*.w.test")) as f:
        assert_refused(f.fetch(f"{base}/png"), "host", f"port {port} is not allowed")
        assert_refused(f.fetch(f"http://a.test:{port}/png"), "host", f"port {port} is not")
        assert_refused(f.fetch(f"http://x.w.test:{port}/png"), "host", f"port {port} is not")
    with make(("127.0.0.1", f"a.test:{port}", f"*.w.test:{port}")) as f:
        assert f.fetch(f"http://a.test:{port}/png").reason is None
        assert f.fetch(f"http://x.w.test:{port}/png").reason is None
        assert_refused(f.fetch(f"http://a.test:{port + 1}/png"), "host", "is not allowed")
        assert_refused(f.fetch("http://x.w.test/png"), "host", "port 80 is not allowed")
    # a bracketed IPv6 entry with a port: the check passes (nothing listens on ::1 here)
    with make((f"[::1]:{port}",)) as f:
        assert f.fetch(f"http://[::1]:{port}/png").reason in (None, "connect")
        assert_refused(f.fetch(f"http://[::1]:{port + 1}/png"), "host", "is not allowed")


def test_an_entry_without_a_port_allows_the_schemes_default_port(
    make: Make, fake_dns: dict[str, list[str]]
) -> None:
    """Checked without connecting (nothing listens on 80/443 here)."""
    fake_dns["a.test"] = ["127.0.0.1"]
    with make(("a.test", "127.0.0.1/32", "::1/128"), schemes=("http", "https")) as f:
        for url, port in [
            ("http://a.test/x.png", 80),
            ("https://a.test/x.png", 443),
            ("http://a.test:80/x.png", 80),
            ("http://127.0.0.1/x.png", 80),
            ("https://[::1]/x.png", 443),
        ]:
            assert f._check(url).port == port
        for url in ("http://a.test:443/", "https://a.test:80/", "http://127.0.0.1:443/"):
            assert_refused(f.fetch(url), "host", "is not allowed")


# ---- addresses ---------------------------------------------------------------------------------


def test_allowed_name_resolving_to_loopback_is_private(
    make: Make, state: ServerState, port: int
) -> None:
    with make((f"localhost:{port}",)) as f:
        assert_refused(f.fetch(f"http://localhost:{port}/png"), "private_address", "loopback")
    assert state.paths == []  # refused before connecting


def test_cidr_entry_opens_the_private_address_for_listed_names_only(
    make: Make, base: str, port: int
) -> None:
    with make((f"localhost:{port}", "127.0.0.0/8", "::1/128")) as f:
        result = f.fetch(f"http://localhost:{port}/png")
        assert result.reason is None and result.image is not None
    # a CIDR (even with the port listed for a name) never admits IP-literal URLs by itself ...
    with make((f"localhost:{port}", "127.0.0.0/8", "10.0.0.0/8", "fd00::/8")) as f:
        assert_refused(f.fetch(f"{base}/png"), "host", "a CIDR entry only opens")
        for url in ("http://127.0.0.1/png", "http://10.1.2.3/png", "http://[fd00::1]/png"):
            assert_refused(f.fetch(url), "host", "a CIDR entry only opens")
    # ... only an entry naming exactly that address does (a /32 one: on the default port)
    with make((f"127.0.0.1:{port}", "127.0.0.0/8")) as f:
        assert f.fetch(f"{base}/png").reason is None
    with make(("127.0.0.1/32",)) as f:
        assert_refused(f.fetch(f"{base}/png"), "host", f"port {port} is not allowed")


def test_every_resolved_address_is_checked(
    make: Make, fake_dns: dict[str, list[str]], port: int
) -> None:
    fake_dns["mixed.test"] = ["8.8.8.8", "169.254.169.254"]
    with make((f"mixed.test:{port}",), connect_timeout_s=0.5) as f:
        assert_refused(f.fetch(f"http://mixed.test:{port}/png"), "private_address", "169.254")


def test_ipv4_mapped_forms_are_checked(make: Make, port: int) -> None:
    real = socket.getaddrinfo

    def v6(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "mapped.test":
            return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::ffff:10.0.0.1", port, 0, 0))]
        if host == "sixtofour.test":  # 2002:a9fe:a9fe:: embeds 169.254.169.254
            return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("2002:a9fe:a9fe::1", port, 0, 0))]
        return real(host, port, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket, "getaddrinfo", v6)
        with make((f"mapped.test:{port}", f"sixtofour.test:{port}")) as f:
            assert_refused(f.fetch(f"http://mapped.test:{port}/"), "private_address", "10.0.0.1")
            assert_refused(f.fetch(f"http://sixtofour.test:{port}/"), "private_address", "embeds")
    with make() as f:  # the literal [::ffff:127.0.0.1] is 127.0.0.1, which is listed
        assert f.fetch(f"http://[::ffff:127.0.0.1]:{port}/png").reason is None


def test_connects_to_the_checked_address_with_the_original_host(
    make: Make,
    fake_dns: dict[str, list[str]],
    state: ServerState,
    port: int,
    monkeypatch: pytest.MonkeyPatch,
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
    with make((f"MinIO.storage.svc:{port}", "127.0.0.1/32"), connect_timeout_s=0.5) as f:
        result = f.fetch(f"http://Minio.Storage.Svc:{port}/png")
    assert result.reason is None, result
    assert calls == ["minio.storage.svc"]
    assert state.hosts == [f"minio.storage.svc:{port}"]


def test_connection_refused_and_dns_failure_are_connect(
    make: Make, fake_dns: dict[str, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    with make((f"127.0.0.1:{closed_port}", "nowhere.test")) as f:
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


def test_redirect_limit(make: Make, base: str) -> None:
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
        ("/to-port-80", "port 80 is not allowed for 127.0.0.1"),
    ],
)
def test_redirect_to_disallowed_target(
    fetcher: ImageFetcher, base: str, state: ServerState, path: str, why: str
) -> None:
    assert_refused(fetcher.fetch(f"{base}{path}"), "redirect", why)
    assert state.paths == [path]


def test_redirect_to_allowed_name_on_metadata_address(
    make: Make, fake_dns: dict[str, list[str]], local: tuple[str, ...], base: str
) -> None:
    fake_dns["metadata.test"] = ["169.254.169.254"]
    with make((*local, "metadata.test")) as f:
        assert_refused(f.fetch(f"{base}/to-metadata-name"), "redirect", "private_address")


# ---- timeouts, status, size --------------------------------------------------------------------


def test_read_timeout(make: Make, base: str) -> None:
    with make(read_timeout_s=0.5) as f:
        start = time.monotonic()
        assert_refused(f.fetch(f"{base}/sleep"), "timeout")
    assert time.monotonic() - start < 1.5


def test_trickling_server_hits_the_overall_deadline(make: Make, base: str) -> None:
    with make(read_timeout_s=1.0) as f:
        start = time.monotonic()
        result = f.fetch(f"{base}/trickle")
    assert_refused(result, "timeout")
    assert time.monotonic() - start < 1.5
    assert 0 < result.nbytes < len(PNG)


def test_trickled_headers_hit_the_overall_deadline(make: Make, base: str) -> None:
    """Per-read timeouts never fire while each header byte comes within 0.2 s: the watchdog
    shuts the socket down at the deadline."""
    with make(read_timeout_s=0.6) as f:
        start = time.monotonic()
        result = f.fetch(f"{base}/trickle-headers")
    elapsed = time.monotonic() - start
    assert_refused(result, "timeout", "deadline")
    assert 0.55 < elapsed < 1.1  # the server needs 3 s


def test_a_body_without_length_cut_at_the_deadline_is_a_timeout(make: Make, base: str) -> None:
    """Cut, a close-delimited body just ends: not a short image, nor a broken one."""
    with make(read_timeout_s=0.6) as f:
        start = time.monotonic()
        result = f.fetch(f"{base}/trickle-undeclared")
    assert_refused(result, "timeout", "truncated")
    assert time.monotonic() - start < 1.1
    assert 0 < result.nbytes < len(PNG)


@pytest.fixture
def tls_trickler() -> Iterator[int]:
    """A TCP server that answers a TLS ClientHello with a record header claiming 16 KiB, then
    sends that record a byte per 0.2 s: the handshake itself is trickled."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(4096)  # the ClientHello
            try:
                conn.sendall(b"\x16\x03\x03\x40\x00")
                for _ in range(20):  # 4 s
                    if stop.wait(0.2):
                        return
                    conn.sendall(b"\x02")
            except OSError:
                return  # the client hung up

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield int(listener.getsockname()[1])
    stop.set()
    listener.close()
    thread.join(5)


def test_a_trickled_tls_handshake_hits_the_overall_deadline(tls_trickler: int) -> None:
    port = tls_trickler
    with ImageFetcher(FetchPolicy(hosts=(f"127.0.0.1:{port}",), read_timeout_s=0.6)) as f:
        start = time.monotonic()
        result = f.fetch(f"https://127.0.0.1:{port}/png")
    assert_refused(result, "timeout", "deadline")
    assert time.monotonic() - start < 1.1  # the server needs 4 s


def test_stalled_read_ends_at_the_deadline_not_a_read_timeout_later(make: Make, base: str) -> None:
    with make(read_timeout_s=1.0) as f:
        start = time.monotonic()
        result = f.fetch(f"{base}/stall")
    assert_refused(result, "timeout")
    assert time.monotonic() - start < 1.5  # a plain 1 s read timeout after the byte: 1.8 s


def test_a_fetch_stuck_in_dns_does_not_hold_up_interpreter_exit() -> None:
    """The fetch threads are daemons and close() does not join them: ThreadPoolExecutor's
    would be joined at exit, and a resolver that hangs cannot be interrupted."""
    script = """
import socket, threading, time
from consumer.tagging.images import FetchPolicy, ImageFetcher
socket.getaddrinfo = lambda *a, **k: time.sleep(30)
fetcher = ImageFetcher(FetchPolicy(hosts=("stuck.test",), schemes=("http",)))
future = fetcher.submit("url", "http://stuck.test/x.png")  # the service's read-ahead path
time.sleep(0.2)
t0 = time.monotonic()
fetcher.close()  # as the service does at every exit: must not wait for the stuck lookup
assert time.monotonic() - t0 < 1.0, "close() waited for a fetch stuck in DNS"
"""
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, timeout=15, check=False)
    assert done.returncode == 0
    assert time.monotonic() - start < 5


def test_http_status(fetcher: ImageFetcher, base: str) -> None:
    assert_refused(fetcher.fetch(f"{base}/missing"), "http_status", "404")


def test_declared_oversize_is_refused_before_reading(make: Make, base: str) -> None:
    with make(max_bytes=100_000) as f:
        start = time.monotonic()
        assert_refused(f.fetch(f"{base}/big-declared"), "too_large", "content-length")
    assert time.monotonic() - start < 1.0  # the server holds the body back for 2 s


def test_undeclared_oversize_stops_at_the_cap(make: Make, base: str) -> None:
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


def test_pixel_limit_is_checked_before_decoding(make: Make, base: str) -> None:
    with make(max_pixels=32 * 24 - 1) as f:
        assert_refused(f.fetch(f"{base}/png"), "bomb", "768 pixels")
    with make(max_pixels=32 * 24) as f:
        assert f.fetch(f"{base}/png").reason is None


def test_decompression_bomb(fetcher: ImageFetcher, make: Make, base: str) -> None:
    start = time.monotonic()
    assert_refused(fetcher.fetch(f"{base}/bomb"), "bomb")  # 400 M pixels > 40 M
    assert time.monotonic() - start < 1.0
    max_before = Image.MAX_IMAGE_PIXELS
    # Past our own limit, Pillow's error and warning are bombs too (and its global is untouched)
    with make(max_pixels=10**9) as f:
        assert_refused(f.fetch(f"{base}/bomb"), "bomb", "decompression bomb")
        assert_refused(f.fetch(f"{base}/warn-bomb"), "bomb", "decompression bomb")
    assert max_before == Image.MAX_IMAGE_PIXELS


def test_extreme_aspect_ratios_are_bombs(fetcher: ImageFetcher, base: str) -> None:
    # 40000x1 = 40 k pixels passes any pixel limit, but a shortest-side resize to 224 would not
    assert_refused(fetcher.fetch(f"{base}/strip"), "bomb", "40000x1: aspect ratio")
    for size in ((21, 1), (1, 21), (420, 19)):
        assert_refused(fetcher.decode_b64(_b64("PNG", size)), "bomb", f"{size[0]}x{size[1]}")
    for size in ((20, 1), (1, 20), (400, 20)):
        assert fetcher.decode_b64(_b64("PNG", size)).reason is None, size


@pytest.mark.parametrize("size", [(0, 0), (7, 0)])
def test_an_empty_image_is_refused(
    fetcher: ImageFetcher, monkeypatch: pytest.MonkeyPatch, size: tuple[int, int]
) -> None:
    """Pillow's own plugins refuse a 0 side when opening; the check does not rely on that."""
    monkeypatch.setattr(Image, "open", lambda *a, **k: Image.new("RGB", size))
    assert_refused(fetcher.decode_b64(_b64("PNG", (4, 4))), "not_an_image", "empty")


def test_images_are_scaled_down_to_max_side(make: Make) -> None:
    with make() as f:  # default: 640
        wide = f.decode_b64(_b64("PNG", (1000, 500)))
        assert wide.image is not None and wide.image.size == (640, 320)
        small = f.decode_b64(_b64("PNG", (300, 200)))  # never scaled up
        assert small.image is not None and small.image.size == (300, 200)
    with make(max_side=100) as f:
        tall = f.decode_b64(_b64("PNG", (300, 900), "blue"))
        assert tall.image is not None and tall.image.size == (33, 100)
        assert tall.image.getpixel((16, 50)) == (0, 0, 255)


def test_jpeg_is_decoded_at_a_reduced_scale(make: Make, monkeypatch: pytest.MonkeyPatch) -> None:
    loaded: list[tuple[int, int]] = []
    real_load = JpegImagePlugin.JpegImageFile.load

    def spy(self: JpegImagePlugin.JpegImageFile) -> Any:
        loaded.append(self.size)
        return real_load(self)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", spy)
    with make(max_side=100) as f:
        result = f.decode_b64(_b64("JPEG", (2000, 1000), "green"))
    assert result.image is not None and result.image.size == (100, 50)
    assert loaded and loaded[0] == (250, 125)  # libjpeg's 1/8 scale, not 2000x1000 pixels


# ---- base64 ------------------------------------------------------------------------------------


def test_decode_b64(make: Make) -> None:
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


def test_b64_webp_and_transparency(make: Make) -> None:
    with make() as f:
        webp = f.decode_b64(_b64("WEBP", (10, 6)))
        assert webp.image is not None and webp.image.size == (10, 6)
        buf = io.BytesIO()
        Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(buf, "PNG")  # fully transparent red
        clear = f.decode_b64(base64.b64encode(buf.getvalue()).decode())
        assert clear.image is not None and clear.image.getpixel((0, 0)) == (255, 255, 255)


def test_junk_input_never_raises(make: Make) -> None:
    junk: list[Any] = [None, 42, "", "http://", "http://[::1", "http://127.0.0.1:99999/", "//x/"]
    with make() as f:
        for url in junk:
            result = f.fetch(url)
            assert result.image is None and result.reason in ("host", "scheme"), (url, result)
        assert f.decode_b64(None).reason == "bad_base64"  # type: ignore[arg-type]
        assert f.decode_b64("").reason == "not_an_image"


# ---- the pool ---------------------------------------------------------------------------------


def test_submitted_fetches_keep_their_results_and_bound_concurrency(
    local: tuple[str, ...], base: str, state: ServerState
) -> None:
    urls = [f"{base}/slow?i={i}" for i in range(9)] + [f"{base}/html"]
    with ImageFetcher(FetchPolicy(hosts=local, schemes=("http",)), concurrency=3) as f:
        futures = [f.submit("url", u) for u in urls] + [f.submit("b64", "%%%")]
        results = [fut.result(timeout=30) for fut in futures]
        assert all(t.daemon for t in threading.enumerate() if t.name.startswith("image-fetch"))
    sizes = [r.image.size if r.image else None for r in results]
    assert sizes == [(i + 1, 1) for i in range(9)] + [None, None]
    assert [r.reason for r in results[-2:]] == ["content_type", "bad_base64"]
    assert state.max_active == 3
    # close() does not join (a worker stuck in DNS must not hold a shutdown); idle workers
    # still stop at once
    deadline = time.monotonic() + 2.0
    while [t for t in threading.enumerate() if t.name.startswith("image-fetch_")]:
        assert time.monotonic() < deadline, "fetch workers still running after close()"
        time.sleep(0.01)


def test_closed_fetcher_refuses(make: Make, base: str) -> None:
    f = make()
    f.close()
    assert_refused(f.submit("url", f"{base}/png").result(timeout=5), "connect", "closed")


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
    hosts = (f"pinned.test:{port}", f"other.test:{port}", "127.0.0.1/32")
    with ImageFetcher(FetchPolicy(hosts=hosts)) as f:
        ok = f.fetch(f"https://pinned.test:{port}/png")
        assert ok.reason is None, ok
        assert Handler.state.hosts == [f"pinned.test:{port}"]
        assert_refused(f.fetch(f"https://other.test:{port}/png"), "connect", "doesn't match")
