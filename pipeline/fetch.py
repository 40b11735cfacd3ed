"""Image bytes from wherever a row or a request points: inline bytes, local paths, `s3://`, `http(s)://`.

One fetcher, one set of limits and errors, for the batch job and the online endpoint alike; the
endpoint adds its own policy of what a client may reach (`check`, see actors/image_policy.py).
Stores go through pipeline/storage.py. HTTP goes through `http.client` with the connection
pinned to the address that was checked, and each redirect is checked again, so a policy on
addresses cannot be dodged by a second DNS answer or a redirect.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urljoin, urlsplit

from pipeline.storage import filesystem

MAX_REDIRECTS = 5
CHUNK = 1 << 16

# (host, resolved ip, or None when the name did not resolve) -> why that host may not be
# fetched, or None when it may.
AddressCheck = Callable[[str, "str | None"], "str | None"]


class FetchError(ValueError):
    """An image source that cannot be read (a row's error in the job, a 400 at the endpoint)."""


class FetchRefused(FetchError):
    """A source the policy does not let this caller reach."""


class FetchTooLarge(FetchError):
    """A source over the byte limit."""


def fetch(source: Any, timeout_s: float, max_bytes: int, check: AddressCheck | None = None) -> bytes:
    """Bytes of one image source: inline bytes, an HF `{bytes, path}` struct, or a URI."""
    if source is None:
        raise FetchError("null image")
    if isinstance(source, dict):
        if source.get("bytes") is not None:
            return bytes(source["bytes"])
        if source.get("path"):
            return fetch(source["path"], timeout_s, max_bytes, check)
        raise FetchError("image struct has neither bytes nor path")
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if not isinstance(source, str):
        raise FetchError(f"unsupported image value of type {type(source).__name__}")
    if source.split(":", 1)[0].lower() in ("http", "https"):
        return http_get(source, timeout_s, max_bytes, check)
    try:
        fs, path = filesystem(source)
        with fs.open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise FetchError(f"no such file or object: {source}") from None
    except Exception as exc:  # store errors come in many types; the row just fails
        raise FetchError(f"{source}: {type(exc).__name__}: {exc}") from None
    if len(data) > max_bytes:
        raise FetchTooLarge(f"{source} is over the limit of {max_bytes} bytes")
    return data


class _PinnedHTTP(http.client.HTTPConnection):
    """An HTTP connection to a given address, whatever the host name would resolve to now."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to a given address, with the certificate checked against the host name."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def _address(host: str, port: int, check: AddressCheck | None) -> str:
    """The address to connect to; with a check, every address the name resolves to must pass, and
    a name that does not resolve is refused in the same words as one that is not allowed (so the
    answers cannot be used to list a private network's names)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        if check is not None:
            raise FetchRefused(check(host, None) or f"image host {host} is refused") from None
        raise FetchError(f"cannot resolve {host}: {exc}") from None
    addresses = [info[4][0] for info in infos]
    if check is not None:
        for address in addresses:
            reason = check(host, address)
            if reason is not None:
                raise FetchRefused(reason)
    return addresses[0]


def http_get(url: str, timeout_s: float, max_bytes: int, check: AddressCheck | None = None) -> bytes:
    """GET an image over HTTP(S), following up to five redirects, each hop checked. `timeout_s`
    bounds the whole fetch, every hop and byte included, so a server that trickles cannot hold a
    worker; at most `max_bytes` + 1 bytes are read."""
    deadline = time.monotonic() + timeout_s

    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise FetchError(f"cannot download {url}: no complete answer within {timeout_s:g} s")
        return left

    for _ in range(MAX_REDIRECTS + 1):
        try:
            parts = urlsplit(url)
            scheme, host, port = parts.scheme.lower(), parts.hostname, parts.port
        except ValueError as exc:  # a bad port, an unclosed [IPv6 bracket, ...
            raise FetchError(f"not a valid URL: {url}: {exc}") from None
        if scheme not in ("http", "https") or not host:
            raise FetchError(f"not an http(s) URL: {url}")
        port = port or (443 if scheme == "https" else 80)
        address = _address(host, port, check)
        kind = _PinnedHTTPS if scheme == "https" else _PinnedHTTP
        connection = kind(host, port, address, remaining())
        try:
            connection.request("GET", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
                               headers={"User-Agent": "llava-next-ray", "Accept": "image/*"})
            sock = connection.sock  # the response may detach it from the connection
            sock.settimeout(remaining())
            response = connection.getresponse()
            if response.status in (301, 302, 303, 307, 308) and response.getheader("Location"):
                url = urljoin(url, response.getheader("Location"))
                continue
            if response.status != 200:
                raise FetchError(f"{url}: the server answered HTTP {response.status}")
            chunks, size = [], 0
            while size <= max_bytes and not response.isclosed():
                sock.settimeout(remaining())
                chunk = response.read1(min(CHUNK, max_bytes + 1 - size))  # what has come, not all of it
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            data = b"".join(chunks)
        except FetchError:
            raise
        except TimeoutError:
            raise FetchError(f"cannot download {url}: no complete answer within {timeout_s:g} s") from None
        except (OSError, ValueError, http.client.HTTPException) as exc:
            raise FetchError(f"cannot download {url}: {type(exc).__name__}: {exc}") from None
        finally:
            connection.close()
        if len(data) > max_bytes:
            raise FetchTooLarge(f"image at {url} is over the limit of {max_bytes} bytes")
        return data
    raise FetchError(f"{url}: more than {MAX_REDIRECTS} redirects")
