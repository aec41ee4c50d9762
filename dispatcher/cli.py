"""``dispatcher``: the operator's command line (argument parsing and output only)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, TypeVar

import click
import structlog

from agent_client.logs import FORMATS, LEVELS, LOG_VARIABLES, configure_logging, log_settings
from agent_client.proctitle import hide_secret_flags
from agent_client.signals import on_stop_signals

from .admin_client import DEFAULT_URL, AdminClient, AdminError
from .config import FIELDS, SECRETS, HubConfig, SettingError
from .demo import run_demo
from .errors import DispatcherError
from .hub import Dispatcher
from .runtime import tune_gc
from .settings import CONFIG_VARIABLE, FLAG_ALIASES, HELP, Resolved, masked, resolve
from .transport import agent_token

__all__ = ["main"]

_LOG_LEVELS = click.Choice(LEVELS)
CLOSE_BOUND = 10.0  # seconds closing may take after the drain (agents' closing handshakes)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dispatcher")
def main() -> None:
    """dispatcher: a realtime agent hub.

    Run a hub with `dispatcher serve`, try it with `dispatcher demo`. Drive a
    running hub over its admin API with the client verbs (agents, pending,
    exec, jobs, job, commands, command, cancel, emit, broadcast): `--admin URL` and `--token`, or
    DISPATCHER_ADMIN_URL and DISPATCHER_ADMIN_TOKEN; tables by default, `--json`
    for scripts.

    \b
    Exit codes of the client verbs:
      0  done
      1  the command failed, timed out, was cancelled or dropped (for several
         agents: any of them did not end ok); the agent is not connected (exec
         on one agent without --queue); an event was not received in
         time; a cancel came too late (already COMPLETE)
      2  usage: bad arguments or JSON, refused by the hub as a bad request
      3  not found: no such agent, command or job; a target that matched nobody
      4  the hub cannot be reached, refused the admin token, or its store is down
    """
    # Secrets given as flags (warned about by serve) do not show in `ps`.
    hide_secret_flags()


def _hub_options(fn: F) -> F:
    """``--config FILE`` and one flag per ``HubConfig`` field, generated from the dataclass
    (a new field gets its flag here, and its variable in dispatcher.settings)."""
    for field in reversed(FIELDS):
        default = "none" if field.default is None else masked(field.name, field.default)
        env = field.variable + (f" or {field.variable}_FILE" if field.secret else "")
        text = f"{HELP.get(field.name, field.name)}  [default: {default}; env: {env}]"
        if field.kind is bool:
            decl = f"{field.flag}/--no-{field.flag[2:]}"
            fn = click.option(decl, field.name, default=None, help=text)(fn)
        else:
            metavar = {int: "INT", float: "SECONDS" if field.name.endswith(
                ("timeout", "interval", "ttl", "heartbeat", "retention", "grace")) else "NUMBER",
                       str: "TEXT"}[field.kind]
            fn = click.option(*FLAG_ALIASES.get(field.name, ()), field.flag, field.name,
                              default=None, metavar=metavar, help=text)(fn)
    return click.option("--config", "config_file", metavar="FILE",
                        help=f"TOML file of settings (keys: the flags' names with "
                             f"underscores).  [env: {CONFIG_VARIABLE}]")(fn)


def _log_options(fn: F) -> F:
    fn = click.option("--log-format", type=click.Choice(FORMATS), default=None,
                      help="json or console (default: console on a terminal, else JSON "
                           "lines).  [env: DISPATCHER_LOG_FORMAT]")(fn)
    return click.option("--log-level", type=click.Choice(LEVELS), default=None,
                        help="debug, info, warning or error (default: info).  "
                             "[env: DISPATCHER_LOG_LEVEL]")(fn)


def _config_or_exit(config_file: str | None, flags: dict[str, Any]) -> Resolved:
    """The effective configuration, or one line naming the bad setting and exit 2."""
    try:
        return resolve(file=config_file, env=os.environ, flags=flags, known=_known_variables())
    except SettingError as exc:
        click.echo(f"dispatcher: configuration error: {exc}", err=True)
        sys.exit(EXIT_USAGE)


def _known_variables() -> set[str]:
    """DISPATCHER_* variables the other programs read: every verb's options, the
    agent's, the log settings."""
    from agent_client.cli import ENV_VARIABLES  # noqa: PLC0415

    known = {*ENV_VARIABLES, *LOG_VARIABLES}
    for command in main.commands.values():
        for param in command.params:
            envvar = getattr(param, "envvar", None)
            known.update([envvar] if isinstance(envvar, str) else envvar or ())
    return known


@main.command()
@_hub_options
@_log_options
def serve(config_file: str | None, log_level: str | None, log_format: str | None,
          **flags: Any) -> None:
    """Run a hub until SIGTERM or Ctrl-C (the first drains, a second forces).

    Settings, lowest to highest precedence: defaults, the --config TOML file
    (or DISPATCHER_CONFIG), DISPATCHER_<FIELD> variables, these flags. Secrets
    also from files: DISPATCHER_AGENT_SECRET_FILE, DISPATCHER_ADMIN_TOKEN_FILE
    (agent_secret_file, admin_token_file in the file). `dispatcher config`
    shows what they add up to. A bad setting exits 2 before anything listens.
    """
    try:
        level, json_logs = log_settings(log_level, log_format)
    except ValueError as exc:
        click.echo(f"dispatcher: configuration error: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    resolved = _config_or_exit(config_file, flags)
    configure_logging(level, json_logs)
    on_command_line = [name for name in sorted(SECRETS) if flags.get(name) is not None]
    try:
        _run(_serve(resolved.config, on_command_line))
    except OSError as exc:
        click.echo(f"dispatcher: cannot serve: {exc}", err=True)
        sys.exit(1)


@main.command(name="config")
@_hub_options
@click.option("--check", is_flag=True, help="Only validate: exit 0, or 2 with the error.")
def config_cmd(config_file: str | None, check: bool, **flags: Any) -> None:
    """Print the effective configuration of `dispatcher serve` and where each value
    comes from (secrets masked), from the same file, variables and flags."""
    resolved = _config_or_exit(config_file, flags)
    if check:
        click.echo("configuration ok")
        return
    rows = [[field.name, masked(field.name, getattr(resolved.config, field.name)),
             resolved.sources[field.name]] for field in FIELDS]
    _table(["SETTING", "VALUE", "SOURCE"], rows)


async def _serve(config: HubConfig, secret_flags: Sequence[str] = ()) -> None:
    log = structlog.get_logger("dispatcher.serve")
    hub = Dispatcher(config)
    # The first log line says which engine runs and whether agents need tokens.
    log.info(
        "hub_starting", engine=hub.engine, hub_id=hub.hub_id,
        note=("in-memory engine: commands are lost when this process stops; "
              "use --redis URL in production") if hub.engine == "memory" else None,
        agent_auth="required" if hub.auth_required else
        "NONE: no --agent-secret or --agent-tokens, any client may connect as any agent",
    )
    for name in secret_flags:
        log.warning("secret_on_command_line", flag=f"--{name.replace('_', '-')}",
                    hint="every user can read it in the process list: use "
                         f"DISPATCHER_{name.upper()}_FILE or the config file")
    stop = asyncio.Event()

    def graceful() -> None:
        log.info("hub_stopping", hint="send the signal again to force")
        stop.set()

    def forced() -> None:
        log.warning("hub_forced_exit")
        sys.exit(1)

    on_stop_signals(asyncio.get_running_loop(), graceful, forced)
    await hub.listen()
    tune_gc()  # this process is the hub: see dispatcher/runtime.py
    try:
        await stop.wait()
        await hub.drain()
    finally:
        try:
            async with asyncio.timeout(CLOSE_BOUND):
                await hub.close()
        except TimeoutError:
            log.warning("hub_close_timeout", seconds=CLOSE_BOUND)


@main.command()
@click.option("--agents", default=3, show_default=True, help="How many demo agents to start.")
@click.option("--port", default=0, show_default=True, help="Agents' port (0 = any free port).")
@click.option("--log-level", type=_LOG_LEVELS, default="warning", show_default=True)
def demo(agents: int, port: int, log_level: str) -> None:
    """Start a hub and demo agents, run a few commands, and show what happens."""
    configure_logging(log_level, json=False)
    try:
        _run(run_demo(n_agents=agents, port=port, echo=click.echo))
    except (OSError, TimeoutError, DispatcherError) as exc:
        click.echo(f"dispatcher demo: failed: {type(exc).__name__}: {exc}", err=True)
        sys.exit(1)


@main.command()
@click.argument("agent_id")
@click.option("--secret", envvar="DISPATCHER_AGENT_SECRET", required=True,
              help="The hub's agent secret.  [env: DISPATCHER_AGENT_SECRET]")
def token(agent_id: str, secret: str) -> None:
    """Print the token of AGENT_ID under the hub's agent secret."""
    click.echo(agent_token(secret, agent_id))


# -h/--help go to the agent's own options too (its help, not this wrapper's).
@main.command(name="agent", context_settings={"ignore_unknown_options": True,
                                              "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def agent_cmd(args: tuple[str, ...]) -> None:
    """Run the built-in agent (same as `dispatcher-agent`; -h for its options)."""
    from agent_client.cli import main as agent_main  # noqa: PLC0415

    agent_main.main(args=list(args), prog_name="dispatcher agent")


# --------------------------------------------------------------------------
# Client verbs over the admin API (docs/cli.md).

EXIT_OK = 0
EXIT_FAILED = 1  # the command failed, timed out, was cancelled; no receipt; too late
EXIT_USAGE = 2  # click's own code for usage errors, and the hub's 400
EXIT_NOT_FOUND = 3
EXIT_UNREACHABLE = 4  # cannot connect, bad admin token, hub or store unavailable

F = TypeVar("F", bound=Callable[..., Any])


class _Exit(Exception):
    """Leave with ``code`` after printing ``message`` as one line on stderr."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _client_options(fn: F) -> F:
    """``--admin``, ``--token`` and ``--json`` on every client verb; one-line errors."""

    @functools.wraps(fn)
    def wrapper(*args: Any, admin_url: str, admin_token: str | None, as_json: bool,
                **kwargs: Any) -> None:
        try:
            client = AdminClient(admin_url, admin_token)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="'--admin'") from None
        try:
            code = fn(*args, client=client, as_json=as_json, **kwargs)
        except _Exit as exc:
            click.echo(f"dispatcher: {exc.message}", err=True)
            sys.exit(exc.code)
        except AdminError as exc:
            click.echo(f"dispatcher: {_explain(exc)}", err=True)
            sys.exit(_exit_code(exc))
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:  # a bug must still be one line, never a traceback
            click.echo(f"dispatcher: internal error: {type(exc).__name__}: {exc}", err=True)
            sys.exit(EXIT_FAILED)
        sys.exit(code or EXIT_OK)

    wrapper = click.option("--json", "as_json", is_flag=True,
                           help="Print JSON (for scripts) instead of tables.")(wrapper)
    wrapper = click.option("--token", "admin_token", envvar="DISPATCHER_ADMIN_TOKEN",
                           show_envvar=True, help="The hub's admin token.")(wrapper)
    wrapper = click.option("--admin", "admin_url", envvar="DISPATCHER_ADMIN_URL",
                           default=DEFAULT_URL, show_default=True, show_envvar=True,
                           help="The hub's admin API.")(wrapper)
    return wrapper  # type: ignore[return-value]


def _exit_code(exc: AdminError) -> int:
    status = exc.status
    if status is None or status in (401, 403) or (status >= 500 and status != 504):
        return EXIT_UNREACHABLE
    if status == 404:
        return EXIT_NOT_FOUND
    if status in (400, 413, 405):
        return EXIT_USAGE
    return EXIT_FAILED  # 409, 429, 504


def _explain(exc: AdminError) -> str:
    if exc.status in (401, 403):
        return ("the hub refused the admin token (set --token or DISPATCHER_ADMIN_TOKEN): "
                f"{exc.message}")
    if exc.status is not None and exc.status >= 500 and exc.code not in ("timeout",
                                                                          "delivery_timeout"):
        return f"the hub answered {exc.status} ({exc.code}): {exc.message}"
    return exc.message


def _payload(raw: str | None, what: str = "JSON") -> Any:
    """The optional JSON argument: '-' reads it from stdin."""
    if raw is None:
        return None
    if raw == "-":
        raw = sys.stdin.read()
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise click.BadParameter(f"not valid JSON ({exc}); quote strings as '\"text\"'",
                                 param_hint=what) from None


def _print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, ensure_ascii=False))


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    for row in [headers, *rows]:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
                   .rstrip())


def _ago(ms: Any, now: float | None = None) -> str:
    """Unix milliseconds as a short age: '4s ago', '3m ago', '2h ago'."""
    if not isinstance(ms, int | float) or not ms:
        return "-"
    now = datetime.now(UTC).timestamp() if now is None else now
    return _span(now - ms / 1000) + " ago"


def _span(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:.0f}s" if seconds >= 10 else f"{seconds:.1f}s"


def _short(value: Any, width: int = 60) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= width else text[:width - 3] + "..."


def _when(ms: Any) -> str:
    if not isinstance(ms, int | float) or not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def _show_command(info: dict[str, Any]) -> None:
    """One command as 'field: value' lines."""
    fields = [
        ("id", info.get("id")), ("agent", info.get("agent_id")), ("key", info.get("key")),
        ("status", info.get("status")), ("outcome", info.get("outcome") or "-"),
        ("group", info.get("group") or "-"),
        ("submitted", f"{_when(info.get('ts'))} ({_ago(info.get('ts'))})"),
        ("updated", _when(info.get("updated"))), ("deadline", _when(info.get("deadline"))),
        ("payload", _short(info.get("payload"), 200)),
    ]
    if info.get("outcome") in ("ok", "dropped"):
        fields.append(("result", _short(info.get("result"), 200)))
    if info.get("error"):
        fields.append(("error", _short(info.get("error"), 200)))
    for name, value in fields:
        click.echo(f"{name + ':':<11}{value}")


def _outcome_exit(info: dict[str, Any]) -> int:
    return EXIT_OK if info.get("outcome") == "ok" else EXIT_FAILED


def _failure_line(info: dict[str, Any]) -> str:
    outcome = info.get("outcome")
    err = info.get("error") or {}
    if outcome == "error":
        line = f"command {info.get('id')} failed: {err.get('code')}: {err.get('message')}"
        if err.get("data") is not None:
            line += f" (data: {_short(err['data'], 200)})"
        return line
    return f"command {info.get('id')} ended with outcome {outcome}"


@main.command()
@_client_options
def agents(client: AdminClient, as_json: bool) -> int:
    """List the connected agents (whole cluster).

    \b
    Example:
      dispatcher agents --admin http://127.0.0.1:8081
    """
    found = client.agents()
    if as_json:
        _print_json(found)
        return EXIT_OK
    if not found:
        click.echo("no agents connected")
        return EXIT_OK
    rows = [[a["id"], a.get("hub_id", "-"), _ago(a.get("connected_at")),
             _ago(a.get("last_seen")), _short(a.get("meta") or {}, 50)]
            for a in sorted(found, key=lambda a: str(a.get("id")))]
    _table(["AGENT", "HUB", "CONNECTED", "LAST SEEN", "META"], rows)
    return EXIT_OK


@main.command()
@click.argument("agent_id", metavar="AGENT")
@_client_options
def pending(agent_id: str, client: AdminClient, as_json: bool) -> int:
    """List AGENT's commands that are not COMPLETE, oldest first.

    \b
    Example:
      dispatcher pending worker-7
    """
    found = client.pending(agent_id)
    if as_json:
        _print_json(found)
        return EXIT_OK
    if not found:
        click.echo(f"no pending commands for {agent_id}")
        return EXIT_OK
    now = datetime.now(UTC).timestamp()
    rows = [[c["id"], c.get("key", ""), c.get("status", ""), _ago(c.get("ts"), now),
             (_span(c["deadline"] / 1000 - now) if c.get("deadline") else "-"),
             c.get("group") or "-"] for c in found]
    _table(["COMMAND", "KEY", "STATUS", "SUBMITTED", "TIME LEFT", "GROUP"], rows)
    return EXIT_OK


@main.command(name="exec")
@click.argument("agent_id", metavar="TARGET")
@click.argument("key")
@click.argument("payload", metavar="[JSON]", required=False)
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True),
              help="Seconds before the command times out (default: the hub's).")
@click.option("--no-wait", is_flag=True, help="Return the command (or job) id once it is "
              "stored.")
@click.option("--group", help="Coalescing group of the command (one agent).")
@click.option("--id", "command_id", help="Your own command id, or job id for several agents "
              "(submitting it again is idempotent).")
@click.option("--batch", metavar="N|P%", help="Several agents: at most N (or P% of them) "
              "unfinished at once.")
@click.option("--max-failures", metavar="N|P%", help="Several agents: stop starting new ones "
              "once more than N (or P%) failed.")
@click.option("--queue", is_flag=True, help="One agent: let the command wait, PENDING, for an "
              "agent that is not connected (until it connects or the timeout passes).")
@click.option("--require-online", is_flag=True, help="Refuse at once when an agent is not "
              "connected (the default for one agent; see --queue).")
@_client_options
def exec_cmd(*, agent_id: str, key: str, payload: str | None, timeout: float | None,
             no_wait: bool, group: str | None, command_id: str | None, batch: str | None,
             max_failures: str | None, queue: bool, require_online: bool,
             client: AdminClient, as_json: bool) -> int:
    """Run command KEY on TARGET with an optional JSON payload ('-' reads stdin).

    TARGET is an agent id, a list ('web-1,web-2'), a glob on connected agents'
    ids ('web-*') or a selector on their meta ('role=db,region=eu*').

    One agent: waits for the outcome and prints the agent's result; exits 1
    when the command fails, times out or is cancelled. With --no-wait, prints
    the command's id once it is stored (follow it with `dispatcher command ID`).
    An agent that is not connected is an error at once (exit 1), unless
    --queue lets the command wait for it.

    Several agents (a job, docs/fleets.md): one line per agent as each ends,
    then a summary; exits 0 when all ended ok, 1 when any did not, 3 when the
    target matched no agent. With --no-wait, prints the job id.

    \b
    Examples:
      dispatcher exec worker-7 echo '{"hello": "world"}'
      dispatcher exec worker-7 sleep '{"seconds": 30}' --timeout 60 --no-wait
      dispatcher exec laptop-3 sync --queue --no-wait
      dispatcher exec 'web-*' deploy '{"version": "1.4"}' --batch 25% --max-failures 1
    """
    if queue and require_online:
        raise click.UsageError("--queue and --require-online contradict each other")
    value = _payload(payload)
    if _is_job_target(agent_id) or batch or max_failures:
        if queue:
            raise click.UsageError("--queue is for one agent (a job's listed agents that are "
                                   "not connected wait for it unless --require-online)")
        return _exec_job(client, agent_id, key, value, timeout=timeout, no_wait=no_wait,
                         job_id=command_id, batch=_amount(batch, "--batch"),
                         max_failures=_amount(max_failures, "--max-failures"),
                         require_online=require_online, as_json=as_json)
    try:
        info = client.execute(agent_id, key, value, timeout=timeout, group=group,
                              command_id=command_id, wait=not no_wait,
                              require_online=not queue)
    except AdminError as exc:
        if exc.status == 504 and as_json:
            _print_json(exc.body)
        if exc.code == "agent_offline":
            raise _Exit(EXIT_FAILED, f"agent {agent_id!r} is not connected (--queue lets "
                        "the command wait for it)") from None
        raise
    if no_wait:
        if as_json:
            _print_json(info)
        else:
            click.echo(info["id"])
        return EXIT_OK
    if as_json:
        _print_json(info)
    elif info.get("outcome") == "ok":
        _print_json(info.get("result"))
    if info.get("outcome") != "ok":
        click.echo(f"dispatcher: {_failure_line(info)}", err=True)
    return _outcome_exit(info)


def _is_job_target(target: str) -> bool:
    """Whether ``exec``'s TARGET names several agents (a job) rather than one id."""
    return any(c in target for c in ",=*?[]!")


def _amount(raw: str | None, flag: str) -> int | str | None:
    if raw is None:
        return None
    text = raw.strip()
    if text.isdigit():
        return int(text)
    if text.endswith("%"):
        return text
    raise click.BadParameter(f"{raw!r} is not a number or a percentage like 25%",
                             param_hint=f"'{flag}'")


def _exec_job(client: AdminClient, target: str, key: str, payload: Any, *,
              timeout: float | None, no_wait: bool, job_id: str | None,
              batch: int | str | None, max_failures: int | str | None,
              require_online: bool, as_json: bool) -> int:
    job = client.submit_job(target, key, payload, timeout=timeout, batch=batch,
                            max_failures=max_failures, require_online=require_online,
                            job_id=job_id)
    if no_wait:
        if as_json:
            _print_json(job)
        else:
            click.echo(job["id"])
        return EXIT_OK
    if not as_json:
        click.echo(f"job {job['id']}: {key} on {len(job['agents'])} agent(s)"
                   + (f", batch {job['batch']}" if job.get("batch") is not None else "")
                   + (f", max failures {job['max_failures']}"
                      if job.get("max_failures") is not None else ""))
    results: list[dict[str, Any]] = []
    end: dict[str, Any] = job
    for event, data in client.follow_job(job["id"]):
        if event == "result":
            results.append(data)
            if not as_json:
                click.echo(_result_line(data))
        elif event == "end":
            end = data
    if as_json:
        _print_json({"job": end, "results": results})
    else:
        click.echo(_job_summary(end))
    counts = end.get("counts") or {}
    return EXIT_OK if counts.get("ok", 0) == len(end.get("agents") or ()) else EXIT_FAILED


def _result_line(info: dict[str, Any]) -> str:
    """``agent  outcome  result-or-error  time`` for one part of a job."""
    outcome = info.get("outcome") or info.get("status") or "-"
    if outcome in ("ok", "dropped"):
        detail = _short(info.get("result"), 60)
    elif info.get("error"):
        err = info["error"]
        detail = f"{err.get('code')}: {err.get('message')}"
    else:
        detail = "-"
    took = "-"
    if outcome != "skipped" and info.get("ts") and info.get("updated"):
        took = _span((info["updated"] - info["ts"]) / 1000)
    return f"{info.get('agent_id', '-'):<20} {outcome:<10} {_short(detail, 60):<60} {took}"


def _job_summary(job: dict[str, Any]) -> str:
    counts = job.get("counts") or {}
    parts = [f"{counts[k]} {k}" for k in ("ok", "error", "timeout", "cancelled", "dropped",
                                            "skipped", "active", "pending") if counts.get(k)]
    took = ""
    if job.get("status") == "COMPLETE" and job.get("ts") and job.get("updated"):
        took = f" in {_span((job['updated'] - job['ts']) / 1000)}"
    return (f"job {job.get('id')} {job.get('status')}: {', '.join(parts) or 'nothing'} "
            f"of {len(job.get('agents') or ())} agent(s){took}")


@main.command()
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True,
              help="How many jobs, newest first.")
@_client_options
def jobs(limit: int, client: AdminClient, as_json: bool) -> int:
    """List jobs, newest first.

    \b
    Example:
      dispatcher jobs --limit 10
    """
    listed = client.jobs(limit)
    if as_json:
        _print_json(listed)
        return EXIT_OK
    if not listed:
        click.echo("no jobs")
        return EXIT_OK
    rows = []
    for job in listed:
        c = job.get("counts") or {}
        failed = sum(c.get(k, 0) for k in ("error", "timeout", "cancelled", "dropped"))
        rows.append([job["id"], job["key"], job["status"], str(len(job["agents"])),
                     str(c.get("ok", 0)), str(failed), str(c.get("skipped", 0)),
                     _ago(job.get("ts"))])
    _table(["ID", "KEY", "STATUS", "AGENTS", "OK", "FAILED", "SKIPPED", "SUBMITTED"], rows)
    return EXIT_OK


@main.command()
@click.argument("job_id", metavar="ID")
@_client_options
def job(job_id: str, client: AdminClient, as_json: bool) -> int:
    """Show job ID: its counts and one line per agent (exit 3 if unknown).

    \b
    Example:
      dispatcher job deploy-42
    """
    info = client.job(job_id)
    if as_json:
        _print_json(info)
        return EXIT_OK
    click.echo(_job_summary(info))
    click.echo(f"key: {info['key']}  target: {_short(info.get('target'), 60)}  "
               f"batch: {info.get('batch') or '-'}  max failures: "
               f"{'-' if info.get('max_failures') is None else info['max_failures']}  "
               f"hub: {info.get('origin')}")
    by_agent = {c["agent_id"]: c for c in info.get("commands") or ()}
    for agent in info["agents"]:
        cmd = by_agent.get(agent)
        if cmd is None:
            state = "skipped" if info["status"] == "COMPLETE" else "not started"
            click.echo(f"{agent:<20} {state}")
        else:
            click.echo(_result_line(cmd) + f"  {cmd['id']}")
    return EXIT_OK


@main.command()
@click.option("--agent", help="Only this agent's commands.")
@click.option("--key", help="Only commands with this key.")
@click.option("--status", type=click.Choice(["PENDING", "ACTIVE", "COMPLETE"]))
@click.option("--outcome", type=click.Choice(["ok", "error", "timeout", "cancelled", "dropped"]))
@click.option("--job", help="Only the commands of this job.")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True,
              help="Commands per page.")
@click.option("--cursor", help="The page after the one that printed this cursor.")
@_client_options
def commands(*, agent: str | None, key: str | None, status: str | None, outcome: str | None,
             job: str | None, limit: int, cursor: str | None, client: AdminClient,
             as_json: bool) -> int:
    """List the command history, newest first: every retained command, COMPLETE or not.

    When there is more, the last line gives the option for the next page.

    \b
    Examples:
      dispatcher commands --agent worker-7 --outcome error
      dispatcher commands --key backup --limit 10 --cursor CURSOR
    """
    page = client.commands(agent=agent, key=key, status=status, outcome=outcome, job=job,
                           limit=limit, cursor=cursor)
    if as_json:
        _print_json(page)
        return EXIT_OK
    found = page.get("commands") or []
    if not found:
        click.echo("no commands" if not page.get("next") else
                   "no commands on this page")
    else:
        now = datetime.now(UTC).timestamp()
        rows = [[c["id"], c.get("agent_id", ""), c.get("key", ""), c.get("status", ""),
                 c.get("outcome") or "-", _ago(c.get("ts"), now), c.get("job") or "-"]
                for c in found]
        _table(["COMMAND", "AGENT", "KEY", "STATUS", "OUTCOME", "SUBMITTED", "JOB"], rows)
    if page.get("next"):
        click.echo(f"next page: --cursor {page['next']}")
    return EXIT_OK


@main.command()
@click.argument("command_id", metavar="ID")
@_client_options
def command(command_id: str, client: AdminClient, as_json: bool) -> int:
    """Show command ID: status, outcome, result or error (exit 3 if unknown).

    \b
    Example:
      dispatcher command 5f1c0a2e9b7d4c33-0000000001
    """
    info = client.command(command_id)
    if as_json:
        _print_json(info)
    else:
        _show_command(info)
    return EXIT_OK


@main.command()
@click.argument("command_id", metavar="ID")
@_client_options
def cancel(command_id: str, client: AdminClient, as_json: bool) -> int:
    """Cancel command ID (exit 1 if it is already COMPLETE, 3 if unknown).

    \b
    Example:
      dispatcher cancel 5f1c0a2e9b7d4c33-0000000001
    """
    info = client.cancel(command_id)
    if as_json:
        _print_json(info)
    else:
        click.echo(f"cancelled {command_id}")
    return EXIT_OK


@main.command()
@click.argument("agent_ids", metavar="AGENT[,AGENT...]")
@click.argument("key")
@click.argument("data", metavar="[JSON]", required=False)
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True),
              help="Seconds to wait for each receipt (default: the hub's command timeout).")
@_client_options
def emit(*, agent_ids: str, key: str, data: str | None, timeout: float | None,
         client: AdminClient, as_json: bool) -> int:
    """Send event KEY (optional JSON data) to agents and wait for their receipts.

    An agent that is away gets the event when it connects; until then it
    counts as not received (exit 1), and the event stays queued.

    \b
    Example:
      dispatcher emit worker-7,worker-8 config.reload '{"version": 3}' --timeout 5
    """
    targets = list(dict.fromkeys(a.strip() for a in agent_ids.split(",") if a.strip()))
    if not targets:
        raise click.BadParameter("name at least one agent", param_hint="AGENT")
    value = _payload(data)

    def one(agent_id: str) -> AdminError | None:
        try:
            client.emit(agent_id, key, value, timeout=timeout)
        except AdminError as exc:
            return exc
        return None

    with ThreadPoolExecutor(max_workers=min(16, len(targets))) as pool:
        outcomes = dict(zip(targets, pool.map(one, targets), strict=True))
    hard = [exc for exc in outcomes.values() if exc is not None and exc.status != 504]
    if hard:
        raise max(hard, key=_exit_code)  # the gravest error decides the exit code
    received = [a for a, exc in outcomes.items() if exc is None]
    missing = [a for a, exc in outcomes.items() if exc is not None]
    if as_json:
        _print_json({"received": received, "pending": missing})
    else:
        for agent_id in targets:
            state = "received" if agent_id in received else "not received in time (queued)"
            click.echo(f"{agent_id}: {state}")
    return EXIT_OK if not missing else EXIT_FAILED


@main.command()
@click.argument("key")
@click.argument("data", metavar="[JSON]", required=False)
@_client_options
def broadcast(key: str, data: str | None, client: AdminClient, as_json: bool) -> int:
    """Send event KEY (optional JSON data) to every connected agent, without receipts.

    \b
    Example:
      dispatcher broadcast maintenance '{"in": "5m"}'
    """
    answer = client.broadcast(key, _payload(data))
    if as_json:
        _print_json(answer)
    else:
        click.echo(f"sent to {answer.get('agents', 0)} agent(s)")
    return EXIT_OK


def _run(coro: Any) -> None:
    """Run on uvloop when it is installed (docs/benchmarks.md), else asyncio's loop."""
    try:
        import uvloop  # noqa: PLC0415

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    with contextlib.suppress(KeyboardInterrupt):
        runner(coro)

