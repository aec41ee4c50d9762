"""HubConfig: checks at construction and the DISPATCHER_* environment."""

from __future__ import annotations

import pytest

from dispatcher import HubConfig


def test_environment_maps_to_fields_and_overrides_win() -> None:
    env = {"DISPATCHER_PORT": "9000", "DISPATCHER_HEARTBEAT": "2.5",
           "DISPATCHER_REDIS_URL": "redis://r:6379/1", "DISPATCHER_PREFIX": "p"}
    config = HubConfig.from_env(env, prefix="q")
    assert (config.port, config.heartbeat, config.redis_url, config.prefix) == (
        9000, 2.5, "redis://r:6379/1", "q")


@pytest.mark.parametrize("field,value", [
    ("heartbeat", 0), ("command_timeout", -1), ("max_frame", 10), ("prefix", "a b"),
    ("max_frame_rate", 0.5), ("max_frame_rate", -3),
])
def test_bad_values_are_refused(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        HubConfig(**{field: value})  # type: ignore[arg-type]


def test_bad_number_in_environment_names_the_variable() -> None:
    with pytest.raises(ValueError, match="DISPATCHER_PORT"):
        HubConfig.from_env({"DISPATCHER_PORT": "eighty"})


@pytest.mark.parametrize("raw,expected", [
    ("0", False), ("false", False), ("No", False), ("off", False),
    ("1", True), ("TRUE", True), ("yes", True), (" on ", True),
])
def test_booleans_in_environment(raw: str, expected: bool) -> None:
    config = HubConfig.from_env({"DISPATCHER_REDIS_FAST_PATH": raw})
    assert config.redis_fast_path is expected


def test_bad_boolean_in_environment_names_the_variable_and_the_words() -> None:
    with pytest.raises(ValueError, match=r"DISPATCHER_REDIS_FAST_PATH=maybe: expected a boolean.*1/0"):
        HubConfig.from_env({"DISPATCHER_REDIS_FAST_PATH": "maybe"})


def test_redis_max_queued_is_checked() -> None:
    assert HubConfig.from_env({"DISPATCHER_REDIS_MAX_QUEUED": "50"}).redis_max_queued == 50
    with pytest.raises(ValueError, match="redis_max_queued"):
        HubConfig(redis_max_queued=0)


def test_config_is_frozen() -> None:
    import dataclasses

    config = HubConfig(port=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.port = 1  # type: ignore[misc]
    assert dataclasses.replace(config, port=2).port == 2
