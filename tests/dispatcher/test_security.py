"""Security (docs/security.md; docs/protocol.md, Errors and Close codes).

Agent credentials, the admin token, TLS on both ports, every limit answered by
its named error, HTTP status or close code, and what one agent cannot do to
another. Real hubs on loopback, real clients; the TLS certificate is made by
the test itself. Tests that only exercise the transport run on the in-memory
engine (Redis adds nothing there); those that touch the store run on both.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from agent_client import Agent
from dispatcher import Dispatcher, HubConfig, TooManyCommands, agent_token
from dispatcher.cli import main as cli_main
from dispatcher.models import AgentInfo
from dispatcher.transport import WsSession

from ..conftest import HubFactory, ws_url
from ..support import WAIT, RawAgent, hub_config, wait_for

# Run again with the fast paths off in CI (pytest -m fallback).
pytestmark = pytest.mark.fallback

SECRET = "correct horse battery staple"

MemoryHubFactory = Callable[..., Awaitable[Dispatcher]]


@pytest.fixture
async def memory_hub() -> AsyncIterator[MemoryHubFactory]:
    """Hubs on the in-memory engine (for what only the transport decides)."""
    hubs: list[Dispatcher] = []

    async def factory(**overrides: Any) -> Dispatcher:
        options: dict[str, Any] = {"port": 0, "admin_port": 0, "heartbeat": 5.0,
                                   "hello_timeout": 5.0}
        options.update(overrides)
        hub = Dispatcher(hub_config(**options))
        await hub.listen()
        hubs.append(hub)
        return hub

    yield factory
    for hub in hubs:
        await hub.close()


class Disconnects:
    """The hub's ``agent-disconnected`` events: agent id -> reason, awaitable."""

    def __init__(self, hub: Dispatcher) -> None:
        self.reasons: dict[str, asyncio.Future[str]] = {}
        hub.on("agent-disconnected", self._on)

    def _future(self, agent_id: str) -> asyncio.Future[str]:
        fut = self.reasons.get(agent_id)
        if fut is None:
            fut = self.reasons[agent_id] = asyncio.get_running_loop().create_future()
        return fut

    def _on(self, info: AgentInfo, reason: str) -> None:
        fut = self._future(info.id)
        if not fut.done():
            fut.set_result(reason)

    async def reason(self, agent_id: str, timeout: float = WAIT) -> str:
        async with asyncio.timeout(timeout):
            return await self._future(agent_id)

    def seen(self, agent_id: str) -> bool:
        return agent_id in self.reasons


async def hello_refused(hub: Dispatcher, agent_id: str, token: Any, **fields: Any) -> None:
    """A hello with this id and token is refused with ``unauthorized`` and close 4401."""
    raw = await RawAgent.connect(ws_url(hub))
    await raw.send({"t": "hello", "v": 1, "agent": agent_id, "token": token, **fields})
    frame = await raw.recv()
    assert (frame["t"], frame["code"]) == ("error", "unauthorized"), (agent_id, token, frame)
    code, _ = await raw.closed()
    assert code == 4401, (agent_id, token)


async def round_trip(hub: Dispatcher, agent: RawAgent, agent_id: str, payload: Any) -> None:
    """The connection is usable: a new command reaches it and its answer completes it."""
    handle = hub.execute_on_agent(agent_id, "echo", payload, timeout=WAIT)
    cmd = await agent.recv_type("cmd")
    assert cmd["id"] == handle.id
    await agent.send({"t": "result", "id": cmd["id"], "data": cmd["payload"]})
    assert await handle.result(WAIT) == payload


async def refused_503(url: str) -> str:
    """Opening a WebSocket on ``url`` is answered HTTP 503 before the upgrade; the body."""
    with pytest.raises(InvalidStatus) as info:
        await RawAgent.connect(url)
    response = info.value.response
    assert response.status_code == 503
    return response.body.decode()


# ------------------------------------------------------------------------------------------
# agent credentials


def write_token_file(path: Path, tokens: dict[str, str]) -> str:
    lines = ["# agents of the test hub", ""]
    lines += [f"{agent_id}   {token}  # issued today" for agent_id, token in tokens.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


TABLE = {"a1": "tok-a1-7f3e", "a2": "tok-a2-91bc"}


@pytest.fixture(params=["secret", "mapping", "file"])
def credentials(request: pytest.FixtureRequest, tmp_path: Path
                ) -> tuple[dict[str, Any], Callable[[str], str]]:
    """Hub settings that require tokens, and the token of each agent under them."""
    if request.param == "secret":
        return {"agent_secret": SECRET}, lambda agent_id: agent_token(SECRET, agent_id)
    if request.param == "mapping":
        return {"agent_tokens": dict(TABLE)}, TABLE.__getitem__
    path = write_token_file(tmp_path / "agents.tokens", TABLE)
    return {"agent_tokens": path}, TABLE.__getitem__


async def test_each_agent_is_admitted_with_its_own_token_only(
    memory_hub: MemoryHubFactory, credentials: tuple[dict[str, Any], Callable[[str], str]]
) -> None:
    settings, token_of = credentials
    hub = await memory_hub(**settings)
    assert hub.auth_required
    gone = Disconnects(hub)
    a1, welcome = await RawAgent.hello(ws_url(hub), "a1", token=token_of("a1"))
    await round_trip(hub, a1, "a1", "admitted")

    # A valid token for one agent never admits another id, in either direction.
    await hello_refused(hub, "a2", token_of("a1"))
    await hello_refused(hub, "a1", token_of("a2"))
    # Missing, empty, wrong-case, truncated and extended tokens.
    good = token_of("a1")
    for token in (None, "", good.upper() if good != good.upper() else good.lower(),
                  good[:-1], good + "0", " " + good, 12345, b"bytes"):
        if isinstance(token, bytes | int):
            # Not a string: the hello itself is malformed (bad_hello, 4400).
            raw = await RawAgent.connect(ws_url(hub))
            await raw.send({"t": "hello", "v": 1, "agent": "a1", "token": token})
            assert (await raw.recv())["code"] == "bad_hello"
            assert (await raw.closed())[0] == 4400
            continue
        await hello_refused(hub, "a1", token)
    # An id the hub has no credential for, even with an empty token.
    await hello_refused(hub, "ghost", "")
    await hello_refused(hub, "ghost", good)

    # No refused hello disturbed the agent already connected under that id.
    assert not gone.seen("a1")
    session = hub._connections.get("a1")
    assert session is not None and session.session_id == welcome["session"]
    await round_trip(hub, a1, "a1", "still the same connection")
    a2, _ = await RawAgent.hello(ws_url(hub), "a2", token=token_of("a2"))
    await round_trip(hub, a2, "a2", "me too")


async def test_secret_and_token_table_together_admit_either(memory_hub: MemoryHubFactory) -> None:
    hub = await memory_hub(agent_secret=SECRET, agent_tokens={"legacy": "tok-legacy"})
    for agent_id, token in (("legacy", "tok-legacy"), ("legacy", agent_token(SECRET, "legacy")),
                            ("new", agent_token(SECRET, "new"))):
        raw, _ = await RawAgent.hello(ws_url(hub), agent_id, token=token)
        await round_trip(hub, raw, agent_id, token)
        await raw.close()
    await hello_refused(hub, "new", "tok-legacy")
    await hello_refused(hub, "other", agent_token(SECRET, "new"))


async def test_agent_client_connects_with_its_token(
    memory_hub: MemoryHubFactory, make_agent: Callable[..., Agent]
) -> None:
    hub = await memory_hub(agent_secret=SECRET)
    agent = make_agent(ws_url(hub), "w1", token=agent_token(SECRET, "w1"))

    @agent.command("echo")
    async def echo(payload: Any, ctx: Any) -> Any:
        return payload

    await agent.start()
    await agent.wait_connected(WAIT)
    assert await hub.execute_on_agent("w1", "echo", [1, 2]).result(WAIT) == [1, 2]


def test_token_file_lines_are_checked_when_the_hub_is_built(tmp_path: Path) -> None:
    path = tmp_path / "bad.tokens"
    path.write_text("# ok\na1 tok1\na2 tok2 extra\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.tokens:3"):
        Dispatcher(HubConfig(port=0, admin_port=None, agent_tokens=str(path)))
    path.write_text("not/an/id tok\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.tokens:1"):
        Dispatcher(HubConfig(port=0, admin_port=None, agent_tokens=str(path)))
    with pytest.raises(FileNotFoundError):
        Dispatcher(HubConfig(port=0, admin_port=None, agent_tokens=str(tmp_path / "missing")))


def test_token_is_hex_hmac_sha256_of_the_agent_id() -> None:
    import hashlib
    import hmac

    expected = hmac.new(SECRET.encode(), b"worker-7", hashlib.sha256).hexdigest()
    assert agent_token(SECRET, "worker-7") == expected
    assert len(expected) == 64
    assert agent_token(SECRET, "worker-8") != expected
    assert agent_token(SECRET + "x", "worker-7") != expected


def test_token_command_prints_the_agent_token() -> None:
    runner = CliRunner()
    out = runner.invoke(cli_main, ["token", "worker-7", "--secret", SECRET])
    assert out.exit_code == 0, out.output
    assert out.stdout == agent_token(SECRET, "worker-7") + "\n"
    out = runner.invoke(cli_main, ["token", "worker-7"], env={"DISPATCHER_AGENT_SECRET": SECRET})
    assert (out.exit_code, out.stdout) == (0, agent_token(SECRET, "worker-7") + "\n")
    out = runner.invoke(cli_main, ["token", "worker-7"], env={"DISPATCHER_AGENT_SECRET": ""})
    assert out.exit_code != 0  # no secret: a usage error, not a token of the empty secret


async def test_hub_without_credentials_says_so_loudly(memory_hub: MemoryHubFactory) -> None:
    from structlog.testing import capture_logs

    with capture_logs() as logs:
        hub = await memory_hub()
    assert not hub.auth_required
    warnings = [e for e in logs if e["event"] == "agents_unauthenticated"]
    assert len(warnings) == 1 and warnings[0]["log_level"] == "warning"
    with capture_logs() as logs:
        await memory_hub(agent_secret=SECRET)
    assert not [e for e in logs if e["event"] == "agents_unauthenticated"]


@pytest.mark.parametrize("flags", [[], ["--agent-secret", SECRET]], ids=["open", "secret"])
async def test_serve_first_log_line_says_whether_agents_need_tokens(flags: list[str]) -> None:
    exe = Path(sys.executable).parent / "dispatcher"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
    proc = await asyncio.create_subprocess_exec(
        str(exe), "serve", "--port", "0", "--admin-port", "0", "--log-format", "json", *flags,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=env)
    lines: list[dict[str, Any]] = []
    try:
        assert proc.stderr is not None
        async with asyncio.timeout(15):
            while not lines or lines[-1]["event"] != "hub_listening":
                raw = await proc.stderr.readline()
                assert raw, f"serve exited early: {lines}"
                lines.append(json.loads(raw))
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            await proc.wait()
    first = lines[0]
    assert first["event"] == "hub_starting"
    unauthenticated = [e for e in lines if e["event"] == "agents_unauthenticated"]
    if flags:
        assert first["agent_auth"] == "required"
        assert not unauthenticated
    else:
        assert first["agent_auth"].startswith("NONE")
        assert unauthenticated and unauthenticated[0]["level"] == "warning"


# ------------------------------------------------------------------------------------------
# admin token (the admin API's own tests cover every route)


async def test_admin_api_needs_the_bearer_token(memory_hub: MemoryHubFactory) -> None:
    hub = await memory_hub(admin_token="adm-123")
    base = f"http://127.0.0.1:{hub.admin_port}"
    async with aiohttp.ClientSession() as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "adm-123"}):
            async with http.get(f"{base}/agents", headers=headers) as resp:
                assert resp.status == 401, headers
        async with http.get(f"{base}/agents",
                            headers={"Authorization": "Bearer adm-123"}) as resp:
            assert resp.status == 200
            assert await resp.json() == []
        async with http.get(f"{base}/healthz") as resp:
            assert resp.status == 200  # load balancers need no token


# ------------------------------------------------------------------------------------------
# TLS on both ports


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 and localhost, and its key."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "hub.crt", folder / "hub.key"
    openssl = shutil.which("openssl")
    if openssl is not None:
        subprocess.run(
            [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-days", "2", "-subj", "/CN=localhost",
             "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
             "-keyout", str(key), "-out", str(cert)],
            check=True, capture_output=True, timeout=30)
        return str(cert), str(key)
    _self_signed_with_cryptography(cert, key)
    return str(cert), str(key)


def _self_signed_with_cryptography(cert_path: Path, key_path: Path) -> None:
    """The same certificate without an ``openssl`` binary (needs ``cryptography``)."""
    pytest.importorskip("cryptography")
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))


async def test_tls_on_both_ports(
    memory_hub: MemoryHubFactory, make_agent: Callable[..., Agent], tls_files: tuple[str, str]
) -> None:
    certfile, keyfile = tls_files
    hub = await memory_hub(certfile=certfile, keyfile=keyfile, agent_secret=SECRET,
                           admin_token="adm")
    trusting = ssl.create_default_context(cafile=certfile)

    # An agent_client.Agent trusting the certificate runs a command over wss://.
    agent = make_agent(f"wss://127.0.0.1:{hub.port}/ws", "tls-1",
                       token=agent_token(SECRET, "tls-1"), ssl=trusting)

    @agent.command("echo")
    async def echo(payload: Any, ctx: Any) -> Any:
        return payload

    await agent.start()
    await agent.wait_connected(WAIT)
    payload = {"over": "tls", "raw": b"\x00\xff"}
    assert await hub.execute_on_agent("tls-1", "echo", payload).result(WAIT) == payload

    # The admin API and the agent port's /healthz answer over https.
    async with aiohttp.ClientSession() as http:
        async with http.get(f"https://127.0.0.1:{hub.admin_port}/healthz", ssl=trusting) as resp:
            assert resp.status == 200
            assert (await resp.json())["status"] == "ok"
        async with http.get(f"https://127.0.0.1:{hub.admin_port}/agents", ssl=trusting,
                            headers={"Authorization": "Bearer adm"}) as resp:
            assert resp.status == 200
            assert [a["id"] for a in await resp.json()] == ["tls-1"]
        async with http.get(f"https://127.0.0.1:{hub.port}/healthz", ssl=trusting) as resp:
            assert resp.status == 200
        # No plaintext fallback on either port.
        with pytest.raises(aiohttp.ClientError):
            async with http.get(f"http://127.0.0.1:{hub.admin_port}/healthz") as resp:
                await resp.read()

    with pytest.raises((InvalidHandshake, OSError, EOFError)):
        await RawAgent.connect(f"ws://127.0.0.1:{hub.port}/ws", open_timeout=WAIT)
    # A client that does not trust the certificate refuses the hub.
    with pytest.raises(ssl.SSLCertVerificationError):
        await RawAgent.connect(f"wss://127.0.0.1:{hub.port}/ws",
                               ssl=ssl.create_default_context(), open_timeout=WAIT)
    # The raw protocol over TLS, with the token check behind it.
    raw = await RawAgent.connect(f"wss://127.0.0.1:{hub.port}/ws", ssl=trusting)
    await raw.send({"t": "hello", "v": 1, "agent": "tls-2", "token": "wrong"})
    assert (await raw.recv())["code"] == "unauthorized"
    assert (await raw.closed())[0] == 4401


async def test_agent_without_an_ssl_context_trusts_the_system_store(
    memory_hub: MemoryHubFactory, make_agent: Callable[..., Agent], tls_files: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch
) -> None:
    # What `dispatcher-agent --url wss://...` does: no context of its own, so the
    # default one, which honours SSL_CERT_FILE (here: the test's certificate).
    certfile, keyfile = tls_files
    monkeypatch.setenv("SSL_CERT_FILE", certfile)
    hub = await memory_hub(certfile=certfile, keyfile=keyfile)
    agent = make_agent(f"wss://127.0.0.1:{hub.port}/ws", "tls-3")

    @agent.command("echo")
    async def echo(payload: Any, ctx: Any) -> Any:
        return payload

    await agent.start()
    await agent.wait_connected(WAIT)
    assert await hub.execute_on_agent("tls-3", "echo", "system trust").result(WAIT) == \
        "system trust"


def test_tls_context_is_built_from_the_files(tls_files: tuple[str, str]) -> None:
    certfile, keyfile = tls_files
    ctx = HubConfig(certfile=certfile, keyfile=keyfile).ssl_context()
    assert isinstance(ctx, ssl.SSLContext)
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert HubConfig().ssl_context() is None
    given = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    assert HubConfig(ssl=given, certfile=certfile, keyfile=keyfile).ssl_context() is given


# ------------------------------------------------------------------------------------------
# limits


async def test_commands_in_flight_per_agent_are_bounded(make_hub: HubFactory) -> None:
    hub = await make_hub(max_inflight_per_agent=2)
    first = [hub.execute_on_agent("busy", "work", i, timeout=WAIT) for i in range(2)]
    for handle in first:
        await handle.submitted()
    extra = hub.execute_on_agent("busy", "work", 2, timeout=WAIT)
    with pytest.raises(TooManyCommands):
        await extra.submitted()
    with pytest.raises(TooManyCommands):
        await extra.result(WAIT)
    assert await hub.get_command(extra.id) is None  # refused, nothing stored
    assert [c.payload for c in await hub.list_pending_commands("busy")] == [0, 1]
    # The bound is per agent: another agent is not affected.
    other = hub.execute_on_agent("idle", "work", "x", timeout=WAIT)
    await other.submitted()

    # Once one completes there is room again.
    busy, _ = await RawAgent.hello(ws_url(hub), "busy")
    cmd = await busy.recv_type("cmd")
    await busy.send({"t": "result", "id": cmd["id"], "data": "done"})
    assert await first[0].result(WAIT) == "done"
    again = hub.execute_on_agent("busy", "work", 3, timeout=WAIT)
    await again.submitted()


async def test_frame_rate_limit_answers_rate_limited_then_closes_1008(
    memory_hub: MemoryHubFactory
) -> None:
    hub = await memory_hub(max_frame_rate=50, rate_limit_grace=0.3)
    gone = Disconnects(hub)
    calm, _ = await RawAgent.hello(ws_url(hub), "calm")
    flooder, _ = await RawAgent.hello(ws_url(hub), "flooder")
    sent = 0

    async def flood() -> None:
        nonlocal sent
        with contextlib.suppress(ConnectionClosed):
            while True:  # ends when the hub closes the connection (bounded below)
                await flooder.send({"t": "sub", "keys": ["k"]})  # answered by nothing
                sent += 1
                await asyncio.sleep(0)

    task = asyncio.create_task(flood())
    try:
        first = await flooder.recv()
        assert (first["t"], first["code"]) == ("error", "rate_limited"), first
        # Over the rate for longer than the grace: closed with 1008 (policy violation).
        code, reason = await flooder.closed(WAIT)
        assert code == 1008, (code, reason, sent)
        async with asyncio.timeout(WAIT):
            await task
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert sent > 50
    assert await gone.reason("flooder") == "policy_violation"
    # The other connection never noticed.
    await round_trip(hub, calm, "calm", "unaffected")
    assert hub._connections.get("calm") is not None


async def test_a_burst_over_the_frame_rate_that_ends_is_forgiven(
    memory_hub: MemoryHubFactory
) -> None:
    hub = await memory_hub(max_frame_rate=50, rate_limit_grace=0.3)
    agent, _ = await RawAgent.hello(ws_url(hub), "bursty")
    for _ in range(120):  # more than one second's worth, at once
        await agent.send({"t": "sub", "keys": ["k"]})
    frame = await agent.recv()
    assert frame["code"] == "rate_limited"
    # Quiet for longer than the grace: the connection stays (an absence, proven by waiting).
    await agent.expect_silence(1.2)
    await round_trip(hub, agent, "bursty", "forgiven")
    await agent.send({"t": "sub", "keys": ["k2"]})
    await round_trip(hub, agent, "bursty", "still open")


async def test_max_agents_answers_503_on_the_next_connection(
    memory_hub: MemoryHubFactory
) -> None:
    hub = await memory_hub(max_agents=2)
    gone = Disconnects(hub)
    a, _ = await RawAgent.hello(ws_url(hub), "a")
    b, _ = await RawAgent.hello(ws_url(hub), "b")
    assert "max_agents" in await refused_503(ws_url(hub))
    async with aiohttp.ClientSession() as http, \
            http.get(f"http://127.0.0.1:{hub.port}/healthz") as resp:
        assert resp.status == 200  # load balancers still get an answer
    await round_trip(hub, a, "a", "unaffected")
    # One leaves: there is room again.
    await b.close()
    await gone.reason("b")
    c, _ = await RawAgent.hello(ws_url(hub), "c")
    await round_trip(hub, c, "c", "admitted")


async def test_max_agents_counts_connections_still_in_their_handshake(
    memory_hub: MemoryHubFactory
) -> None:
    hub = await memory_hub(max_agents=2)
    opened = [await RawAgent.connect(ws_url(hub)) for _ in range(2)]
    await refused_503(ws_url(hub))
    for i, raw in enumerate(opened):
        await raw.send({"t": "hello", "v": 1, "agent": f"h{i}", "token": None})
        assert (await raw.recv())["t"] == "welcome"
    assert hub.connected_count == 2
    await refused_503(ws_url(hub))


async def test_max_handshakes_answers_503(memory_hub: MemoryHubFactory) -> None:
    hub = await memory_hub(max_handshakes=2, hello_timeout=5.0)
    mute = [await RawAgent.connect(ws_url(hub)) for _ in range(2)]
    assert "handshake" in await refused_503(ws_url(hub))
    # Connected agents do not count against the handshake limit ...
    await mute[0].send({"t": "hello", "v": 1, "agent": "m0", "token": None})
    assert (await mute[0].recv())["t"] == "welcome"
    # ... so a slot is free again.
    late = await RawAgent.connect(ws_url(hub))
    await refused_503(ws_url(hub))
    await late.send({"t": "hello", "v": 1, "agent": "late", "token": None})
    assert (await late.recv())["t"] == "welcome"
    await round_trip(hub, mute[0], "m0", "ok")


async def test_a_reader_that_does_not_read_is_disconnected(memory_hub: MemoryHubFactory) -> None:
    limit = 256 * 1024
    hub = await memory_hub(max_send_buffer=limit)
    gone = Disconnects(hub)
    reader, _ = await RawAgent.hello(ws_url(hub), "reader")
    sloth, _ = await RawAgent.hello(ws_url(hub), "sloth")
    # The sloth stops reading: its kernel buffers fill, then the hub's write buffer.
    sock = sloth.ws.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sloth.ws.transport.pause_reading()

    blob = b"\xab" * (128 * 1024)
    frame_size = len(blob) + 64
    peak = 0
    broadcasts = 0
    while not gone.seen("sloth"):
        assert broadcasts < 400, f"not disconnected after {broadcasts} broadcasts (peak {peak})"
        await hub.broadcast("blob", blob)
        broadcasts += 1
        session = hub._connections.get("sloth")
        if session is not None:
            assert isinstance(session, WsSession)
            peak = max(peak, session.buffered())
        # The reader keeps up (and paces the loop, so the writes really happen).
        event = await reader.recv_type("event")
        assert event["data"] == blob
    assert await gone.reason("sloth") == "send_buffer_overflow"
    # Memory for the sloth never grew past the bound plus the frame that crossed it.
    assert peak <= limit + frame_size, (peak, limit)
    assert hub._connections.get("sloth") is None
    assert b'reason="send_buffer_overflow"' in hub.metrics.render()

    # Later broadcasts hold nothing for it; the reader still gets every one.
    for _ in range(20):
        await hub.broadcast("blob", blob)
        assert (await reader.recv_type("event"))["data"] == blob
        sessions = [hub._connections.get(agent_id) for agent_id in hub._connections.ids()]
        assert sum(s.buffered() for s in sessions if isinstance(s, WsSession)) <= limit
    assert hub._connections.ids() == ["reader"]
    await round_trip(hub, reader, "reader", "fine")
    sloth.ws.transport.abort()  # its side; the hub's side is long gone


# ------------------------------------------------------------------------------------------
# what one agent cannot do to another


async def test_an_agent_cannot_answer_another_agents_command(make_hub: HubFactory) -> None:
    hub = await make_hub()
    alice, _ = await RawAgent.hello(ws_url(hub), "alice")
    mallory, _ = await RawAgent.hello(ws_url(hub), "mallory")
    handle = hub.execute_on_agent("alice", "transfer", {"amount": 10}, timeout=WAIT)
    cmd = await alice.recv_type("cmd")
    await alice.send({"t": "ack", "id": cmd["id"]})

    seen: list[Any] = []

    async def follow() -> None:
        async for update in handle.progress():
            seen.append(update)

    follower = asyncio.create_task(follow())
    forged = [
        {"t": "ack", "id": cmd["id"]},
        {"t": "progress", "id": cmd["id"], "data": "forged"},
        {"t": "result", "id": cmd["id"], "data": "forged"},
        {"t": "fail", "id": cmd["id"], "error": {"code": "forged", "message": "m"}},
    ]
    for frame in forged:
        await mallory.send(frame)
    got = Counter()
    for _ in forged:
        frame = await mallory.recv()
        assert frame["t"] == "error", frame
        got[frame["code"], frame.get("ref")] += 1
    assert got == Counter({("unknown_command", cmd["id"]): len(forged)})
    stored = await hub.get_command(cmd["id"])
    assert stored is not None and stored.status == "ACTIVE" and stored.agent_id == "alice"
    assert not handle.done()

    await alice.send({"t": "progress", "id": cmd["id"], "data": "real"})
    await alice.send({"t": "result", "id": cmd["id"], "data": "alice's"})
    assert await handle.result(WAIT) == "alice's"
    async with asyncio.timeout(WAIT):
        await follower
    assert seen == ["real"]
    # Mallory got no command frame at all.
    await mallory.expect_silence(0.1)


async def test_an_agent_emits_only_as_itself(make_hub: HubFactory) -> None:
    hub = await make_hub()
    heard: asyncio.Queue[tuple[Any, str]] = asyncio.Queue()
    hub.on("news", lambda data, sender: heard.put_nowait((data, sender)))
    listener, _ = await RawAgent.hello(ws_url(hub), "listener", subs=["news"])
    mallory, _ = await RawAgent.hello(ws_url(hub), "mallory")

    # Extra fields claiming another sender are ignored (docs/protocol.md: unknown fields).
    await mallory.send({"t": "emit", "key": "news", "data": 1, "from": "alice",
                        "sender": "alice", "agent": "alice"})
    event = await listener.recv_type("event")
    assert (event["key"], event["data"], event["from"]) == ("news", 1, "mallory")
    async with asyncio.timeout(WAIT):
        assert await heard.get() == (1, "mallory")
    # The same when addressed.
    await mallory.send({"t": "emit", "key": "direct", "data": 2, "to": ["listener"],
                        "from": "alice"})
    event = await listener.recv_type("event")
    assert (event["key"], event["from"]) == ("direct", "mallory")


@pytest.mark.parametrize("key", ["agent-connected", "agent-disconnected", "internal.db.error",
                                 "internal.anything"])
async def test_an_agent_cannot_emit_reserved_keys(make_hub: HubFactory, key: str) -> None:
    hub = await make_hub()
    raised: list[Any] = []
    hub.on(key, lambda *args: raised.append(args))
    listener, _ = await RawAgent.hello(ws_url(hub), "listener", subs=["*"])
    mallory, _ = await RawAgent.hello(ws_url(hub), "mallory")
    await mallory.send({"t": "emit", "key": key, "data": {"id": "victim"}})
    frame = await mallory.recv()
    assert (frame["t"], frame["code"]) == ("error", "reserved_key"), frame
    await mallory.send({"t": "emit", "key": key, "data": None, "to": ["listener"]})
    assert (await mallory.recv())["code"] == "reserved_key"
    await mallory.send({"t": "sub", "keys": ["internal.*"]})
    assert (await mallory.recv())["code"] == "reserved_key"
    await listener.expect_silence(0.1)
    # Only the hub raised it (with an AgentInfo), never the agent (data, sender).
    assert all(isinstance(args[0], AgentInfo) for args in raised), raised
    assert hub._connections.get("mallory") is not None  # refused, not disconnected


async def test_an_agent_cannot_take_another_agents_session(memory_hub: MemoryHubFactory) -> None:
    hub = await memory_hub(agent_secret=SECRET)
    gone = Disconnects(hub)
    alice, alice_welcome = await RawAgent.hello(ws_url(hub), "alice",
                                                token=agent_token(SECRET, "alice"))
    # Mallory's own valid token does not let it connect as alice (which would replace her).
    await hello_refused(hub, "alice", agent_token(SECRET, "mallory"))
    await hello_refused(hub, "alice", agent_token(SECRET, "mallory"),
                        session=alice_welcome["session"])
    # Naming alice's session in its own hello gives mallory a session of its own.
    mallory, welcome = await RawAgent.hello(ws_url(hub), "mallory",
                                            token=agent_token(SECRET, "mallory"),
                                            session=alice_welcome["session"])
    assert welcome["session"] != alice_welcome["session"]
    assert not gone.seen("alice")
    sessions = {a.id: a.session for a in await hub.list_connected_agents()}
    assert sessions == {"alice": alice_welcome["session"], "mallory": welcome["session"]}
    await round_trip(hub, alice, "alice", "still mine")
    await round_trip(hub, mallory, "mallory", "mine")


async def test_handshakes_wait_their_turn_at_the_gate(memory_hub: MemoryHubFactory) -> None:
    """With ``handshake_concurrency`` slots taken, the next upgrade waits (not 503) and
    is answered as soon as a slot's hello is handled, in order of arrival."""
    hub = await memory_hub(handshake_concurrency=1, hello_timeout=5.0)
    first = await RawAgent.connect(ws_url(hub))  # holds the one slot: no hello yet
    second = asyncio.create_task(RawAgent.connect(ws_url(hub)))
    third = asyncio.create_task(RawAgent.connect(ws_url(hub)))
    # Neither is upgraded while the slot is taken (well under HANDSHAKE_TURN).
    done, _ = await asyncio.wait({second, third}, timeout=0.3)
    assert not done
    await first.send({"t": "hello", "v": 1, "agent": "g0", "token": None})
    assert (await first.recv())["t"] == "welcome"
    raw = await asyncio.wait_for(second, WAIT)  # its turn came with that hello
    assert not third.done()
    await raw.send({"t": "hello", "v": 1, "agent": "g1", "token": None})
    assert (await raw.recv())["t"] == "welcome"
    last = await asyncio.wait_for(third, WAIT)
    await last.send({"t": "hello", "v": 1, "agent": "g2", "token": None})
    assert (await last.recv())["t"] == "welcome"
    assert hub.connected_count == 3


async def test_a_peer_that_never_says_hello_holds_the_gate_one_turn_at_most(
        memory_hub: MemoryHubFactory) -> None:
    from dispatcher.transport import HANDSHAKE_TURN

    hub = await memory_hub(handshake_concurrency=1, hello_timeout=30.0)
    loop = asyncio.get_running_loop()
    mute = await RawAgent.connect(ws_url(hub))
    started = loop.time()
    agent = await asyncio.wait_for(RawAgent.connect(ws_url(hub)), HANDSHAKE_TURN + WAIT)
    waited = loop.time() - started
    assert waited >= HANDSHAKE_TURN * 0.8, waited  # it did wait for the mute one's turn
    await agent.send({"t": "hello", "v": 1, "agent": "patient", "token": None})
    assert (await agent.recv())["t"] == "welcome"
    # The mute connection is still bound by hello_timeout, not dropped by the gate.
    assert not mute.ws.close_code


async def test_waiting_connections_count_against_max_handshakes(
        memory_hub: MemoryHubFactory) -> None:
    hub = await memory_hub(handshake_concurrency=1, max_handshakes=2, hello_timeout=5.0)
    first = await RawAgent.connect(ws_url(hub))
    waiting = asyncio.create_task(RawAgent.connect(ws_url(hub)))
    gate = hub._agents_server._gate
    await wait_for(lambda: len(gate.waiters) == 1, what="the second connection at the gate")
    assert "handshake" in await refused_503(ws_url(hub))
    await first.send({"t": "hello", "v": 1, "agent": "w0", "token": None})
    assert (await first.recv())["t"] == "welcome"
    raw = await asyncio.wait_for(waiting, WAIT)
    await raw.send({"t": "hello", "v": 1, "agent": "w1", "token": None})
    assert (await raw.recv())["t"] == "welcome"


async def test_a_connection_that_left_while_waiting_costs_no_turn(
        memory_hub: MemoryHubFactory) -> None:
    from dispatcher.transport import HANDSHAKE_TURN

    hub = await memory_hub(handshake_concurrency=1, hello_timeout=5.0)
    gate = hub._agents_server._gate
    first = await RawAgent.connect(ws_url(hub))
    # A client that asks for the upgrade, waits at the gate, and goes away.
    reader, writer = await asyncio.open_connection("127.0.0.1", hub.port)
    writer.write(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                 b"Sec-WebSocket-Version: 13\r\n\r\n")
    await writer.drain()
    await wait_for(lambda: len(gate.waiters) == 1, what="the leaving client at the gate")
    writer.close()
    await writer.wait_closed()
    patient = asyncio.create_task(RawAgent.connect(ws_url(hub)))
    await wait_for(lambda: len(gate.waiters) == 2, what="the patient client at the gate")
    loop = asyncio.get_running_loop()
    await first.send({"t": "hello", "v": 1, "agent": "l0", "token": None})
    assert (await first.recv())["t"] == "welcome"
    started = loop.time()
    raw = await asyncio.wait_for(patient, WAIT)
    assert loop.time() - started < HANDSHAKE_TURN / 2  # not a turn lost to the gone one
    await raw.send({"t": "hello", "v": 1, "agent": "l1", "token": None})
    assert (await raw.recv())["t"] == "welcome"
    del reader
