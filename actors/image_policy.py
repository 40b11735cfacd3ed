"""What an endpoint client may make the server fetch, and image preparation under that policy.

The server's credentials and network position are not the client's: `s3://` reads happen with
the replica's own credentials, and `http(s)://` fetches from inside the operator's network. So
`data:` URLs are always allowed, `s3://` only under prefixes the operator lists, `http(s)://`
only when remote images are on, and then only to globally routable addresses (no loopback,
private, shared/CGNAT, link-local, multicast or reserved ones; checked on every resolved address
of every redirect hop) unless the operator names the host. A refusal says what was refused, never whether a private object
exists or how large it is.

`prepare_image` runs in the replica's preparation processes (or threads) and returns errors as
values, so nothing but plain data crosses the process boundary.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
from dataclasses import dataclass

from pipeline.config import ImageLimits
from pipeline.fetch import FetchError, FetchRefused, FetchTooLarge, fetch, http_get
from pipeline.preprocess import AnyresSpec, ImageError, ImageTooLarge, PreparedImage, prepare


@dataclass(frozen=True)
class ImagePolicy:
    """The operator's rules for image URLs (see the module docstring)."""

    allow_remote: bool = False
    s3_prefixes: tuple[str, ...] = ()
    hosts: tuple[str, ...] = ()
    timeout_s: float = 10.0

    def check_address(self, host: str, address: str | None) -> str | None:
        """Why `host` at `address` may not be fetched, or None when it may: only globally routable
        addresses (after unwrapping IPv4-mapped, 6to4 and Teredo forms) unless the host is named.
        One answer for every refusal, a name that does not resolve included (`address` None)."""
        if host.lower() in self.hosts:
            return None
        refusal = (f"image host {host} is not a public address (or does not resolve); such hosts are refused "
                   "unless the operator allows them (--allow-image-host)")
        if address is None:
            return refusal
        ip = ipaddress.ip_address(address.split("%")[0])
        candidates = [ip]
        if isinstance(ip, ipaddress.IPv6Address):
            candidates += [a for a in (ip.ipv4_mapped, ip.sixtofour, *(ip.teredo or ())) if a is not None]
        if any(not a.is_global or a.is_multicast or getattr(a, "is_site_local", False) for a in candidates):
            return refusal
        return None

    def s3_allowed(self, url: str) -> bool:
        """Only under a listed prefix, with no path trick to step out of it."""
        path = url[len("s3://"):]
        if any(part in ("..", ".") for part in path.split("/")):
            return False
        return any(url.startswith(p if p.endswith("/") else p + "/") for p in self.s3_prefixes)


@dataclass
class Refusal:
    """A request image that cannot be used: the HTTP status, the message and the OpenAI error code."""

    status: int
    message: str
    code: str


def _data_url(url: str, max_bytes: int) -> bytes | Refusal:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        return Refusal(400, "an image data URL must be 'data:<type>;base64,<data>'", "invalid_image")
    if len(payload) * 3 // 4 > max_bytes + 2:
        return Refusal(413, f"image is {len(payload) * 3 // 4} bytes, over the limit of {max_bytes}", "image_too_large")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        return Refusal(400, "an image data URL holds invalid base64", "invalid_image")


def image_bytes(url: str, policy: ImagePolicy, max_bytes: int) -> bytes | Refusal:
    """The bytes behind a client's image URL, or why they cannot be had."""
    scheme = url.split(":", 1)[0].lower()
    if scheme == "data":
        return _data_url(url, max_bytes)
    if scheme == "s3":
        if not policy.s3_allowed(url):
            return Refusal(400, "s3:// image URLs are only allowed under the prefixes the operator lists "
                                "(--allow-s3-prefix); send the image inline as a data: URL", "image_url_refused")
        try:
            return fetch(url, policy.timeout_s, max_bytes)
        except FetchTooLarge:
            return Refusal(413, f"the image at {url} is over the limit of {max_bytes} bytes", "image_too_large")
        except FetchError:
            return Refusal(400, f"cannot read the image at {url}", "invalid_image")
    if scheme in ("http", "https"):
        if not policy.allow_remote:
            return Refusal(400, "http(s) image URLs are disabled on this server (start it with "
                                "--allow-remote-images); send the image inline as a data: URL", "remote_images_disabled")
        try:
            return http_get(url, policy.timeout_s, max_bytes, policy.check_address)
        except FetchRefused as exc:
            return Refusal(400, str(exc), "image_url_refused")
        except FetchTooLarge as exc:
            return Refusal(413, str(exc), "image_too_large")
        except FetchError as exc:
            return Refusal(400, str(exc), "invalid_image")
    return Refusal(400, f"unsupported image URL scheme {scheme!r}; use data:, s3:// or http(s)://", "invalid_image")


def prepare_image(url: str, policy: ImagePolicy, spec: AnyresSpec, limits: ImageLimits,
                  fast: bool = False) -> PreparedImage | Refusal:
    """Fetch, decode and tile one request image: the engine's input, or a refusal."""
    data = image_bytes(url, policy, limits.max_bytes)
    if isinstance(data, Refusal):
        return data
    try:
        return prepare(data, spec, limits, fast)
    except ImageTooLarge as exc:
        return Refusal(413, str(exc), "image_too_large")
    except ImageError as exc:
        return Refusal(400, f"cannot decode the image: {exc}", "invalid_image")
    except Exception as exc:  # a strange file must cost its request, never the worker
        return Refusal(400, f"cannot decode the image: {type(exc).__name__}: {exc}", "invalid_image")
