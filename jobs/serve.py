"""Serve LLaVA-NeXT over an OpenAI-compatible HTTP API until interrupted.

Usage: python -m jobs.serve [--model DIR] [--host 127.0.0.1] [--port 8000] [--replicas N]
       [--max-batch-size N] [--batch-wait-ms N] [--api-key KEY] [--allow-remote-images] ...

Starts (or joins, with RAY_ADDRESS) a Ray cluster, runs the application of `actors.serve_app`
and shuts Serve down on Ctrl-C or SIGTERM. For a long-lived cluster deployment use
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

from pipeline.config import ATTN_IMPLEMENTATIONS, DTYPES, PROMPT_FORMATS, QUANTIZATIONS, ServeOptions

log = logging.getLogger(__name__)

API_KEY_ENV = "LLAVA_SERVE_API_KEY"
SHIPPED = Path(__file__).resolve().parent.parent / "actors" / "checkpoints" / "tiny-shapes"


def build_parser() -> argparse.ArgumentParser:
    d = ServeOptions(model="-")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model", default=str(SHIPPED),
        help="checkpoint directory (LLaVA-NeXT, transformers format; default: the shipped shapes model)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--replicas", type=int, default=d.replicas)
    p.add_argument("--gpus-per-replica", type=float, default=None, help="default: 1 when the cluster has GPUs, else 0")
    p.add_argument("--max-batch-size", type=int, default=d.max_batch_size, help="requests per Engine.generate call")
    p.add_argument("--batch-wait-ms", type=float, default=d.batch_wait_ms, help="how long a batch waits to fill")
    p.add_argument("--max-ongoing-requests", type=int, default=d.max_ongoing_requests, help="per replica")
    p.add_argument("--max-queued-requests", type=int, default=d.max_queued_requests,
                   help="requests waiting for a replica before new ones get 503 (-1: no bound)")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="when a request sets no max_tokens")
    p.add_argument("--prompt-format", choices=PROMPT_FORMATS, default=d.prompt_format)
    p.add_argument("--dtype", choices=DTYPES, default=d.dtype)
    p.add_argument("--attn", choices=ATTN_IMPLEMENTATIONS, default=d.attn)
    p.add_argument("--quantization", choices=QUANTIZATIONS, default=d.quantization)
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}, else no key)")
    p.add_argument("--allow-remote-images", action="store_true", help="let clients send http(s) image URLs")
    p.add_argument("--max-image-bytes", type=int, default=d.max_image_bytes)
    p.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels)
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes)
    return p


def main(argv: list[str] | None = None) -> None:
    args = vars(build_parser().parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host, port = args.pop("host"), args.pop("port")

    import ray
    from ray import serve

    from actors.serve_app import APP_NAME, application

    options = ServeOptions(**args)
    log.info("serve options: %s", json.dumps(options.describe()))
    ray.init()
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
        log.info("interrupted; shutting down")
    finally:
        serve.shutdown()
        ray.shutdown()
    print(f"served {options.model} at http://{host}:{port}/v1 for {time.monotonic() - started:.0f} s; stopped cleanly")


if __name__ == "__main__":
    main()
