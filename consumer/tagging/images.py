"""Fetch and decode the images of an upload (`cover_url`, `frame_urls`, `cover_b64`) safely.

The URLs come from users, so every fetch is a server-side request forgery risk: a URL (or a
redirect, or a DNS answer) could point the consumer at the cloud metadata service
(169.254.169.254), at an admin port on localhost, or at anything else inside the cluster. The
defaults are therefore closed:

* Nothing is fetched unless the URL's host **and port** are on the allow-list
  (`FetchPolicy.hosts`; empty means image fetching is off) and the scheme is allowed (https only
  by default). URLs with userinfo, and URLs over 2048 characters, are refused.
* An allow-list entry is a hostname (``cdn.example.com``), a ``*.`` wildcard
  (``*.cdn.example.com``, subdomains only), an IP address (``10.0.0.5``, ``fd00::1``) or a CIDR
  (``10.0.0.0/8``). A hostname, wildcard or IP entry may name a port: ``minio.svc:9000``,
  ``*.example.com:8443``, ``10.0.0.5:9000``, ``[fd00::1]:9000``; without one it allows only the
  scheme's default port (80 for http, 443 for https). A URL on any other port is refused.
* A hostname URL matches hostname and wildcard entries. An IP-literal URL
  (``http://10.0.0.5/x.png``) matches only an entry naming exactly that address: an IP entry, or
  a /32 (IPv4) or /128 (IPv6) CIDR, which allows the default ports only. A wider CIDR never admits
  IP-literal URLs; it only widens the addresses a listed hostname may resolve to (below).
* The fetcher resolves the name itself, checks **every** address it resolves to, and connects to
  the checked address (sending the original `Host` header and, for https, the original name for
  SNI and certificate checks), so a DNS answer that changes between check and connect cannot
  redirect the request.
* Private, loopback, link-local (incl. the metadata address), multicast, reserved, unspecified
  and otherwise non-global addresses, including their IPv4-mapped, 6to4, Teredo and NAT64 forms,
  are refused unless the address lies inside an IP or CIDR entry of the allow-list. **Listing a
  hostname alone never makes a private address reachable**: an in-cluster object store is listed
  by name, with its port unless that is 80/443, AND by its own address as a /32 (not the whole
  Service range), e.g. ``minio.storage.svc:9000,10.96.12.34/32``.
* Redirects are followed by hand (at most `max_redirects`), each target re-checked by all the
  rules above; one fetch, redirects included, gets `read_timeout_s` in all. urllib3's timeouts
  apply to each socket operation only, so a watchdog timer shuts the connection's socket down at
  that deadline: a server that trickles the TLS handshake, the status line, headers, chunk sizes
  or the body cannot hold a worker past it. There are no retries: the caller falls back to text.
* The body is capped at `max_bytes`, must carry an allowed image Content-Type (JPEG, PNG, WebP,
  GIF) and start with that format's magic number (a mislabelled image is refused), and its size
  is checked before Pillow, limited to that one decoder, decodes it: at most `max_pixels`, no
  side 0 and an aspect ratio of at most 20:1 (a 40000x1 strip is tiny on the wire but a
  shortest-side resize would blow it up). Only the first frame is kept; transparent areas come out
  white; the result is scaled down so that its longer side is at most `max_side` (JPEGs are
  decoded at a reduced scale already), so a batch holds small images only.

Every failure is a `Fetched` with `image=None` and one of `REASONS`, never an exception; the
caller counts them (the service: `tagstream_image_fetches_total`, consumer/tagging/image_stage.py).

DNS resolution (`socket.getaddrinfo`) cannot be interrupted, so it is bounded by the resolver's
own timeout (resolv.conf), not by `read_timeout_s`. The fetch threads are daemon threads, so a
fetch stuck there never holds up interpreter exit.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import http.client
import io
import ipaddress
import queue
import re
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final, NoReturn
from urllib.parse import quote, urljoin, urlsplit

import structlog
import urllib3
from PIL import Image
from urllib3.exceptions import (
    ConnectTimeoutError,
    NewConnectionError,
    ReadTimeoutError,
)

from tagsys.errors import TagstreamError

log = structlog.get_logger(__name__)

REASONS: tuple[str, ...] = (
    "scheme",
    "host",
    "private_address",
    "redirect",
    "timeout",
    "connect",
    "http_status",
    "too_large",
    "content_type",
    "not_an_image",
    "bomb",
    "bad_base64",
)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_SUPPORTED_SCHEMES: Final = frozenset({"http", "https"})
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
DECODE_SLOTS: Final = 2  # full-size decodes at once, per fetcher (memory, not network)
_REDIRECTS: Final = frozenset({301, 302, 303, 307, 308})
# Content-Type -> the Pillow format whose magic number the body must start with
_CONTENT_TYPES: Final = {
    "image/jpeg": "JPEG",
    "image/png": "PNG",
    "image/webp": "WEBP",
    "image/gif": "GIF",
}
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
_BRACKETED = re.compile(r"\[([^\[\]]+)\](?::([^:]*))?")
_PORT = re.compile(r"[0-9]{1,5}")
_MAX_URL: Final = 2048
_MAX_ASPECT: Final = 20  # longer side : shorter side
_MIN_SIDE_LIMIT: Final = 32  # max_side below this could round a 20:1 image's short side to 0
_CHUNK = 64 * 1024
_NAT64 = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))
_HEADERS: Final = {
    "User-Agent": "tagstream-image-fetcher",
    "Accept": ", ".join(_CONTENT_TYPES),
    # no gzip: the byte cap must apply to what we hold in memory, not to the wire size
    "Accept-Encoding": "identity",
}
# warnings.catch_warnings swaps process-global state; two threads interleaving in it can leave
# the "error" filter installed for good. Image.open (header parsing only, cheap) is where
# Pillow warns about bombs, so it runs under this lock.
_OPEN_LOCK = threading.Lock()


@dataclass(frozen=True)
class FetchPolicy:
    """What may be fetched and how much of it; the defaults fetch nothing (empty allow-list)."""

    hosts: tuple[str, ...] = ()  # allow-list; empty = image fetching off
    schemes: tuple[str, ...] = ("https",)
    connect_timeout_s: float = 2.0
    read_timeout_s: float = 5.0  # also the total budget of one fetch incl. redirects
    max_bytes: int = 5_000_000
    max_pixels: int = 40_000_000  # decompression-bomb limit (width*height)
    max_redirects: int = 3
    max_side: int = 640  # decoded images are scaled down to this longer side

    def __post_init__(self) -> None:
        # Validated here too, so a policy built in code cannot bypass parse_hosts.
        object.__setattr__(self, "hosts", tuple(_normalize_entry(h) for h in self.hosts))
        schemes = tuple(s.strip().lower() for s in self.schemes)
        if bad := [s for s in schemes if s not in _SUPPORTED_SCHEMES]:
            raise TagstreamError(f"image fetch: unsupported scheme(s) {bad}; use http and/or https")
        object.__setattr__(self, "schemes", schemes)
        for name in ("connect_timeout_s", "read_timeout_s", "max_bytes", "max_pixels"):
            if not getattr(self, name) > 0:
                raise TagstreamError(f"image fetch: {name} must be > 0, got {getattr(self, name)}")
        if self.max_redirects < 0:
            raise TagstreamError(
                f"image fetch: max_redirects must be >= 0, got {self.max_redirects}"
            )
        if self.max_side < _MIN_SIDE_LIMIT:
            raise TagstreamError(
                f"image fetch: max_side must be >= {_MIN_SIDE_LIMIT}, got {self.max_side}"
            )

    @classmethod
    def parse_hosts(cls, spec: str) -> tuple[str, ...]:
        """Parse a comma-separated allow-list
        ("a.com,*.cdn.net,minio.svc:9000,10.0.0.5:9000,[fd00::1]:9000,10.96.0.7/32").

        Raises TagstreamError on an entry that is not a hostname, `*.` wildcard or IP (each with
        an optional port) or a CIDR, so a typo fails at start instead of silently blocking (or
        allowing) images.
        """
        return tuple(_normalize_entry(p) for p in spec.split(",") if p.strip())

    @property
    def enabled(self) -> bool:
        """False when the allow-list is empty: image fetching is off."""
        return bool(self.hosts)


@dataclass
class Fetched:
    """The outcome of one fetch or decode: an RGB image, or the reason there is none."""

    image: Image.Image | None  # decoded, converted to RGB, fully loaded, at most max_side
    reason: str | None  # one of REASONS when image is None
    detail: str = ""  # human-readable, for logs
    nbytes: int = 0
    # the URL as checked and fetched (ASCII host, after redirects): what may be passed on
    url: str = ""
    # a failure that fetching again will not mend (refused, malformed, 4xx): the item's own
    # fault, where a timeout, a refused connection or a 5xx is the store's
    permanent: bool = False

    @property
    def transient(self) -> bool:
        return self.image is None and not self.permanent


class _Refused(Exception):
    """Internal: ends a fetch with a reason; turned into a Fetched at the top."""

    def __init__(self, reason: str, detail: str, nbytes: int = 0, status: int = 0) -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail
        self.nbytes = nbytes
        self.status = status

    @property
    def permanent(self) -> bool:
        if self.reason in ("timeout", "connect"):
            return False
        if self.reason == "http_status":  # 4xx but a timeout or rate limit: the item's
            return 400 <= self.status < 500 and self.status not in (408, 425, 429)
        return True


def _refuse(reason: str, detail: str, nbytes: int = 0) -> NoReturn:
    raise _Refused(reason, detail, nbytes)


def _is_hostname(name: str) -> bool:
    return len(name) <= 253 and all(_LABEL.fullmatch(label) for label in name.split("."))


@dataclass(frozen=True)
class _Entry:
    """One parsed allow-list entry."""

    kind: str  # "name", "suffix" (a wildcard, stored as ".example.com"), "ip" or "net"
    name: str = ""  # name / suffix
    ip: IPAddress | None = None
    net: IPNetwork | None = None
    port: int | None = None  # None: the scheme's default port

    def __str__(self) -> str:
        port = "" if self.port is None else f":{self.port}"
        if self.kind == "name":
            return self.name + port
        if self.kind == "suffix":
            return "*" + self.name + port
        if self.kind == "net":
            return str(self.net)
        if isinstance(self.ip, ipaddress.IPv6Address) and self.port is not None:
            return f"[{self.ip}]{port}"
        return f"{self.ip}{port}"


def _parse_entry(entry: str) -> _Entry:
    """One allow-list entry, lower-cased and checked; TagstreamError when it is none of the
    kinds the module docstring lists."""

    def bad(why: str = "") -> NoReturn:
        raise TagstreamError(
            f"image fetch allow-list: bad entry {entry!r}{why}; expected a hostname, "
            "'*.domain.tld' or an IP address (each optionally ':port'; an IPv6 address with a "
            "port as '[addr]:port'), or a CIDR"
        )

    e = entry.strip().lower()
    if "/" in e:
        if ":" in e.rpartition("/")[2]:
            bad(" (a CIDR takes no port)")
        try:
            return _Entry("net", net=ipaddress.ip_network(e, strict=True))
        except ValueError as exc:
            raise TagstreamError(f"image fetch allow-list: bad CIDR {entry!r}: {exc}") from None
    try:  # a bare IP, IPv6 included (its colons are not a port)
        return _Entry("ip", ip=_canonical(ipaddress.ip_address(e)))
    except ValueError:
        pass
    port_text: str | None = None
    if e.startswith("["):
        m = _BRACKETED.fullmatch(e)
        if m is None:
            bad()
        try:
            ip = ipaddress.ip_address(m[1])
        except ValueError:
            bad(" (only an IPv6 address goes in brackets)")
        if not isinstance(ip, ipaddress.IPv6Address):
            bad(" (only an IPv6 address goes in brackets)")
        return _Entry("ip", ip=_canonical(ip), port=_entry_port(m[2], bad))
    if ":" in e:
        e, _, port_text = e.rpartition(":")
        if ":" in e:
            bad(" (write an IPv6 address with a port as '[addr]:port')")
    port = _entry_port(port_text, bad)
    try:
        return _Entry("ip", ip=_canonical(ipaddress.ip_address(e)), port=port)
    except ValueError:
        pass
    e = e.removesuffix(".")
    if e.startswith("*."):
        suffix = e[2:]
        if "." in suffix and _is_hostname(suffix):  # "*.com" would open a whole TLD
            return _Entry("suffix", name=e[1:], port=port)
    elif _is_hostname(e) and not e.replace(".", "").isdigit():
        return _Entry("name", name=e, port=port)
    bad()


def _entry_port(text: str | None, bad: Callable[[str], NoReturn]) -> int | None:
    if text is None:
        return None
    if not _PORT.fullmatch(text) or not 1 <= int(text) <= 65535:
        bad(" (the port must be 1-65535)")
    return int(text)


def _normalize_entry(entry: str) -> str:
    return str(_parse_entry(entry))


def _canonical(ip: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address is the IPv4 address (for matching, checks and connecting)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _non_public(ip: IPAddress) -> str | None:
    """Why `ip` must not be reached from user input, or None when it is a public address."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded: list[ipaddress.IPv4Address] = []
        if ip.ipv4_mapped is not None:
            embedded.append(ip.ipv4_mapped)
        if ip.sixtofour is not None:
            embedded.append(ip.sixtofour)
        if ip.teredo is not None:
            embedded.extend(ip.teredo)
        if any(ip in net for net in _NAT64):
            embedded.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        for v4 in embedded:
            if why := _non_public(v4):
                return f"embeds {v4} ({why})"
    for why, flag in (
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("unspecified", ip.is_unspecified),
        ("multicast", ip.is_multicast),
        ("reserved", ip.is_reserved),
        ("private", ip.is_private),
        ("not global", not ip.is_global),
    ):
        if flag:
            return why
    return None


class _AllowList:
    """The parsed allow-list: which (host, port) pairs a URL may name, and which non-public
    addresses a listed hostname may resolve to."""

    def __init__(self, entries: tuple[str, ...]) -> None:
        parsed = [_parse_entry(e) for e in entries]
        self.names: tuple[_Entry, ...] = tuple(e for e in parsed if e.kind in ("name", "suffix"))
        # IP-literal URLs: IP entries and single-address CIDRs (default ports only)
        self.ips: tuple[tuple[IPAddress, int | None], ...] = tuple(
            (e.ip, e.port) for e in parsed if e.ip is not None
        ) + tuple(
            (e.net.network_address, None)
            for e in parsed
            if e.net is not None and e.net.prefixlen == e.net.max_prefixlen
        )
        # the private-address exemption: every IP and CIDR entry, whatever its port
        self.networks: tuple[IPNetwork, ...] = tuple(
            e.net for e in parsed if e.net is not None
        ) + tuple(ipaddress.ip_network(e.ip) for e in parsed if e.ip is not None)

    def check_name(self, host: str, port: int, scheme: str) -> str | None:
        """Why a hostname URL on `port` is not allowed, or None when it is."""
        ports = [
            e.port
            for e in self.names
            if (e.kind == "name" and host == e.name)
            or (e.kind == "suffix" and host.endswith(e.name))
        ]
        return _check_port(host, ports, port, scheme)

    def check_ip(self, ip: IPAddress, port: int, scheme: str) -> str | None:
        """Why an IP-literal URL on `port` is not allowed, or None when it is."""
        why = _check_port(str(ip), [p for a, p in self.ips if a == ip], port, scheme)
        if why is not None and self.covers(ip) and not any(a == ip for a, _ in self.ips):
            why += " (a CIDR entry only opens addresses that listed names resolve to)"
        return why

    def covers(self, ip: IPAddress) -> bool:
        return any(ip in net for net in self.networks)


def _check_port(host: str, ports: list[int | None], port: int, scheme: str) -> str | None:
    """`ports`: those of the entries matching `host` (None: the scheme's default)."""
    if not ports:
        return f"{host} is not on the allow-list"
    if any((_DEFAULT_PORTS[scheme] if p is None else p) == port for p in ports):
        return None
    return f"port {port} is not allowed for {host} (no allow-list entry for it names that port)"


@dataclass(frozen=True)
class _Target:
    """A checked URL: where to connect and what to send."""

    url: str
    scheme: str
    host: str  # lower-case ASCII name or IP literal (no brackets)
    port: int
    path: str  # request target, e.g. "/a/b.png?x=1"
    host_header: str
    is_ip: bool
    addresses: tuple[IPAddress, ...]  # every one checked; tried in order

    @property
    def canonical(self) -> str:
        """The URL rebuilt from what was checked: the ASCII host an IDNA-aware endpoint would
        otherwise read differently (ß, joiners, full-width forms)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = "" if self.port == _DEFAULT_PORTS[self.scheme] else f":{self.port}"
        return f"{self.scheme}://{host}{port}{self.path}"


def _sniff(head: bytes) -> str | None:
    """The image format the magic number announces, if it is one we decode."""
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"GIF8"):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return None


class _Watchdog:
    """Ends one fetch at its deadline by shutting its socket down.

    urllib3's timeouts bound each socket operation, not the whole exchange: a server that sends
    the TLS handshake, the status line, the headers or the chunk-size lines a byte at a time,
    each just inside the timeout, would hold the thread for as long as it likes. The timer is
    armed when the first connection's socket exists (before the TLS handshake) and every later
    connection of the fetch (redirects) replaces the socket it watches. It keeps a `dup` of the
    socket: shutting that down ends the connection for every descriptor, also once the TLS layer
    has taken the original over, and the duplicate cannot be closed and its number reused behind
    the timer's back.
    """

    def __init__(self, deadline: float) -> None:
        self._deadline = deadline
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._timer: threading.Timer | None = None
        self._done = False
        self.fired = False

    def attach(self, sock: socket.socket) -> None:
        dup = sock.dup()  # OSError (out of descriptors): the caller fails the connection
        with self._lock:
            if self._done:
                dup.close()
                return
            self._close_sock()
            self._sock = dup
            if self.fired:
                self._shutdown()
            elif self._timer is None:
                delay = max(0.0, self._deadline - time.monotonic())
                self._timer = threading.Timer(delay, self._fire)
                self._timer.name = "image-fetch-watchdog"
                self._timer.daemon = True
                self._timer.start()

    def cancel(self) -> None:
        """The fetch is over (however it ended): stop the timer, drop the duplicate socket."""
        with self._lock:
            self._done = True
            timer, self._timer = self._timer, None
            self._close_sock()
        if timer is not None:
            timer.cancel()

    def _fire(self) -> None:
        with self._lock:
            if self._done:
                return
            self.fired = True
            self._shutdown()

    def _shutdown(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):  # already closed by the peer
                self._sock.shutdown(socket.SHUT_RDWR)

    def _close_sock(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class _DaemonPool:
    """A bounded pool of daemon threads, started as needed, up to `size`.

    Not `ThreadPoolExecutor`: its workers are joined at interpreter exit, so one fetch stuck in
    name resolution (which no timeout of ours can interrupt) would hold up the process's exit.
    """

    def __init__(self, size: int, name: str) -> None:
        self._size = size
        self._name = name
        self._queue: queue.SimpleQueue[tuple[Future[Fetched], Callable[[], Fetched]] | None] = (
            queue.SimpleQueue()
        )
        self._idle = threading.Semaphore(0)
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._shutdown = False

    def submit(self, fn: Callable[[], Fetched]) -> Future[Fetched]:
        fut: Future[Fetched] = Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new work after shutdown")
            self._queue.put((fut, fn))
            if not self._idle.acquire(blocking=False) and len(self._threads) < self._size:
                thread = threading.Thread(
                    target=self._work, name=f"{self._name}_{len(self._threads)}", daemon=True
                )
                thread.start()
                self._threads.append(thread)
        return fut

    def shutdown(self) -> None:
        """Cancel what is queued and let the threads stop after their running calls."""
        with self._lock:
            self._shutdown = True
            threads = list(self._threads)
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[0].cancel()
        for _ in threads:
            self._queue.put(None)
        # not joined: a worker stuck in name resolution (no timeout of ours reaches it) must
        # not hold up a shutdown; the threads are daemons, and each running call ends by its
        # own deadline

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fut, fn = item
            del item
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as exc:  # handed to the caller, as an executor would
                    fut.set_exception(exc)
            del fut, fn
            self._idle.release()


class ImageFetcher:
    """Fetches user-supplied image URLs under a `FetchPolicy`; thread-safe.

    `submit` runs on one bounded pool of `concurrency` daemon threads owned by the fetcher.
    Each request gets its own urllib3 connection pool pinned to the checked IP (a shared
    PoolManager would resolve names again by itself), closed as soon as the response is read.
    """

    def __init__(
        self,
        policy: FetchPolicy,
        *,
        concurrency: int = 8,
    ) -> None:
        if concurrency < 1:
            raise TagstreamError(f"image fetch: concurrency must be >= 1, got {concurrency}")
        self.policy = policy
        self.concurrency = concurrency
        self._allow = _AllowList(policy.hosts)
        self._pool = _DaemonPool(concurrency, "image-fetch")
        self._decode_slots = threading.BoundedSemaphore(DECODE_SLOTS)
        self._closed = False

    # ---- public API -------------------------------------------------------------------------

    def fetch(self, url: str) -> Fetched:
        """Fetch, check and decode one URL; never raises for anything the URL or content does."""
        try:
            if self._closed:
                _refuse("connect", "the image fetcher is closed")
            image, nbytes, final = self._fetch(url)
            result = Fetched(image, None, nbytes=nbytes, url=final)
        except _Refused as r:
            result = Fetched(None, r.reason, r.detail, r.nbytes, permanent=r.permanent)
        return result

    def decode_b64(self, data: str) -> Fetched:
        """Decode an inline base64 image (`cover_b64`) with the same size, magic and bomb checks.

        Works even when URL fetching is off: no network is involved.
        """
        try:
            image, nbytes = self._decode_b64(data)
            result = Fetched(image, None, nbytes=nbytes)
        except _Refused as r:
            result = Fetched(None, r.reason, r.detail, r.nbytes, permanent=True)
        return result

    def submit(self, kind: str, data: str) -> Future[Fetched]:
        """One fetch (`kind` "url") or inline decode ("b64") on the fetcher's bounded daemon
        pool, to wait for later (the service's read-ahead); its future never raises."""
        call = functools.partial(self.decode_b64 if kind == "b64" else self.fetch, data)
        if self._closed:
            return _done(call())
        try:
            return self._pool.submit(call)
        except RuntimeError:  # closed concurrently
            return _done(call())

    def close(self) -> None:
        """Stop the worker threads (queued fetches are cancelled, running ones finish, each
        within its deadline)."""
        self._closed = True
        self._pool.shutdown()

    def __enter__(self) -> ImageFetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- URL checks -------------------------------------------------------------------------

    def _check(self, url: str) -> _Target:
        """Apply scheme, userinfo, allow-list and address rules to `url`; resolve its name."""
        if not self.policy.enabled:
            _refuse("host", "image fetching is off (empty allow-list)")
        if not isinstance(url, str):  # events are JSON: a null or number must not crash us
            _refuse("host", f"not a URL: {type(url).__name__}")
        if len(url) > _MAX_URL:
            _refuse("host", f"URL of {len(url)} characters, over {_MAX_URL}")
        url = url.strip()
        # urlsplit silently drops tabs and newlines; a URL carrying them is not one we trust
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in url):
            _refuse("host", "malformed URL: control characters")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            _refuse("host", f"malformed URL: {exc}")
        scheme = parts.scheme.lower()
        if scheme not in self.policy.schemes:
            _refuse("scheme", f"scheme {scheme or '(none)'!r} not in {list(self.policy.schemes)}")
        if "@" in parts.netloc:
            _refuse("host", "credentials (userinfo) in the URL are refused")
        if "\\" in parts.netloc or "%" in parts.netloc:
            _refuse("host", f"malformed host {parts.netloc!r}")
        raw_host = (parts.hostname or "").removesuffix(".")
        if not raw_host:
            _refuse("host", "no host in the URL")
        if port is None:
            port = _DEFAULT_PORTS[scheme]
        elif port == 0:
            _refuse("host", "port 0")

        ip: IPAddress | None
        try:
            ip = _canonical(ipaddress.ip_address(raw_host))
        except ValueError:
            ip = None
        if ip is not None:
            host = str(ip)
            if (why := self._allow.check_ip(ip, port, scheme)) is not None:
                _refuse("host", why)
            addresses: tuple[IPAddress, ...] = (ip,)
        else:
            try:
                host = raw_host.encode("idna").decode("ascii").lower()
            except UnicodeError:
                _refuse("host", f"bad host name {raw_host!r}")
            if not _is_hostname(host):
                _refuse("host", f"bad host name {raw_host!r}")
            if (why := self._allow.check_name(host, port, scheme)) is not None:
                _refuse("host", why)
            addresses = self._resolve(host, port)

        for addr in addresses:
            why = _non_public(addr)
            if why is not None and not self._allow.covers(addr):
                _refuse(
                    "private_address",
                    f"{host} -> {addr} is {why}; only IP/CIDR allow-list entries open such "
                    "addresses",
                )

        bracketed = f"[{host}]" if isinstance(ip, ipaddress.IPv6Address) else host
        host_header = bracketed if port == _DEFAULT_PORTS[scheme] else f"{bracketed}:{port}"
        # percent-encode what a client would (spaces, non-ASCII); keep existing escapes as they are
        path = quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
        if parts.query:
            path += "?" + quote(parts.query, safe="/%:@!$&'()*+,;=-._~?")
        return _Target(url, scheme, host, port, path, host_header, ip is not None, addresses)

    @staticmethod
    def _resolve(host: str, port: int) -> tuple[IPAddress, ...]:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            _refuse("connect", f"cannot resolve {host}: {exc}")
        addresses: list[IPAddress] = []
        for info in infos:
            addr = _canonical(ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]))
            if addr not in addresses:
                addresses.append(addr)
        if not addresses:
            _refuse("connect", f"{host} resolves to no address")
        return tuple(addresses)

    # ---- the fetch --------------------------------------------------------------------------

    def _fetch(self, url: str) -> tuple[Image.Image, int, str]:
        deadline = time.monotonic() + self.policy.read_timeout_s
        watchdog = _Watchdog(deadline)
        cut = f"cut at the {self.policy.read_timeout_s}s deadline"
        try:
            data, declared, final = self._download(url, deadline, watchdog)
        except _Refused as r:
            watchdog.cancel()  # from here on `fired` is final
            # a cut connection surfaces as whatever the half-read exchange looked like
            if watchdog.fired and r.reason != "timeout":
                _refuse("timeout", f"{cut} ({r.reason}: {r.detail})", r.nbytes)
            raise
        finally:
            watchdog.cancel()
        if watchdog.fired:  # a body without Content-Length just ends where it was cut
            _refuse("timeout", f"{cut}; the body may be truncated", len(data))
        return self._decode(data, declared), len(data), final

    def _download(self, url: str, deadline: float, watchdog: _Watchdog) -> tuple[bytes, str, str]:
        """The body of `url` (redirects followed), the format its Content-Type declares, and
        the URL it came from as checked (ASCII host)."""
        target = self._check(url)
        hops = 0
        while True:
            with self._request(target, deadline, watchdog) as resp:
                if resp.status in _REDIRECTS and resp.headers.get("Location"):
                    hops += 1
                    location = urljoin(target.url, resp.headers["Location"])
                    if hops > self.policy.max_redirects:
                        _refuse("redirect", f"more than {self.policy.max_redirects} redirects")
                    try:
                        target = self._check(location)
                    except _Refused as r:
                        _refuse(
                            "redirect", f"redirect to {location} refused: {r.reason}: {r.detail}"
                        )
                    continue
                if not 200 <= resp.status < 300:
                    raise _Refused(
                        "http_status", f"HTTP {resp.status} from {target.url}", status=resp.status
                    )
                declared = self._check_headers(resp)
                return self._read_body(resp, deadline), declared, target.canonical

    @contextmanager
    def _request(
        self, target: _Target, deadline: float, watchdog: _Watchdog
    ) -> Iterator[urllib3.BaseHTTPResponse]:
        """GET `target` from one of its checked addresses; the pool dies with the response."""
        last: _Refused | None = None
        for addr in target.addresses:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                _refuse("timeout", f"no time left for {target.url}")
            pool = self._pool_for(target, addr, watchdog)
            try:
                try:
                    resp = pool.urlopen(
                        "GET",
                        target.path,
                        headers={**_HEADERS, "Host": target.host_header},
                        retries=False,
                        redirect=False,
                        preload_content=False,
                        decode_content=False,
                        assert_same_host=False,
                        timeout=urllib3.Timeout(
                            total=remaining,
                            connect=min(self.policy.connect_timeout_s, remaining),
                            read=self.policy.read_timeout_s,
                        ),
                    )
                except NewConnectionError as exc:  # refused, unreachable: try the next address
                    last = _Refused("connect", f"{target.host} ({addr}): {_cause(exc)}")
                    continue
                except ConnectTimeoutError as exc:
                    last = _Refused("timeout", f"connect to {target.host} ({addr}): {_cause(exc)}")
                    continue
                except _NETWORK_ERRORS as exc:
                    _network_failure(target.url, exc)
                try:
                    yield resp
                except _NETWORK_ERRORS as exc:
                    _network_failure(target.url, exc)
                finally:
                    resp.close()  # never reuse a half-read connection
            finally:
                pool.close()
            return
        assert last is not None
        raise last

    def _pool_for(
        self, target: _Target, addr: IPAddress, watchdog: _Watchdog
    ) -> urllib3.HTTPConnectionPool:
        """A one-connection pool that connects to `addr` (already checked), never re-resolving;
        its connection hands its socket to `watchdog` as soon as it exists."""
        if target.scheme == "http":
            return _HTTPPool(
                str(addr), target.port, maxsize=1, block=False, retries=False, watchdog=watchdog
            )
        # The certificate is checked against the URL's name (or IP literal), not `addr`.
        name = None if target.is_ip else target.host
        return _HTTPSPool(
            str(addr),
            target.port,
            maxsize=1,
            block=False,
            retries=False,
            server_hostname=name,
            assert_hostname=target.host,
            watchdog=watchdog,
        )

    def _check_headers(self, resp: urllib3.BaseHTTPResponse) -> str:
        """The Pillow format the Content-Type declares; refuses other types and a
        Content-Length over the cap before any of the body is read."""
        ctype = (resp.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        fmt = _CONTENT_TYPES.get(ctype)
        if fmt is None:
            _refuse("content_type", f"Content-Type {ctype or '(none)'!r} is not an allowed image")
        length = resp.headers.get("Content-Length")
        if length is not None and length.strip().isdigit() and int(length) > self.policy.max_bytes:
            _refuse("too_large", f"Content-Length {length} > {self.policy.max_bytes}")
        return fmt

    def _read_body(self, resp: urllib3.BaseHTTPResponse, deadline: float) -> bytes:
        """Read at most max_bytes; the watchdog ends a read that runs into the deadline."""
        cap = self.policy.max_bytes
        buf = bytearray()
        while True:
            if time.monotonic() >= deadline:
                _refuse("timeout", f"body not read within {self.policy.read_timeout_s}s", len(buf))
            try:
                chunk = resp.read1(min(_CHUNK, cap + 1 - len(buf)))
            except ReadTimeoutError:
                _refuse("timeout", f"body stalled after {len(buf)} bytes", len(buf))
            except _NETWORK_ERRORS as exc:  # e.g. the watchdog cut it: keep the byte count
                _network_failure(f"body after {len(buf)} bytes", exc, len(buf))
            if not chunk:
                return bytes(buf)
            buf += chunk
            if len(buf) > cap:
                _refuse("too_large", f"body over {cap} bytes", len(buf))

    # ---- decoding ---------------------------------------------------------------------------

    def _decode_b64(self, data: str) -> tuple[Image.Image, int]:
        cap = self.policy.max_bytes
        if not isinstance(data, str | bytes):  # events are JSON: a null or number must not crash us
            _refuse("bad_base64", f"not a base64 string: {type(data).__name__}")
        data = data.strip()
        if len(data) > 4 * cap // 3 + 4:
            _refuse("too_large", f"base64 of {len(data)} chars encodes more than {cap} bytes")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as exc:
            _refuse("bad_base64", f"not strict base64: {exc}")
        if len(raw) > cap:
            _refuse("too_large", f"{len(raw)} bytes > {cap}", len(raw))
        return self._decode(raw, None), len(raw)

    def _decode(self, data: bytes, declared: str | None) -> Image.Image:
        """`_decode_one`, at most DECODE_SLOTS at a time: a PNG is decoded at full size before
        it is shrunk (up to max_pixels x 4 bytes, twice over while converting), so eight at
        once could take gigabytes; two bound what a batch of hostile images can take."""
        with self._decode_slots:
            return self._decode_one(data, declared)

    def _decode_one(self, data: bytes, declared: str | None) -> Image.Image:
        """Magic number, size limits before decoding, a full decode to RGB, then a downscale.

        `declared` is the format the Content-Type named (None for base64): the bytes must be
        that format, and Pillow may only use that one decoder.
        """
        fmt = _sniff(data[:16])
        if fmt is None:
            _refuse("not_an_image", f"no image magic number (starts {data[:8]!r})", len(data))
        if declared is not None and fmt != declared:
            _refuse("not_an_image", f"Content-Type says {declared}, the bytes are {fmt}", len(data))
        side = self.policy.max_side
        try:
            with _OPEN_LOCK, warnings.catch_warnings():
                # Pillow only warns between 1x and 2x Image.MAX_IMAGE_PIXELS; make it an error
                # without touching that global. The explicit check below is the real limit.
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                im = Image.open(io.BytesIO(data), formats=[fmt])
            with im:
                width, height = im.size
                self._check_size(width, height, len(data))
                im.seek(0)  # only the first frame of a GIF/animated WebP
                if fmt == "JPEG":  # let libjpeg decode at 1/2, 1/4 or 1/8 scale where it can
                    im.draft("RGB", (side, side))
                rgb = _to_rgb(im)
            rgb.thumbnail((side, side), Image.Resampling.BICUBIC)
            return rgb
        except _Refused:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            _refuse("bomb", str(exc), len(data))
        except Exception as exc:  # Pillow raises many types for broken files
            _refuse("not_an_image", f"{fmt} decode failed: {type(exc).__name__}: {exc}", len(data))

    def _check_size(self, width: int, height: int, nbytes: int) -> None:
        """The declared size, before any pixel is decoded."""
        if width < 1 or height < 1:
            _refuse("not_an_image", f"{width}x{height}: an empty image", nbytes)
        if max(width, height) > _MAX_ASPECT * min(width, height):
            # a 40000x1 strip passes any pixel limit, but scaling its short side up (as a
            # model's preprocessing does) would allocate billions of pixels
            _refuse("bomb", f"{width}x{height}: aspect ratio over {_MAX_ASPECT}:1", nbytes)
        if width * height > self.policy.max_pixels:
            _refuse(
                "bomb",
                f"{width}x{height} = {width * height} pixels > {self.policy.max_pixels}",
                nbytes,
            )


class _HTTPConnection(urllib3.connection.HTTPConnection):
    """Hands its socket to the fetch's watchdog as soon as it exists."""

    def __init__(self, *args: Any, watchdog: _Watchdog | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._watchdog = watchdog

    def _new_conn(self) -> socket.socket:
        return _watched(super()._new_conn(), self._watchdog)


class _HTTPSConnection(urllib3.connection.HTTPSConnection):
    """`_HTTPConnection` for TLS: the watchdog gets the plain socket before the handshake."""

    def __init__(self, *args: Any, watchdog: _Watchdog | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._watchdog = watchdog

    def _new_conn(self) -> socket.socket:
        return _watched(super()._new_conn(), self._watchdog)


def _watched(sock: socket.socket, watchdog: _Watchdog | None) -> socket.socket:
    if watchdog is not None:
        try:
            watchdog.attach(sock)
        except OSError:
            sock.close()
            raise
    return sock


class _HTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


_NETWORK_ERRORS = (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError)


def _network_failure(url: str, exc: BaseException, nbytes: int = 0) -> NoReturn:
    """Map a urllib3/socket error to `timeout` or `connect`."""
    if isinstance(exc, ReadTimeoutError | ConnectTimeoutError | TimeoutError) and not isinstance(
        exc, NewConnectionError
    ):
        _refuse("timeout", f"{url}: {_cause(exc)}", nbytes)
    _refuse("connect", f"{url}: {_cause(exc)}", nbytes)


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB, with transparent areas on white (as a page shows them) rather than whatever
    colour hides under alpha 0."""
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        rgb = Image.new("RGB", rgba.size, (255, 255, 255))
        rgb.paste(rgba, mask=rgba.getchannel("A"))
        return rgb
    rgb = im.convert("RGB")
    rgb.load()
    return rgb


def _cause(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _done(result: Fetched) -> Future[Fetched]:
    fut: Future[Fetched] = Future()
    fut.set_result(result)
    return fut
