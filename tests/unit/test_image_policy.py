"""What a client may make the endpoint fetch, over real loopback HTTP: refusals name what was
refused, allowed hosts are served, every redirect hop is checked again."""

from __future__ import annotations

import base64

import pytest

from actors.image_policy import ImagePolicy, Refusal, image_bytes, prepare_image
from pipeline.config import ImageLimits
from pipeline.preprocess import AnyresSpec, PreparedImage
from tests.helpers import encode, noise_image, serve_image

PNG = encode(noise_image(40, 30))
DATA_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()
OPEN = ImagePolicy(allow_remote=True)


@pytest.fixture
def image_server():
    """Loopback HTTP: /img.png is the test PNG, /to?u=URL redirects to URL, anything else is 404."""
    server = serve_image(PNG)
    yield server.server_port
    server.shutdown()


def test_data_urls_always(tiny_model):
    assert image_bytes(DATA_URL, ImagePolicy(), 10_000) == PNG
    for bad in ("data:image/png;base64,@@@@", "data:image/png,raw"):
        refused = image_bytes(bad, ImagePolicy(), 10_000)
        assert isinstance(refused, Refusal) and (refused.status, refused.code) == (400, "invalid_image")
    assert image_bytes(DATA_URL, ImagePolicy(), 10).status == 413
    prepared = prepare_image(DATA_URL, ImagePolicy(), AnyresSpec.from_checkpoint(tiny_model), ImageLimits())
    assert isinstance(prepared, PreparedImage) and prepared.size == (30, 40)
    bomb = prepare_image(DATA_URL, ImagePolicy(), AnyresSpec.from_checkpoint(tiny_model), ImageLimits(max_pixels=100))
    assert (bomb.status, bomb.code) == (413, "image_too_large")


def test_remote_urls_need_the_switch(image_server):
    url = f"http://127.0.0.1:{image_server}/img.png"
    refused = image_bytes(url, ImagePolicy(), 10_000)
    assert (refused.status, refused.code) == (400, "remote_images_disabled")
    for other in ("file:///etc/passwd", "ftp://x/y"):
        assert image_bytes(other, OPEN, 10_000).status == 400


def test_only_public_hosts_unless_allowed(image_server):
    url = f"http://127.0.0.1:{image_server}/img.png"
    refused = image_bytes(url, OPEN, 10_000)
    assert (refused.status, refused.code) == (400, "image_url_refused") and "not a public address" in refused.message
    allowed = ImagePolicy(allow_remote=True, hosts=("127.0.0.1",))
    assert image_bytes(url, allowed, 10_000) == PNG
    assert image_bytes(url.replace("http://", "HTTP://"), allowed, 10_000) == PNG
    assert image_bytes(url, allowed, 10).status == 413
    for address in ("10.1.2.3", "169.254.169.254", "224.0.0.1", "::1", "0.0.0.0", "::ffff:192.168.0.1",
                    "100.100.100.200",  # shared (CGNAT) space, where some clouds keep their metadata service
                    "fec0::1", "2002:7f00:1::1", "198.18.0.1", "ff02::1"):
        assert OPEN.check_address("h", address) is not None, address
    assert OPEN.check_address("example.com", "93.184.216.34") is None
    assert OPEN.check_address("example.com", "2606:2800:220:1:248:1893:25c8:1946") is None


def test_names_that_do_not_resolve_get_the_refusal_of_private_ones():
    """Otherwise the answers would tell a client which internal names exist."""
    missing = image_bytes("http://no-such-host.invalid/img.png", OPEN, 10_000)
    assert (missing.status, missing.code) == (400, "image_url_refused")
    assert missing.message == OPEN.check_address("no-such-host.invalid", "10.1.2.3")


@pytest.mark.parametrize("url", ["http://h:99999/x.png", "http://[::1/x.png", "http:/etc/passwd", "https:x.png"])
def test_malformed_remote_urls_are_400s(url):
    refused = image_bytes(url, OPEN, 10_000)
    assert isinstance(refused, Refusal) and refused.status == 400, refused


def test_each_redirect_hop_is_checked_again(image_server):
    allowed = ImagePolicy(allow_remote=True, hosts=("127.0.0.1",))
    same = f"http://127.0.0.1:{image_server}/to?u=/img.png"
    assert image_bytes(same, allowed, 10_000) == PNG
    onward = f"http://127.0.0.1:{image_server}/to?u=http://localhost:{image_server}/img.png"
    refused = image_bytes(onward, allowed, 10_000)
    assert refused.code == "image_url_refused" and "localhost" in refused.message
    missing = image_bytes(f"http://127.0.0.1:{image_server}/nothing.png", allowed, 10_000)
    assert (missing.status, missing.code) == (400, "invalid_image") and "404" in missing.message


def test_s3_only_under_listed_prefixes_and_the_refusal_reveals_nothing():
    policy = ImagePolicy(s3_prefixes=("s3://bucket/public/",))
    assert policy.s3_allowed("s3://bucket/public/cat.png")
    for url in ("s3://bucket/private/cat.png", "s3://bucket/publicity.png", "s3://bucket/public/../private/x.png",
                "s3://other/public/cat.png"):
        assert not policy.s3_allowed(url)
    first = image_bytes("s3://bucket/private/exists.png", policy, 10_000)
    second = image_bytes("s3://bucket/private/missing.png", policy, 10_000)
    assert first.code == second.code == "image_url_refused" and first.message == second.message
    assert "exists" not in first.message
