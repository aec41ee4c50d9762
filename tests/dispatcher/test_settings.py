"""Where `dispatcher serve` takes its settings: defaults < TOML file < DISPATCHER_* < flags.

Through the real command line (`dispatcher config`, in-process with click's
runner: it resolves exactly what `serve` does), plus one real `serve` process
to see a bad setting stop it before anything listens.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from dispatcher import HubConfig
from dispatcher.cli import main
from dispatcher.config import FIELDS

from ..support import free_port

SECRET = "s3cr3t-value-never-shown"


def clean_env(**extra: str) -> dict[str, str | None]:
    """click's runner adds to os.environ: unset every DISPATCHER_* of the outer run."""
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("DISPATCHER_")}
    env.update(extra)
    return env


def config(*args: str, **env: str) -> Result:
    return CliRunner().invoke(main, ["config", *args], env=clean_env(**env))


def rows(result: Result) -> dict[str, tuple[str, str]]:
    """`dispatcher config`'s table: setting -> (value, source)."""
    assert result.exit_code == 0, result.output
    out = {}
    for line in result.stdout.splitlines()[1:]:
        name, value, source = line.split(None, 2)
        out[name] = (value, source)
    return out


def one_line(result: Result) -> str:
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in result.output, err
    assert err.startswith("dispatcher: configuration error: ")
    assert SECRET not in result.output
    return err.removeprefix("dispatcher: configuration error: ")


def test_every_field_has_a_flag_and_a_variable_named_in_help() -> None:
    names = {f.name for f in dataclasses.fields(HubConfig)}
    assert names - {f.name for f in FIELDS} == {"ssl"}  # a Python object: certfile/keyfile
    serve = main.commands["serve"]
    flags = {opt for p in serve.params for opt in p.opts}
    text = CliRunner().invoke(main, ["serve", "--help"], terminal_width=200).stdout
    for field in FIELDS:
        assert field.flag in flags, field.flag
        assert f"env: {field.variable}" in text, field.variable
    assert "--redis" in flags and "--redis-url" in flags
    assert "DISPATCHER_ADMIN_TOKEN_FILE" in text and "DISPATCHER_CONFIG" in text


def test_precedence_defaults_file_variables_flags(tmp_path: Path) -> None:
    toml = tmp_path / "hub.toml"
    toml.write_text('port = 9001\nheartbeat = 7\nprefix = "from-file"\n'
                    'redis_url = "redis://file:6379/0"\nws_fast_path = false\n')
    got = rows(config("--config", str(toml), "--heartbeat", "3", "--redis", "redis://flag/1",
                      DISPATCHER_HEARTBEAT="5", DISPATCHER_PREFIX="from-env"))
    assert got["port"] == ("9001", f"{toml}: port")
    assert got["prefix"] == ("from-env", "DISPATCHER_PREFIX")
    assert got["heartbeat"] == ("3.0", "--heartbeat")
    assert got["redis_url"] == ("redis://flag/1", "--redis-url")
    assert got["ws_fast_path"] == ("false", f"{toml}: ws_fast_path")
    assert got["command_timeout"] == ("60.0", "default")
    # DISPATCHER_CONFIG names the file too; the variable agrees with --redis's field.
    got = rows(config(DISPATCHER_CONFIG=str(toml), DISPATCHER_REDIS_URL="redis://env/2"))
    assert got["port"][0] == "9001" and got["redis_url"] == ("redis://env/2",
                                                              "DISPATCHER_REDIS_URL")


def test_secrets_from_files_are_masked(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    toml = tmp_path / "hub.toml"
    toml.write_text(f'admin_token_file = "{secret_file}"\n')
    result = config("--config", str(toml), DISPATCHER_AGENT_SECRET_FILE=str(secret_file),
                    DISPATCHER_REDIS_URL=f"rediss://user:{SECRET}@redis:6380/0")
    got = rows(result)
    assert got["admin_token"] == ("***", f"{toml}: admin_token_file")
    assert got["redis_url"] == ("rediss://user:***@redis:6380/0", "DISPATCHER_REDIS_URL")
    assert got["agent_secret"] == ("***", "DISPATCHER_AGENT_SECRET_FILE")
    assert SECRET not in result.output
    # The file's text (without its newline) is the secret: the hub gets it.
    values, _ = __import__("dispatcher.config", fromlist=["env_values"]).env_values(
        {"DISPATCHER_AGENT_SECRET_FILE": str(secret_file)})
    assert values == {"agent_secret": SECRET}


@pytest.mark.parametrize("args,env,expected", [
    ([], {"DISPATCHER_COMAND_TIMEOUT": "5"},
     "unknown variable DISPATCHER_COMAND_TIMEOUT (did you mean DISPATCHER_COMMAND_TIMEOUT?)"),
    ([], {"DISPATCHER_REDIS": "redis://x"},
     "unknown variable DISPATCHER_REDIS (did you mean DISPATCHER_REDIS_URL?)"),
    ([], {"DISPATCHER_HEARTBEAT": "-1"}, "DISPATCHER_HEARTBEAT=-1: must be positive"),
    ([], {"DISPATCHER_PORT": "eighty"}, "DISPATCHER_PORT=eighty: expected an integer"),
    ([], {"DISPATCHER_WS_FAST_PATH": "maybe"},
     "DISPATCHER_WS_FAST_PATH=maybe: expected a boolean (true/false, 1/0, yes/no, on/off)"),
    (["--heartbeat", "-1"], {}, "--heartbeat -1: must be positive"),
    (["--port", "70000"], {}, "--port 70000: must be a port number, 0 to 65535"),
    (["--max-agents", "x"], {}, "--max-agents x: expected an integer"),
    ([], {"DISPATCHER_LOG_LEVEL": "loud"}, None),  # serve only: see the process test
    ([], {"DISPATCHER_ADMIN_TOKEN": SECRET, "DISPATCHER_ADMIN_TOKEN_FILE": "/x"},
     "set DISPATCHER_ADMIN_TOKEN or DISPATCHER_ADMIN_TOKEN_FILE, not both"),
    ([], {"DISPATCHER_AGENT_SECRET_FILE": "/no/such/file"},
     "DISPATCHER_AGENT_SECRET_FILE=/no/such/file: cannot read the file: "
     "No such file or directory"),
])
def test_each_bad_setting_is_one_line_naming_its_source(
        args: list[str], env: dict[str, str], expected: str | None) -> None:
    result = config("--check", *args, **env)
    if expected is None:
        assert result.exit_code == 0, result.output
        return
    assert one_line(result) == expected


@pytest.mark.parametrize("body,expected", [
    ("comand_timeout = 5", "key 'comand_timeout': unknown key (did you mean command_timeout?)"),
    ("heartbeat = -1", "key 'heartbeat' = -1: must be positive"),
    ('heartbeat = "soon"', "key 'heartbeat' = 'soon': expected a number"),
    ("max_agents = 1.5", "key 'max_agents' = 1.5: expected an integer"),
    (f'admin_token = "{SECRET}"\nadmin_token_file = "/x"',
     "set 'admin_token' or 'admin_token_file', not both"),
    ("port = ", "not valid TOML: "),
])
def test_bad_file_names_the_file_and_key(tmp_path: Path, body: str, expected: str) -> None:
    toml = tmp_path / "hub.toml"
    toml.write_text(body + "\n")
    message = one_line(config("--config", str(toml), "--check"))
    assert str(toml) in message and expected in message
    assert one_line(config("--config", str(tmp_path / "nope.toml"))) == (
        f"--config {tmp_path / 'nope.toml'}: cannot read the file: No such file or directory")
    assert one_line(config(DISPATCHER_CONFIG="/no/hub.toml")) == (
        "DISPATCHER_CONFIG=/no/hub.toml: cannot read the file: No such file or directory")


def test_files_the_settings_name_are_read_before_serving(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"worker-1 {SECRET}\nnot a valid line\n")
    assert one_line(config("--check", "--agent-tokens", str(tokens))) == (
        f"--agent-tokens {tokens}: cannot use the tokens file: {tokens}:2: "
        "expected 'AGENT_ID TOKEN'")
    assert one_line(config("--check", DISPATCHER_CERTFILE=str(tmp_path / "none.pem"))) == (
        f"DISPATCHER_CERTFILE={tmp_path / 'none.pem'}: cannot load the certificate and key: "
        "No such file or directory")
    assert one_line(config("--check", "--keyfile", str(tokens))).endswith("needs certfile too")
    tokens.write_text(f"worker-1 {SECRET}\n")
    assert config("--check", "--agent-tokens", str(tokens)).exit_code == 0


def test_variables_of_the_other_programs_are_not_errors(tmp_path: Path) -> None:
    result = config("--check", DISPATCHER_ADMIN_URL="http://h:8081", DISPATCHER_AGENT_ID="a",
                    DISPATCHER_AGENT_URL="ws://h/ws", DISPATCHER_AGENT_TOKEN_FILE="/t",
                    DISPATCHER_LOG_FORMAT="json", DISPATCHER_TEST_ANYTHING="1",
                    DISPATCHER_ADMIN_TOKEN=SECRET)
    assert result.exit_code == 0, result.output
    assert result.stdout == "configuration ok\n"


def test_serve_with_a_bad_setting_exits_2_before_listening() -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
    exe = Path(sys.executable).parent / "dispatcher"
    for extra, expected in (({"DISPATCHER_HEARTBEAT": "-1"}, "DISPATCHER_HEARTBEAT=-1"),
                            ({"DISPATCHER_LOG_LEVEL": "loud"},
                             "DISPATCHER_LOG_LEVEL=loud: expected one of debug, info")):
        done = subprocess.run([str(exe), "serve", "--port", str(port), "--admin-port", "0"],
                              env={**env, **extra}, capture_output=True, text=True,
                              timeout=30, check=False)
        assert done.returncode == 2
        assert done.stderr.count("\n") == 1 and expected in done.stderr, done.stderr
        assert done.stdout == ""
    with socket.socket() as sock:  # nothing listened on it
        sock.bind(("127.0.0.1", port))


def test_the_guide_lists_every_field() -> None:
    import re

    guide = (Path(__file__).resolve().parents[2] / "docs" / "guide.md").read_text()
    rows = set(re.findall(r"^\| `(\w+)` \| [^|]+ \| `?(DISPATCHER_\w+|—)", guide, re.M))
    listed = {name for name, _ in rows}
    assert {f.name for f in dataclasses.fields(HubConfig)} <= listed
