"""The one image fetcher: inline bytes and structs, paths, limits as typed errors, HTTP through
redirects when no policy is given."""

from __future__ import annotations

import http.server
import threading

import pytest

from pipeline.fetch import FetchError, FetchTooLarge, fetch


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

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/hop"
        assert fetch(url, 5.0, 1000) == b"x" * 100
        with pytest.raises(FetchTooLarge):
            fetch(url, 5.0, 50)
    finally:
        server.shutdown()
