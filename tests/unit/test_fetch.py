"""The one image fetcher: inline bytes and structs, paths, limits as typed errors, HTTP through
redirects when no policy is given."""

from __future__ import annotations

import http.server
import time

import pytest

from pipeline.fetch import FetchError, FetchTooLarge, fetch
from tests.helpers import loopback_server


def test_bytes_structs_and_paths(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"abc")
    assert fetch(b"raw", 1.0, 10) == b"raw"
    assert fetch({"bytes": None, "path": str(tmp_path / "x.bin")}, 1.0, 10) == b"abc"
    assert fetch(f"file://{tmp_path / 'x.bin'}", 1.0, 10) == b"abc"
    with pytest.raises(FetchTooLarge):
        fetch(str(tmp_path / "x.bin"), 1.0, 2)
    with pytest.raises(FetchError, match="no such file"):
        fetch(str(tmp_path / "nope"), 1.0, 10)
    with pytest.raises(FetchError, match="unsupported"):
        fetch(3.5, 1.0, 10)


def test_http_follows_redirects_and_bounds_the_read():
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/hop":
                self.send_response(301)
                self.send_header("Location", "/data")
                self.end_headers()
                return
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"x" * 100)

        def log_message(self, *args):
            pass

    server = loopback_server(Handler)
    try:
        url = f"http://127.0.0.1:{server.server_port}/hop"
        assert fetch(url, 5.0, 1000) == b"x" * 100
        with pytest.raises(FetchTooLarge):
            fetch(url, 5.0, 50)
    finally:
        server.shutdown()


def test_a_trickling_server_cannot_hold_the_fetch_past_its_timeout():
    """The timeout bounds the whole download, not each read: one byte every 0.2 s never times a
    read out, yet the fetch gives up once its second is spent."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            try:
                for _ in range(100):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:  # the client gave up
                pass

        def log_message(self, *args):
            pass

    server = loopback_server(Handler)
    try:
        # Read to the end, the 100 bytes would take 20 s and arrive whole; the fetch must give up.
        with pytest.raises(FetchError, match="within 1 s"):
            fetch(f"http://127.0.0.1:{server.server_port}/slow", 1.0, 1000)
    finally:
        server.shutdown()


@pytest.mark.parametrize("url", ["http://h:99999/x.png", "http://[::1/x.png", "http://a..b/x.png", "http://"])
def test_malformed_http_urls_are_fetch_errors(url):
    with pytest.raises(FetchError):
        fetch(url, 1.0, 10)
