"""Serve LLaVA-NeXT over an OpenAI-compatible HTTP API until interrupted.

Usage: python -m jobs.serve [--model DIR] [--host 127.0.0.1] [--port 8000] [--replicas N|MIN-MAX]
       [--scheduler continuous|static] [--api-key KEY] [--allow-s3-prefix s3://b/p/] ...

Starts (or joins, with RAY_ADDRESS) a Ray cluster, runs the application of `actors.serve_app`
and on Ctrl-C or SIGTERM drains it (no new requests; those in flight finish within --drain-s)
before shutting Serve down. For a long-lived cluster deployment use
`serve deploy actors/serve_config.yaml` instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import time
from pathlib import Path

from pipeline.config import (
    ENGINE_FLAGS,
    ConfigError,
    EngineConfig,
    add_engine_arguments,
    engine_config_from,
)
from pipeline.serve_options import ServeOptions, parse_replicas

log = logging.getLogger(__name__)

API_KEY_ENV = "LLAVA_SERVE_API_KEY"
SHIPPED = Path(__file__).resolve().parent.parent / "actors" / "checkpoints" / "tiny-shapes"


def build_parser() -> argparse.ArgumentParser:
    d = ServeOptions(engine=EngineConfig(model="-"))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model", default=str(SHIPPED),
        help="checkpoint directory (LLaVA-NeXT, transformers format; default: the shipped shapes model)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000)
    add_engine_arguments(p.add_argument_group("engine"))
    r = p.add_argument_group("replicas and admission")
    r.add_argument("--replicas", type=parse_replicas, default=(d.replicas, None), metavar="N|MIN-MAX",
                   help="engine replicas: a fixed N, or MIN-MAX to autoscale on ongoing requests (target per replica: "
                        "3/4 of --max-running-requests)")
    r.add_argument("--upscale-delay-s", type=float, default=d.upscale_delay_s,
                   help="seconds of load over the target before a replica is added")
    r.add_argument("--downscale-delay-s", type=float, default=d.downscale_delay_s,
                   help="seconds of load under the target before a replica is removed")
    r.add_argument("--drain-s", type=float, default=d.drain_s,
                   help="a replica going away (downscale, redeploy, SIGTERM) takes no new requests and finishes "
                        f"those in flight for up to this long (default: {d.drain_s:g})")
    r.add_argument("--stall-s", type=float, default=d.stall_s,
                   help="a replica whose engine has work but made no step for this long fails its health check "
                        f"and is replaced (default: {d.stall_s:g})")
    r.add_argument("--routing", choices=("image", "default"), default=d.routing,
                   help="image: a request goes to the replica that already holds its image, unless that one is "
                        "overloaded; default: Serve's choice (the shorter queue of two random replicas)")
    r.add_argument("--ingress-replicas", type=int, default=d.ingress_replicas,
                   help="replicas of the HTTP front that reads bodies and routes them")
    r.add_argument("--gpus-per-replica", type=float, default=None, help="default: 1 when the cluster has GPUs, else 0")
    r.add_argument("--max-ongoing-requests", type=int, default=d.max_ongoing_requests, help="per replica")
    r.add_argument("--max-queued-requests", type=int, default=d.max_queued_requests,
                   help="requests waiting in a replica before new ones get 503 (-1: no bound)")
    r.add_argument("--max-batch-size", type=int, default=d.max_batch_size,
                   help="requests per generate call (static scheduler)")
    r.add_argument("--batch-wait-ms", type=float, default=d.batch_wait_ms,
                   help="how long a batch waits to fill (static scheduler)")
    r.add_argument("--stream-interval-ms", type=float, default=d.stream_interval_ms,
                   help="least time between two streamed chunks; text made meanwhile goes out together "
                        f"(default: {d.stream_interval_ms:g} = every piece as soon as it is final)")
    r.add_argument("--prepare-workers", type=int, default=d.prepare_workers,
                   help="processes per replica that fetch, decode and tile images (0: threads of the replica)")
    r.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}, else no key)")
    i = p.add_argument_group("images a client may send")
    i.add_argument("--max-images-per-request", type=int, default=d.max_images_per_request)
    i.add_argument("--allow-s3-prefix", dest="allow_s3_prefixes", action="append", default=[],
                   help="s3://bucket/path/ under which clients may name images (repeatable; none by default)")
    i.add_argument("--allow-remote-images", action="store_true",
                   help="let clients send http(s) image URLs (public addresses only)")
    i.add_argument("--allow-image-host", dest="allow_image_hosts", action="append", default=[],
                   help="a host clients may reach even though it is private or loopback (repeatable)")
    i.add_argument("--fetch-timeout", dest="fetch_timeout_s", type=float, default=d.fetch_timeout_s)
    i.add_argument("--fast-decode", action="store_true",
                   help="decode big JPEGs at a reduced scale that still covers the tiles (faster; not bit-exact)")
    i.add_argument("--max-image-bytes", type=int, default=d.max_image_bytes)
    i.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels,
                   help="larger images are refused from their header, before decoding; each megapixel costs about "
                        f"24 ms of a preparation worker (PNG; default: {d.max_image_pixels})")
    i.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes)
    i.add_argument("--body-timeout-s", type=float, default=d.body_timeout_s,
                   help="seconds a client has to send its whole request body, before it takes a slot (default: "
                        f"{d.body_timeout_s:g})")
    return p


def options_from_args(args: argparse.Namespace) -> ServeOptions:
    values = vars(args).copy()
    engine = engine_config_from(args, values.pop("model"))
    for name, _, _ in ENGINE_FLAGS:
        values.pop(name)
    for name in ("host", "port"):
        values.pop(name)
    values["replicas"], values["max_replicas"] = values["replicas"]
    values["allow_s3_prefixes"] = tuple(values["allow_s3_prefixes"])
    values["allow_image_hosts"] = tuple(values["allow_image_hosts"])
    return ServeOptions(engine=engine, **values)


def drain(app: str) -> None:
    """Delete the application while the proxy still runs: its replicas take no new requests and
    finish those in flight (each for up to `drain_s`), and their streams reach the clients."""
    from ray import serve

    for signum in (signal.SIGINT, signal.SIGTERM):  # a second signal must not cut the drain short
        signal.signal(signum, signal.SIG_IGN)
    try:
        serve.delete(app, _blocking=True)
    except Exception:  # the application never started, or Serve is gone already: nothing to drain
        log.warning("nothing to drain", exc_info=True)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host, port = args.host, args.port
    try:
        options = options_from_args(args)
    except ConfigError as exc:
        parser.error(str(exc))

    import ray
    from ray import serve

    from actors.serve_app import APP_NAME, application

    log.info("serve options: %s", json.dumps(options.describe()))
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:  # a new local instance: enough logical CPUs for every replica and its preparation processes
        most = options.max_replicas or options.replicas
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, most * (1 + options.prepare_workers) + 1))
    # Installed after ray.init, which sets its own: SIGTERM (from `kill` or a job runner) and a
    # SIGINT that a background launch left ignored both take the clean path of Ctrl-C.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.default_int_handler)
    started = time.monotonic()
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(application(options), name=APP_NAME, route_prefix="/", blocking=False)
        log.info("serving %s at http://%s:%d/v1 (Ctrl-C to stop)", options.model, host, port)
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        log.info("interrupted; draining: new requests are refused, those in flight get up to %g s", options.drain_s)
    finally:
        drain(APP_NAME)
        serve.shutdown()
        ray.shutdown()
    print(f"served {options.model} at http://{host}:{port}/v1 for {time.monotonic() - started:.0f} s; stopped cleanly")


if __name__ == "__main__":
    main()
