"""The endpoint's typed configuration: engine, replicas and autoscaling, admission, drain, health,
routing and image policy, in one dataclass validated on construction.

Kept apart from pipeline/config.py (the batch job's and the engine's configuration) because the
endpoint's options grew into a family of their own. Plain Python with no Ray: the Serve
deployment options (autoscaling, drain, health periods) are derived here as plain dicts and
numbers, so every rule is unit-tested without starting Serve.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any

from pipeline.config import EngineConfig, ImageLimits
from pipeline.errors import ConfigError

# Decoding and tiling costs about 24 ms a megapixel for PNG and 14 for JPEG on one core of the
# development machine, and one preparation worker serves a replica's clients in turn: 25 MP (a
# 5000x5000 photo) is about 0.6 s of it at worst. The batch job keeps the larger ImageLimits default.
SERVE_MAX_IMAGE_PIXELS = 25_000_000
# A replica scales out when its ongoing requests pass this share of the engine's running slots:
# before its loop is full, not after its queue is.
AUTOSCALE_SHARE = 0.75
ROUTINGS = ("image", "default")


def parse_replicas(text: str) -> tuple[int, int | None]:
    """`N` (a fixed count) or `MIN-MAX` (autoscaling) into (replicas, max_replicas or None)."""
    low, dash, high = str(text).strip().partition("-")
    try:
        pair = (int(low), int(high) if dash else None)
    except ValueError:
        raise ConfigError(f"replicas must be N or MIN-MAX, got {text!r}") from None
    return pair


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"expected a boolean; got {text!r}")


def _convert(value: Any, hint: Any) -> Any:
    """A config-file or `key=value` string into the field's type (None, tuples and bools included)."""
    kinds = typing.get_args(hint) or (hint,)
    if isinstance(value, str) and type(None) in kinds and value.lower() in ("", "none", "null"):
        return None
    base = typing.get_origin(hint) or hint
    if base is tuple or tuple in [typing.get_origin(k) for k in kinds]:
        items = value.split(",") if isinstance(value, str) else list(value or ())
        return tuple(str(i).strip() for i in items if str(i).strip())
    if isinstance(value, str):
        kind = next(k for k in kinds if k is not type(None))
        return {int: int, float: float, bool: _parse_bool, str: str}[kind](value)
    return value


@dataclass(frozen=True)
class ServeOptions:
    """Everything one Serve application needs: the engine, the replicas, admission and image policy.

    `replicas` is the fixed replica count, or the minimum when `max_replicas` is set: then Serve
    autoscales on ongoing requests, aiming at `autoscaling_target` per replica, adding one after
    `upscale_delay_s` over it and removing one after `downscale_delay_s` under it. A replica going
    away (downscale, redeploy, shutdown) takes no new requests and finishes those in flight for up
    to `drain_s`. Its health check fails when the engine's loop is dead, or has work and made no
    step for `stall_s`. `routing` "image" sends requests carrying the same image to the replica
    that already holds it; "default" is Serve's power-of-two choice. `ingress_replicas` run the
    HTTP front (auth, body, routing key) in front of the engine replicas.

    `gpus_per_replica=None` means one GPU when the cluster has any, else none;
    `max_queued_requests=-1` leaves the queue unbounded. `max_batch_size`/`batch_wait_ms` shape
    the batches of the static scheduler. Images: `data:` URLs always; `s3://` only under
    `allow_s3_prefixes`; `http(s)://` only with `allow_remote_images`, and then only to public
    addresses unless the host is in `allow_image_hosts`. `stream_interval_ms` is the least time
    between two streamed chunks (text made meanwhile goes out together; 0 = every piece at once).
    `prepare_workers` processes fetch, decode and tile images beside the model's process;
    `fast_decode` decodes big JPEGs at a reduced scale (not bit-exact).
    """

    engine: EngineConfig
    replicas: int = 1
    max_replicas: int | None = None
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 120.0
    drain_s: float = 30.0
    stall_s: float = 60.0
    routing: str = "image"
    ingress_replicas: int = 1
    gpus_per_replica: float | None = None
    max_ongoing_requests: int = 32
    max_queued_requests: int = 64
    max_batch_size: int = 8
    batch_wait_ms: float = 20.0
    api_key: str | None = None
    prepare_workers: int = 1
    max_images_per_request: int = 8
    allow_remote_images: bool = False
    allow_s3_prefixes: tuple[str, ...] = ()
    allow_image_hosts: tuple[str, ...] = ()
    fetch_timeout_s: float = 10.0
    fast_decode: bool = False
    stream_interval_ms: float = 0.0
    max_image_bytes: int = ImageLimits().max_bytes
    max_image_pixels: int = SERVE_MAX_IMAGE_PIXELS
    max_body_bytes: int = 128 * 1024 * 1024
    body_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        ImageLimits(self.max_image_bytes, self.max_image_pixels)
        if self.body_timeout_s <= 0:
            raise ConfigError("body_timeout_s must be positive")
        for name in ("replicas", "max_ongoing_requests", "max_batch_size", "max_body_bytes", "max_images_per_request",
                     "ingress_replicas"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        if self.max_replicas is not None and self.max_replicas < self.replicas:
            raise ConfigError(f"replicas MIN-MAX needs MIN <= MAX; got {self.replicas}-{self.max_replicas}")
        if min(self.upscale_delay_s, self.downscale_delay_s, self.drain_s) < 0 or self.stall_s <= 0:
            raise ConfigError("upscale/downscale delays and drain_s must not be negative, stall_s must be positive")
        if self.routing not in ROUTINGS:
            raise ConfigError(f"routing must be one of {', '.join(ROUTINGS)}; got {self.routing!r}")
        if self.max_queued_requests < -1 or self.max_queued_requests == 0:
            raise ConfigError("max_queued_requests must be positive, or -1 for no bound")
        if self.stream_interval_ms < 0:
            raise ConfigError("stream_interval_ms must not be negative")
        if self.batch_wait_ms < 0 or (self.gpus_per_replica is not None and self.gpus_per_replica < 0):
            raise ConfigError("batch_wait_ms and gpus_per_replica must not be negative")
        if self.prepare_workers < 0 or self.fetch_timeout_s <= 0:
            raise ConfigError("prepare_workers must be >= 0 and fetch_timeout_s positive")
        if self.api_key == "":
            raise ConfigError("api_key must not be empty; leave it unset to disable authentication")
        for prefix in self.allow_s3_prefixes:
            if not prefix.startswith("s3://") or len(prefix.rstrip("/")) <= len("s3://"):
                raise ConfigError(f"allowed S3 prefixes look like s3://bucket/path/; got {prefix!r}")

    @property
    def model(self) -> str:
        return self.engine.model

    @property
    def limits(self) -> ImageLimits:
        return ImageLimits(self.max_image_bytes, self.max_image_pixels)

    @property
    def autoscaling_target(self) -> int:
        """Ongoing requests per replica Serve aims at: three quarters of the engine's running slots
        (under the static scheduler, of its batch), so a new replica is asked for while the loop
        still has room, not once requests queue behind it."""
        slots = self.engine.max_running_requests if self.engine.scheduler == "continuous" else self.max_batch_size
        return max(1, math.floor(slots * AUTOSCALE_SHARE))

    def autoscaling_config(self) -> dict[str, Any] | None:
        """Serve's autoscaling_config for MIN-MAX replicas (None for a fixed count)."""
        if self.max_replicas is None:
            return None
        return {
            "min_replicas": self.replicas, "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.autoscaling_target,
            "upscale_delay_s": self.upscale_delay_s, "downscale_delay_s": self.downscale_delay_s,
            # Decisions read the last few seconds of load, so short delays (tests) act on fresh figures.
            "look_back_period_s": min(30.0, max(2.0, self.upscale_delay_s)), "metrics_interval_s": 1.0,
        }

    def health_periods(self) -> tuple[float, float]:
        """(seconds between health checks, seconds a check may take): a few checks per stall
        period, so a stalled engine is found within about `stall_s` plus one period."""
        period = min(10.0, max(0.5, self.stall_s / 3))
        return period, max(10.0, period)

    def drain_periods(self) -> tuple[float, float]:
        """(seconds between checks for requests still in flight, the longest wait for them)."""
        return min(1.0, max(0.1, self.drain_s / 10)), self.drain_s

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> ServeOptions:
        """Options from a Serve config's `args` or `serve run key=value` pairs (strings are converted).

        Keys are the fields of this class and of `EngineConfig` (`model` included; `attn` is the
        older name of `attn_implementation`); `replicas` also takes "MIN-MAX".
        """
        args = dict(args)
        if "attn" in args:
            args["attn_implementation"] = args.pop("attn")
        if isinstance(args.get("replicas"), str) and "-" in args["replicas"]:
            args["replicas"], args["max_replicas"] = parse_replicas(args["replicas"])
        serve_hints = typing.get_type_hints(cls)
        engine_hints = typing.get_type_hints(EngineConfig)
        unknown = sorted(set(args) - (set(serve_hints) - {"engine"}) - set(engine_hints))
        if unknown:
            known = sorted((set(serve_hints) - {"engine"}) | set(engine_hints))
            raise ConfigError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(known)}")
        engine = {k: _convert(v, engine_hints[k]) for k, v in args.items() if k in engine_hints}
        serve = {k: _convert(v, serve_hints[k]) for k, v in args.items() if k not in engine_hints}
        return cls(engine=EngineConfig(**engine), **serve)

    def describe(self) -> dict[str, Any]:
        """The options for the start-up log, with the API key hidden and the derived Serve settings."""
        return {**dataclasses.asdict(self), "api_key": "***" if self.api_key else None,
                "autoscaling": self.autoscaling_config()}
