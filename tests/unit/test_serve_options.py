"""The endpoint's options: config strings, replicas N or MIN-MAX, and the Serve settings derived
from them (autoscaling on ongoing requests, drain, health periods)."""

from __future__ import annotations

import pytest

from pipeline.config import ConfigError, EngineConfig
from pipeline.serve_options import ServeOptions, parse_replicas


def options(**kwargs) -> ServeOptions:
    return ServeOptions(engine=EngineConfig(model="m"), **kwargs)


def test_serve_options_from_config_strings():
    opts = ServeOptions.from_args({
        "model": "m", "replicas": "2", "allow_remote_images": "true", "gpus_per_replica": "none",
        "quantization": "none", "attn": "eager", "scheduler": "static", "allow_s3_prefixes": "s3://a/b/, s3://c/",
        "kv_cache_mb": "64", "drain_s": "5", "routing": "default",
    })
    assert (opts.replicas, opts.max_replicas, opts.allow_remote_images, opts.gpus_per_replica) == (2, None, True, None)
    assert opts.engine == EngineConfig(model="m", attn_implementation="eager", scheduler="static", kv_cache_mb=64.0)
    assert opts.allow_s3_prefixes == ("s3://a/b/", "s3://c/") and opts.model == "m"
    assert (opts.drain_s, opts.routing) == (5.0, "default")
    assert opts.describe()["api_key"] is None
    assert options(api_key="k").describe()["api_key"] == "***"
    for bad in ({"model": "m", "colour": "red"}, {"model": "m", "max_batch_size": "0"}, {"model": "m", "top": "1"},
                {"model": "m", "allow_s3_prefixes": "bucket/x"}, {"model": "m", "max_images_per_request": "0"},
                {"model": "m", "replicas": "3-2"}, {"model": "m", "replicas": "a-b"}, {"model": "m", "routing": "x"},
                {"model": "m", "stall_s": "0"}, {"model": "m", "drain_s": "-1"}):
        with pytest.raises(ConfigError):
            ServeOptions.from_args(bad)
    with pytest.raises(ConfigError):
        options(api_key="")


def test_the_shipped_serve_config_is_valid_options():
    from pathlib import Path

    import yaml

    config = yaml.safe_load((Path(__file__).resolve().parents[2] / "actors" / "serve_config.yaml").read_text())
    options = ServeOptions.from_args(config["applications"][0]["args"])
    assert options.engine.scheduler == "continuous" and options.allow_s3_prefixes == ()


def test_replicas_are_a_count_or_a_range():
    assert parse_replicas("3") == (3, None)
    assert parse_replicas("1-4") == (1, 4)
    assert parse_replicas(" 2-2 ") == (2, 2)
    with pytest.raises(ConfigError, match="N or MIN-MAX"):
        parse_replicas("two")


def test_a_fixed_count_does_not_autoscale():
    assert options(replicas=3).autoscaling_config() is None
    assert ServeOptions.from_args({"model": "m", "replicas": 3}).max_replicas is None


def test_autoscaling_aims_under_the_engines_running_slots():
    """A replica is asked for while its loop still has room: 3/4 of --max-running-requests."""
    opts = ServeOptions.from_args({"model": "m", "replicas": "1-4", "max_running_requests": "32",
                                   "upscale_delay_s": "5", "downscale_delay_s": "60"})
    config = opts.autoscaling_config()
    assert (config["min_replicas"], config["max_replicas"]) == (1, 4)
    assert config["target_ongoing_requests"] == 24 < opts.engine.max_running_requests
    assert (config["upscale_delay_s"], config["downscale_delay_s"]) == (5.0, 60.0)
    assert opts.describe()["autoscaling"] == config
    small = ServeOptions.from_args({"model": "m", "replicas": "1-2", "max_running_requests": "1"})
    assert small.autoscaling_target == 1
    static = ServeOptions.from_args({"model": "m", "replicas": "1-2", "scheduler": "static", "max_batch_size": "8"})
    assert static.autoscaling_target == 6


def test_drain_and_health_periods_follow_their_options():
    assert options(drain_s=30).drain_periods() == (1.0, 30.0)
    assert options(drain_s=1).drain_periods() == (0.1, 1.0)
    period, timeout = options(stall_s=60).health_periods()
    assert period == 10.0 and timeout >= period
    period, _ = options(stall_s=2).health_periods()
    assert period < 2  # a stall is found within about stall_s plus one period
