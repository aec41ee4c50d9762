"""``Agent``: the asyncio agent library (connect, serve commands, reconnect forever).

One persistent WebSocket to a hub from a list of URLs. Commands run as tasks
under a concurrency bound, so a slow handler never blocks the read loop.
Each command id runs at most once per process: a redelivered command that is
still running is only acked, one that finished gets its stored answer again
(docs/protocol.md, Commands and redelivery). Answers computed while the connection was
down are sent when the hub redelivers after the reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import os
import ssl as ssl_module
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any

import structlog
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.connection import broadcast
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from . import protocol as P
from .backoff import backoff
from .errors import (
    AgentOffline,
    AgentRefused,
    AgentReplaced,
    CommandCancelled,
    CommandError,
    CommandFailed,
    CommandTimeout,
    DispatcherError,
    HelloRefused,
    NotConnected,
)

__all__ = ["Agent", "CommandContext", "CommandHandler", "EventContext", "EventHandler"]

log = structlog.get_logger(__name__)

CommandHandler = Callable[[Any, "CommandContext"], Awaitable[Any] | Any]
EventHandler = Callable[[Any, "EventContext"], Awaitable[None] | None]
Hook = Callable[[], Awaitable[None] | None]

# An answer the hub could not apply (error `internal`) is sent again after
# 1 s, 2 s, ... this many times (the hub's store is usually back by then).
_ANSWER_RETRIES = 5
_ANSWER_RETRY_DELAY = 1.0

# Close codes after which reconnecting would be wrong (docs/protocol.md, Close codes).
_FINAL_CLOSE_CODES = frozenset({int(P.CloseCode.REPLACED)})
# Refusals that the same hello would get again: run() raises AgentRefused.
_FINAL_REFUSALS = frozenset({P.ErrorCode.UNAUTHORIZED, P.ErrorCode.UNSUPPORTED_VERSION})


class CommandContext:
    """What a command handler knows about its command."""

    __slots__ = ("_agent", "_cancelled", "deadline", "id", "key", "ts")

    def __init__(self, agent: Agent, frame: P.CmdFrame) -> None:
        self._agent = agent
        self.id = frame.id
        self.key = frame.key
        self.ts = frame.ts
        self.deadline = frame.deadline
        self._cancelled = False

    @property
    def cancelled(self) -> bool:
        """True once the hub sent ``cancel`` (timeout, operator, drop)."""
        return self._cancelled

    async def progress(self, data: Any) -> None:
        """Send a progress update; dropped (not queued) while disconnected."""
        await self._agent._send_soft(P.encode(P.ProgressFrame(self.id, data)))


class EventContext:
    """What an event handler knows about its event."""

    __slots__ = ("id", "key", "sender")

    def __init__(self, frame: P.EventFrame) -> None:
        self.key = frame.key
        self.sender = frame.sender  # the emitting agent, None for the hub's own events
        self.id = frame.id


class Agent:
    """An agent. Register handlers with :meth:`command`, then ``await agent.run()``.

    ``urls`` is one hub URL or a list (``ws://host:8080/ws``); on every
    reconnect the next one is tried, with exponential backoff and jitter.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        agent_id: str,
        *,
        token: str | None = None,
        meta: dict[str, Any] | None = None,
        max_concurrency: int = 64,
        ssl: ssl_module.SSLContext | None = None,
        heartbeat: float = 20.0,
        open_timeout: float = 10.0,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        result_cache: int = 10_000,
        max_frame: int = 16 * 1024 * 1024,
    ) -> None:
        if not P.is_valid_agent_id(agent_id):
            raise ValueError(f"invalid agent id {agent_id!r}")
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise ValueError("at least one hub URL is needed")
        self.agent_id = agent_id
        self.token = token
        self.meta = dict(meta or {})
        try:  # the hub refuses a meta too deep or too big (bad_hello): say so now
            P.HelloFrame.parse({"v": P.PROTOCOL_VERSION, "agent": agent_id, "meta": self.meta})
        except P.ProtocolError as exc:
            raise ValueError(exc.message) from None
        self.ssl = ssl
        self.heartbeat = heartbeat
        self.open_timeout = open_timeout
        self.max_frame = max_frame
        backoff(backoff_initial, backoff_max)  # refuse bad settings now, not at a reconnect
        self._backoff = (backoff_initial, backoff_max)
        self._handlers: dict[str, CommandHandler] = {}
        self._event_handlers: list[tuple[str, EventHandler]] = []
        self._subs: set[str] = set()
        self._calls: dict[str, asyncio.Future[Any]] = {}
        self._call_ids = itertools.count(1)
        # Call ids must not repeat across restarts of this agent: the hub keeps
        # a call's outcome under (agent id, call id) for its retention period.
        self._call_prefix = os.urandom(4).hex()
        self._call_frames: dict[str, bytes] = {}
        self._slots = asyncio.Semaphore(max_concurrency)
        self._running: dict[str, tuple[asyncio.Task[None], CommandContext]] = {}
        # id -> stored terminal frame (None: ended without one, e.g. cancelled)
        self._finished: OrderedDict[str, bytes | None] = OrderedDict()
        self._result_cache = result_cache
        self._seen_events: OrderedDict[str, None] = OrderedDict()
        self._answer_retries: dict[str, int] = {}
        self._ws: ClientConnection | None = None
        self._connected = asyncio.Event()
        self._stopping = False
        self._loop_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._url_cycle = itertools.cycle(self.urls)
        self.session: str | None = None
        self.hub_id: str | None = None
        self.last_close_code: int | None = None  # of the last connection that ended
        self.on_connect: Hook | None = None
        self.on_disconnect: Hook | None = None

    # -- registration ---------------------------------------------------------
    def command(self, key: str) -> Callable[[CommandHandler], CommandHandler]:
        """Decorator: ``@agent.command("resize")`` on ``async def f(payload, ctx)``."""

        def register(fn: CommandHandler) -> CommandHandler:
            self._handlers[key] = fn
            return fn

        return register

    def add_command(self, key: str, fn: CommandHandler) -> None:
        self._handlers[key] = fn

    def on(self, key: str) -> Callable[[EventHandler], EventHandler]:
        """Decorator: ``@agent.on("config.*")`` on ``async def f(data, ctx)``; subscribes.

        The subscription is sent now if connected, and with every (re)connect.
        """

        def register(fn: EventHandler) -> EventHandler:
            self._event_handlers.append((key, fn))
            if key not in self._subs:
                self._subs.add(key)
                if self._ws is not None:
                    self._send_now(P.encode(P.SubFrame((key,))))
            return fn

        return register

    # -- events and calls ------------------------------------------------------
    async def emit(self, key: str, data: Any = None, to: Sequence[str] | None = None) -> None:
        """Emit an event: to the agents subscribed to ``key``, or to the ``to`` list."""
        await self.send_frame(P.EmitFrame(key, data, tuple(to) if to is not None else None))

    async def subscribe(self, *keys: str) -> None:
        """Receive events with these keys (``prefix*`` matches a prefix); kept across reconnects."""
        new = tuple(k for k in keys if k not in self._subs)
        self._subs.update(new)
        if new and self._ws is not None:
            await self._send_soft(P.encode(P.SubFrame(new)))

    async def unsubscribe(self, *keys: str) -> None:
        gone = tuple(k for k in keys if k in self._subs)
        self._subs.difference_update(gone)
        if gone and self._ws is not None:
            await self._send_soft(P.encode(P.UnsubFrame(gone)))

    async def call(self, target_agent: str, key: str, payload: Any = None,
                   timeout: float | None = None) -> Any:
        """Run a command on another agent through the hub; its result, or the hub's errors
        (``CommandFailed``, ``CommandTimeout``, ``AgentOffline``, ``CommandCancelled``).

        The hub enforces ``timeout``; a reply that arrives while this agent is
        reconnecting is queued by the hub and still resolves the call.
        """
        if not P.is_valid_agent_id(target_agent):
            raise ValueError(f"invalid agent id {target_agent!r}")
        call_id = f"c{self._call_prefix}-{next(self._call_ids)}"
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        frame = P.CallFrame(call_id, target_agent, key, payload, timeout)
        self._calls[call_id] = fut
        try:
            await self.send_frame(frame)
            # Sent again after every reconnect until answered: the reply may be
            # lost with a connection that died silently. The hub runs it once.
            self._call_frames[call_id] = P.encode(frame)
            # The hub answers timeout itself; this bound only guards against a
            # hub that vanished for good.
            limit = None if timeout is None else timeout + 30.0
            async with asyncio.timeout(limit):
                return await fut
        finally:
            self._calls.pop(call_id, None)
            self._call_frames.pop(call_id, None)

    # -- lifecycle ------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until the handshake with a hub is done."""
        await asyncio.wait_for(self._connected.wait(), timeout)

    async def start(self) -> None:
        """Start connecting in the background; returns at once."""
        if self._loop_task is None or self._loop_task.done():
            self._stopping = False
            self._loop_task = asyncio.get_running_loop().create_task(
                self._connect_loop(), name=f"agent:{self.agent_id}"
            )

    async def run(self) -> None:
        """Connect, serve and reconnect until :meth:`stop`. Raises ``AgentReplaced``
        (another connection took this id, 4409) and ``AgentRefused`` (the hub refused
        the credential or the protocol version: retrying would not help)."""
        await self.start()
        assert self._loop_task is not None
        await self._loop_task

    async def stop(self, timeout: float = 0.0) -> None:
        """Stop; idempotent. With ``timeout`` > 0, first drain: take no new command
        (the hub keeps it for later), let the running ones end for up to
        ``timeout`` seconds and send their answers; then close the connection
        (1000) and cancel what still runs."""
        self._stopping = True
        running = [t for t, _ in self._running.values()]
        if timeout > 0 and running:
            log.info("agent_draining", agent_id=self.agent_id, running=len(running),
                     timeout=timeout)
            _, late = await asyncio.wait(running, timeout=timeout)
            if late:
                log.warning("agent_drain_timeout", agent_id=self.agent_id, cancelled=len(late))
        ws = self._ws
        if ws is not None:
            await ws.close(P.CloseCode.NORMAL, "agent stopping")
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
            self._loop_task = None
        tasks = [t for t, _ in self._running.values()] + list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._running.clear()

    async def __aenter__(self) -> Agent:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- connection loop ------------------------------------------------------
    async def _connect_loop(self) -> None:
        delays = backoff(*self._backoff)
        while not self._stopping:
            url = next(self._url_cycle)
            served = False
            try:
                async with connect(
                    url,
                    open_timeout=self.open_timeout,
                    ping_interval=self.heartbeat,
                    ping_timeout=self.heartbeat,
                    close_timeout=min(5.0, self.heartbeat),
                    max_size=self.max_frame,
                    compression=None,
                    # wss:// without a context of ours: the default one (system
                    # trust, SSL_CERT_FILE); websockets refuses ssl=None there.
                    ssl=(self.ssl or True) if url.startswith("wss:") else None,
                ) as ws:
                    served = await self._serve(ws)
            except HelloRefused as exc:
                log.error("hello_refused", agent_id=self.agent_id, url=url, code=exc.code,
                          error=exc.message)
                if exc.code in _FINAL_REFUSALS:
                    raise AgentRefused(exc.code, exc.message) from None
            except AgentReplaced:
                log.error("agent_replaced", agent_id=self.agent_id, url=url)
                raise
            except (OSError, InvalidHandshake, InvalidURI, ConnectionClosed, TimeoutError) as exc:
                log.info("connect_failed", agent_id=self.agent_id, url=url,
                         error=f"{type(exc).__name__}: {exc}")
            if self._stopping:
                break
            if served:
                delays = backoff(*self._backoff)  # a good session resets the backoff
            await asyncio.sleep(next(delays))

    async def _serve(self, ws: ClientConnection) -> bool:
        """Handshake, then read frames until the connection ends. True if welcomed."""
        hello = P.HelloFrame(v=P.PROTOCOL_VERSION, agent=self.agent_id, token=self.token,
                             meta=self.meta or None, subs=tuple(sorted(self._subs)))
        await ws.send(P.encode(hello))
        async with asyncio.timeout(self.open_timeout):
            first = P.decode(await ws.recv())
        if isinstance(first, P.ErrorFrame):
            raise HelloRefused(first.code, first.message)
        if not isinstance(first, P.WelcomeFrame):
            raise HelloRefused(P.ErrorCode.BAD_FRAME, f"expected 'welcome', got {first.TYPE!r}")
        self._ws = ws
        self.session = first.session
        self.hub_id = first.hub
        self._connected.set()
        log.info("agent_connected", agent_id=self.agent_id, hub=first.hub, session=first.session)
        for data in list(self._call_frames.values()):
            self._send_now(data)
        # Hooks run beside the read loop: a hook that awaits a call must not
        # keep the reply from being read.
        self._spawn_hook(self.on_connect)
        try:
            async for message in ws:
                try:
                    frame = P.decode(message)
                except P.ProtocolError as exc:
                    log.warning("bad_frame_from_hub", agent_id=self.agent_id, error=exc.message)
                    continue
                self._on_frame(frame)
        except ConnectionClosed:
            pass
        finally:
            self._ws = None
            self._connected.clear()
            code = self.last_close_code = ws.close_code
            log.info("agent_disconnected", agent_id=self.agent_id, code=code,
                     reason=ws.close_reason)
            self._spawn_hook(self.on_disconnect)
        if ws.close_code in _FINAL_CLOSE_CODES:
            raise AgentReplaced(f"agent {self.agent_id!r} was replaced by a newer connection")
        return True

    def _spawn_hook(self, hook: Hook | None) -> None:
        if hook is not None:
            task = asyncio.get_running_loop().create_task(self._run_hook(hook))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run_hook(self, hook: Hook | None) -> None:
        if hook is None:
            return
        try:
            out = hook()
            if inspect.isawaitable(out):
                await out
        except Exception:
            log.exception("agent_hook_failed", agent_id=self.agent_id)

    # -- frames from the hub --------------------------------------------------
    def _on_frame(self, frame: P.Frame) -> None:
        if isinstance(frame, P.CmdFrame):
            self._on_cmd(frame)
        elif isinstance(frame, P.CancelFrame):
            self._on_cancel(frame.id)
        elif isinstance(frame, P.ErrorFrame):
            log.warning("hub_error", agent_id=self.agent_id, code=frame.code,
                        message=frame.message, ref=frame.ref)
            # A refused call frame gets an error, never a reply: fail the call now
            # instead of leaving it waiting. (unknown_command refs are command ids.)
            fut = self._calls.get(frame.ref) if isinstance(frame.ref, str) else None
            if fut is not None and not fut.done() and frame.code != P.ErrorCode.UNKNOWN_COMMAND:
                fut.set_exception(CommandFailed(frame.code, frame.message))
            elif frame.code == P.ErrorCode.INTERNAL and isinstance(frame.ref, str):
                self._retry_answer(frame.ref)
        else:
            self._on_other_frame(frame)

    def _on_other_frame(self, frame: P.Frame) -> None:
        if isinstance(frame, P.EventFrame):
            self._on_event(frame)
        elif isinstance(frame, P.ReplyFrame):
            fut = self._calls.get(frame.id)
            if fut is not None and not fut.done():
                if frame.ok:
                    fut.set_result(frame.data)
                else:
                    fut.set_exception(_call_error(frame.error or {}))
        else:
            log.debug("frame_ignored", agent_id=self.agent_id, type=frame.TYPE)

    def _on_event(self, frame: P.EventFrame) -> None:
        if frame.id is not None:
            # The receipt is the library's job, sent on arrival (docs/protocol.md,
            # Events and receipts).
            self._send_now(P.encode(P.ReceivedFrame(frame.id)))
            # An event whose receipt was lost with a connection comes again: it
            # is acknowledged again, but its handlers run once.
            if frame.id in self._seen_events:
                return
            self._seen_events[frame.id] = None
            if len(self._seen_events) > self._result_cache:
                self._seen_events.popitem(last=False)
        ctx = EventContext(frame)
        for pattern, handler in self._event_handlers:
            if P.key_matches(pattern, frame.key):
                task = asyncio.get_running_loop().create_task(
                    self._run_event_handler(handler, frame.data, ctx))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _run_event_handler(self, handler: EventHandler, data: Any,
                                 ctx: EventContext) -> None:
        async with self._slots:
            try:
                out = handler(data, ctx)
                if inspect.isawaitable(out):
                    await out
            except Exception:
                log.exception("event_handler_failed", agent_id=self.agent_id, key=ctx.key)

    def _on_cmd(self, frame: P.CmdFrame) -> None:
        if self._stopping:
            return  # draining: not taken, not acked; the hub keeps it PENDING
        running = self._running.get(frame.id)
        if running is not None:
            self._send_now(P.encode(P.AckFrame(frame.id)))  # still running: ack only
            return
        if frame.id in self._finished:
            stored = self._finished[frame.id]
            if stored is not None:
                self._send_now(stored)  # finished: the stored answer again
            return
        ctx = CommandContext(self, frame)
        task = asyncio.get_running_loop().create_task(self._run_command(frame, ctx))
        self._running[frame.id] = (task, ctx)
        # Ack only if the handler did not finish in its first step: a quick
        # command answers with its terminal frame alone (docs/protocol.md allows it).
        asyncio.get_running_loop().call_soon(self._maybe_ack, frame.id, task)

    def _maybe_ack(self, cmd_id: str, task: asyncio.Task[None]) -> None:
        if not task.done():
            self._send_now(P.encode(P.AckFrame(cmd_id)))

    def _on_cancel(self, cmd_id: str) -> None:
        running = self._running.pop(cmd_id, None)
        if running is None:
            return
        task, ctx = running
        ctx._cancelled = True
        self._remember(cmd_id, None)
        task.cancel()

    async def _run_command(self, frame: P.CmdFrame, ctx: CommandContext) -> None:
        answer: bytes
        async with self._slots:
            handler = self._handlers.get(frame.key)
            try:
                if handler is None:
                    raise CommandError("unknown_key", f"this agent has no command {frame.key!r}")
                out = handler(frame.payload, ctx)
                if inspect.isawaitable(out):
                    out = await out
                answer = P.encode(P.ResultFrame(frame.id, out))
            except CommandError as exc:
                # The hub refuses an empty code (bad_frame): never leave it unanswered.
                code, message = str(exc.code) or "error", str(exc.message)
                try:
                    answer = P.encode(P.FailFrame(frame.id, P.error_info(code, message,
                                                                          exc.data)))
                except TypeError:
                    # data msgpack cannot carry: answer without it rather than never
                    answer = P.encode(P.FailFrame(frame.id, P.error_info(code, message)))
            except asyncio.CancelledError:
                if ctx.cancelled:
                    return  # the hub cancelled it: no answer is wanted
                task = asyncio.current_task()
                if task is not None and not task.cancelling():
                    # Not a cancel of this task: the handler's own CancelledError
                    # (a future it awaited was cancelled) fails like any error.
                    answer = P.encode(P.FailFrame(frame.id, P.error_info(
                        "handler_error", "CancelledError raised by the handler")))
                else:
                    # stop() interrupted it: never run it again in this process; a
                    # redelivery after a restart gets this (docs/protocol.md, Commands
                    # and redelivery).
                    self._remember(frame.id, P.encode(P.FailFrame(frame.id, P.error_info(
                        "agent_stopped", "the agent stopped while the command ran"))))
                    raise
            except Exception as exc:
                log.exception("command_handler_failed", agent_id=self.agent_id,
                              command_id=frame.id, key=frame.key)
                answer = P.encode(P.FailFrame(frame.id, P.error_info(
                    "handler_error", f"{type(exc).__name__}: {exc}")))
        if self._running.pop(frame.id, None) is None:
            return  # cancelled meanwhile
        self._remember(frame.id, answer)
        self._send_now(answer)

    def _retry_answer(self, cmd_id: str) -> None:
        """The hub could not apply our answer (its store was down): send the stored
        answer again a little later, a few times, instead of waiting for a reconnect."""
        answer = self._finished.get(cmd_id)
        tries = self._answer_retries.get(cmd_id, 0)
        if answer is None or tries >= _ANSWER_RETRIES:
            return
        self._answer_retries[cmd_id] = tries + 1
        if len(self._answer_retries) > self._result_cache:
            self._answer_retries.pop(next(iter(self._answer_retries)))
        asyncio.get_running_loop().call_later(
            _ANSWER_RETRY_DELAY * (tries + 1), self._send_now, answer)

    def _remember(self, cmd_id: str, answer: bytes | None) -> None:
        finished = self._finished
        finished[cmd_id] = answer
        while len(finished) > self._result_cache:
            finished.popitem(last=False)

    # -- sending ----------------------------------------------------------------
    def _send_now(self, data: bytes) -> None:
        """Send without waiting; while disconnected the frame is dropped, and
        terminal answers are resent from the cache when the hub redelivers."""
        ws = self._ws
        if ws is not None:
            # Synchronous write into the transport: no task per frame. The hub
            # bounds how much an agent is asked to answer, so this stays small.
            broadcast((ws,), data)

    async def _send_soft(self, data: bytes) -> None:
        ws = self._ws
        if ws is None:
            return
        with contextlib.suppress(ConnectionClosed):
            await ws.send(data)

    async def send_frame(self, frame: P.Frame) -> None:
        """Send one frame now; raises ``NotConnected`` while disconnected."""
        ws = self._ws
        if ws is None:
            raise NotConnected("not connected to a hub")
        try:
            await ws.send(P.encode(frame))
        except ConnectionClosed as exc:
            raise NotConnected("the connection closed while sending") from exc


def _call_error(error: dict[str, Any]) -> DispatcherError:
    """The exception a failed routed call raises: the hub's own types (docs/guide.md)."""
    code = str(error.get("code", "error"))
    message = str(error.get("message", ""))
    if code == P.ErrorCode.TIMEOUT:
        return CommandTimeout(message)
    if code == P.ErrorCode.AGENT_OFFLINE:
        return AgentOffline(message)
    if code == P.ErrorCode.CANCELLED:
        return CommandCancelled(message)
    return CommandFailed(code, message, error.get("data"))
