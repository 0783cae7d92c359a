"""Fetching a remote image for `seechat serve --allow-remote-images`, as a server that strangers drive must.

- http:// and https:// only; a redirect is refused (the client is told to send the final URL), so no hop can
  lead to another scheme or host.
- The host is resolved once; the address is refused when it is loopback, private, link-local, multicast,
  reserved or otherwise not global (unless `allow_private`), and the connection goes to that very address
  (no second lookup a rebinding DNS server could answer differently). https still checks the certificate
  against the host name.
- No proxy from the environment (http.client never reads *_proxy variables).
- One deadline for the whole fetch (connect, headers, body): a timer shuts the socket when it passes, so a
  server that drips bytes cannot hold the request. At most `max_bytes` are read.
- Errors say what the client can change, never the network failure itself (that would make the server a
  port scanner's oracle); the details go to the server's log.

The standard library's http.client is used rather than urllib or httpx because both hide the connection:
they resolve the host themselves, follow redirects or read proxy variables.
"""

from __future__ import annotations

import http.client
import ipaddress
import logging
import socket
import ssl
import threading
import time
import urllib.parse

log = logging.getLogger("seechat")

CHUNK = 64 * 1024


class FetchRefused(Exception):
    """The URL is not fetched or its answer not accepted; `str()` is safe to show to the client."""

    def __init__(self, message: str, code: str = "image_fetch_failed", status: int = 400):
        super().__init__(message)
        self.code, self.status = code, status


def fetch(url: str, *, max_bytes: int, timeout: float, allow_private: bool = False) -> bytes:
    """The body behind an http(s) URL under the rules above; raises FetchRefused."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise FetchRefused("remote image URLs must be http:// or https:// URLs with a host", "invalid_image_url")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise FetchRefused("the image URL's port is not valid", "invalid_image_url") from None
    address = _resolve(parts.hostname, port)
    if not allow_private and not _is_public(address):
        raise FetchRefused("the image URL names a loopback, private, link-local or reserved address, which this "
                           "server does not fetch: send the image inline as a data:image/...;base64 URL",
                           "image_url_not_allowed")
    deadline = time.monotonic() + timeout
    conn = _connection(scheme, parts.hostname, address, port, timeout)
    timer = threading.Timer(timeout, _shut, args=(conn,))
    timer.daemon = True
    timer.start()
    try:
        path = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        conn.request("GET", path, headers={"Host": parts.netloc.rpartition("@")[2], "User-Agent": "seechat",
                                           "Accept": "image/*", "Accept-Encoding": "identity"})
        response = conn.getresponse()
        if 300 <= response.status < 400:
            raise FetchRefused(f"the image URL redirects (HTTP {response.status}); this server follows no redirects: "
                               "send the final URL", "image_url_redirects")
        if response.status != 200:
            raise FetchRefused(f"the image URL answered HTTP {response.status}, not an image")
        length = response.getheader("Content-Length", "")
        if length.isdigit() and int(length) > max_bytes:
            raise _too_large(int(length), max_bytes)
        data = bytearray()
        while chunk := response.read1(CHUNK):
            data += chunk
            if len(data) > max_bytes:
                raise _too_large(len(data), max_bytes)
        if time.monotonic() > deadline:
            raise OSError("deadline passed")
        return bytes(data)
    except FetchRefused:
        raise
    except (OSError, http.client.HTTPException, ValueError) as exc:
        late = time.monotonic() >= deadline
        log.info("remote image %s not fetched: %r", _loggable(parts), exc)
        raise FetchRefused(f"the image URL could not be fetched{f' within {timeout:g}s' if late else ''}: check "
                           "that it is reachable from the server, or send the image inline") from None
    finally:
        timer.cancel()
        conn.close()


def _resolve(host: str, port: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise FetchRefused("the image URL's host name could not be resolved") from None
    return ipaddress.ip_address(infos[0][4][0].split("%", 1)[0])


def _is_public(address) -> bool:
    """Global unicast, and so is any IPv4 address carried inside an IPv6 one (mapped, 6to4, Teredo)."""
    if getattr(address, "ipv4_mapped", None):
        return _is_public(address.ipv4_mapped)
    inner = [getattr(address, "sixtofour", None)]
    inner += list(getattr(address, "teredo", None) or ())
    return address.is_global and not (address.is_multicast or address.is_reserved or address.is_loopback
                                      or address.is_link_local or address.is_private) and all(
        _is_public(a) for a in inner if a is not None)


def _connection(scheme: str, host: str, address, port: int, timeout: float) -> http.client.HTTPConnection:
    """A connection to `address` (already checked) that still speaks to `host` (Host header, TLS name)."""
    if scheme == "https":
        context = ssl.create_default_context()

        class Pinned(http.client.HTTPSConnection):
            def connect(self):
                self.raw = socket.create_connection((str(address), port), timeout)
                self.sock = context.wrap_socket(self.raw, server_hostname=host)

        return Pinned(host, port, timeout=timeout, context=context)

    class PinnedPlain(http.client.HTTPConnection):
        def connect(self):
            self.sock = self.raw = socket.create_connection((str(address), port), timeout)

    return PinnedPlain(host, port, timeout=timeout)


def _shut(conn: http.client.HTTPConnection) -> None:
    """The deadline passed: end whatever the fetch is blocked on (the response may hold the socket after the
    connection let go of it, so the socket kept at connect time is shut)."""
    sock = getattr(conn, "raw", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _too_large(size: int, limit: int) -> FetchRefused:
    return FetchRefused(f"the image is {size / 2**20:.1f} MB, over this server's limit of {limit / 2**20:g} MB: "
                        "send a smaller image", "image_too_large", 413)


def _loggable(parts: urllib.parse.SplitResult) -> str:
    return f"{parts.scheme}://{parts.hostname}:{parts.port or ''}{parts.path[:80]}"
