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
