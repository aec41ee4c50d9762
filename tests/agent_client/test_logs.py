"""Log output of the programs: console on a terminal (colour unless NO_COLOR), JSON
lines otherwise; level and format from flags or DISPATCHER_LOG_* (``log_settings``)."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys

import pytest

from agent_client.logs import log_settings

PROGRAM = ("from agent_client.logs import configure_logging, log_settings; "
           "import structlog; configure_logging(*log_settings(None, None)); "
           "structlog.get_logger('t').info('hello_there', n=1); "
           "structlog.get_logger('t').debug('not_shown')")


def run(env: dict[str, str], tty: bool) -> str:
    full = {k: v for k, v in os.environ.items()
            if not k.startswith("DISPATCHER_") and k != "NO_COLOR"}
    full.update(env)
    if not tty:
        return subprocess.run([sys.executable, "-c", PROGRAM], env=full, capture_output=True,
                              text=True, timeout=30, check=True).stderr
    parent, child = pty.openpty()
    try:
        subprocess.run([sys.executable, "-c", PROGRAM], env=full, stderr=child,
                       stdout=subprocess.DEVNULL, timeout=30, check=True)
        return os.read(parent, 65536).decode()
    finally:
        os.close(parent)
        os.close(child)


def test_json_lines_when_not_a_terminal_console_with_colour_on_one() -> None:
    line = json.loads(run({}, tty=False))
    assert (line["event"], line["n"], line["level"]) == ("hello_there", 1, "info")
    assert "\x1b[" in run({}, tty=True)
    plain = run({"NO_COLOR": "1"}, tty=True)
    assert "hello_there" in plain and "\x1b[" not in plain
    piped = run({"DISPATCHER_LOG_FORMAT": "console", "DISPATCHER_LOG_LEVEL": "debug"}, tty=False)
    assert "hello_there" in piped and "not_shown" in piped and "\x1b[" not in piped


@pytest.mark.parametrize("flags,env,expected", [
    ((None, None), {}, ("info", None)),
    ((None, None), {"DISPATCHER_LOG_LEVEL": "WARNING", "DISPATCHER_LOG_FORMAT": "json"},
     ("warning", True)),
    (("error", "console"), {"DISPATCHER_LOG_LEVEL": "debug", "DISPATCHER_LOG_FORMAT": "json"},
     ("error", False)),
])
def test_flags_win_over_variables(flags: tuple[str | None, str | None], env: dict[str, str],
                                  expected: tuple[str, bool | None]) -> None:
    assert log_settings(*flags, env=env) == expected


def test_bad_values_name_their_source() -> None:
    with pytest.raises(ValueError, match=r"^DISPATCHER_LOG_LEVEL=loud: expected one of debug"):
        log_settings(None, None, env={"DISPATCHER_LOG_LEVEL": "loud"})
    with pytest.raises(ValueError, match=r"^--log-format xml: expected one of json, console$"):
        log_settings(None, "xml", env={})
