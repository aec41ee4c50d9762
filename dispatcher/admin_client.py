"""A small synchronous client of the HTTP admin API (what the ``dispatcher`` verbs use).

Standard library only (``urllib``), so the command line starts fast and a
script can import it without an event loop. Every failure is an
:class:`AdminError`: ``status`` is the HTTP status, or None when the hub could
not be reached at all; ``code`` and ``message`` come from the API's error body.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

__all__ = ["DEFAULT_URL", "AdminClient", "AdminError"]

DEFAULT_URL = "http://127.0.0.1:8081"


class AdminError(Exception):
    """A request that did not succeed; ``status`` None means the hub was not reached."""

    def __init__(self, status: int | None, code: str, message: str, body: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.body = body


class AdminClient:
    """``AdminClient("http://hub:8081", token=...)``; one method per admin route."""

    def __init__(self, url: str = DEFAULT_URL, token: str | None = None,
                 timeout: float = 30.0) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"admin URL must look like http://HOST:PORT, not {url!r}")
        self.url = url.rstrip("/")
        self.token = token or None
        self.timeout = timeout

    # -- the routes of docs/admin-api.md ---------------------------------------------------------
    def health(self) -> dict[str, Any]:
        out: dict[str, Any] = self.request("GET", "/healthz")
        return out

    def agents(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = self.request("GET", "/agents")
        return out

    def agent(self, agent_id: str) -> dict[str, Any]:
        out: dict[str, Any] = self.request("GET", f"/agents/{_q(agent_id)}")
        return out

    def pending(self, agent_id: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = self.request("GET", f"/agents/{_q(agent_id)}/commands")
        return out

    def execute(self, agent_id: str, key: str, payload: Any = None, *,
                timeout: float | None = None, group: str | bool | None = None,
                command_id: str | None = None, wait: bool = True,
                require_online: bool = False) -> dict[str, Any]:
        """The finished CommandInfo (any outcome but timeout), or ``{id, status}``
        with ``wait=False``; a timeout raises ``AdminError`` with status 504, an agent
        that is not connected with ``require_online`` one with status 409."""
        body: dict[str, Any] = {"key": key, "wait": wait}
        if require_online:
            body["require_online"] = True
        if payload is not None:
            body["payload"] = payload
        for name, value in (("timeout", timeout), ("group", group), ("command_id", command_id)):
            if value is not None:
                body[name] = value
        # The hub answers when the command ends; give it that long and a margin.
        limit = None if not wait else (timeout + 30.0 if timeout is not None else 24 * 3600.0)
        out: dict[str, Any] = self.request("POST", f"/agents/{_q(agent_id)}/commands", body,
                                           timeout=limit)
        return out

    def commands(self, *, agent: str | None = None, key: str | None = None,
                 status: str | None = None, outcome: str | None = None, job: str | None = None,
                 limit: int | None = None, cursor: str | None = None) -> dict[str, Any]:
        """One page of the history: ``{"commands": [...], "next": cursor or None}``."""
        query = {name: value for name, value in (
            ("agent", agent), ("key", key), ("status", status), ("outcome", outcome),
            ("job", job), ("limit", limit), ("cursor", cursor)) if value is not None}
        path = "/commands" + ("?" + urllib.parse.urlencode(query) if query else "")
        out: dict[str, Any] = self.request("GET", path)
        return out

    def command(self, cmd_id: str) -> dict[str, Any]:
        out: dict[str, Any] = self.request("GET", f"/commands/{_q(cmd_id)}")
        return out

    def cancel(self, cmd_id: str) -> dict[str, Any]:
        out: dict[str, Any] = self.request("DELETE", f"/commands/{_q(cmd_id)}")
        return out

    def emit(self, agent_id: str, key: str, data: Any = None, *,
             timeout: float | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"key": key}
        if data is not None:
            body["data"] = data
        if timeout is not None:
            body["timeout"] = timeout
        limit = timeout + 30.0 if timeout is not None else 24 * 3600.0
        out: dict[str, Any] = self.request("POST", f"/agents/{_q(agent_id)}/events", body,
                                           timeout=limit)
        return out

    def broadcast(self, key: str, data: Any = None) -> dict[str, Any]:
        body: dict[str, Any] = {"key": key}
        if data is not None:
            body["data"] = data
        out: dict[str, Any] = self.request("POST", "/events", body)
        return out

    # -- jobs ----------------------------------------------------------------------------
    def submit_job(self, target: Any, key: str, payload: Any = None, *,
                   timeout: float | None = None, batch: int | str | None = None,
                   max_failures: int | str | None = None, require_online: bool = False,
                   job_id: str | None = None) -> dict[str, Any]:
        """The stored JobInfo (the rollout goes on); 404 when the target matched nobody."""
        body: dict[str, Any] = {"target": target, "key": key}
        for name, value in (("payload", payload), ("timeout", timeout), ("batch", batch),
                            ("max_failures", max_failures), ("job_id", job_id)):
            if value is not None:
                body[name] = value
        if require_online:
            body["require_online"] = True
        out: dict[str, Any] = self.request("POST", "/jobs", body)
        return out

    def jobs(self, limit: int = 50) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = self.request("GET", f"/jobs?limit={int(limit)}")
        return out

    def job(self, job_id: str) -> dict[str, Any]:
        """The JobInfo with ``commands``: its started parts' commands."""
        out: dict[str, Any] = self.request("GET", f"/jobs/{_q(job_id)}")
        return out

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        out: dict[str, Any] = self.request("DELETE", f"/jobs/{_q(job_id)}")
        return out

    def follow_job(self, job_id: str, *, timeout: float = 24 * 3600.0
                   ) -> Iterator[tuple[str, Any]]:
        """The job's events as they come (``progress``, ``result``, then ``end``)."""
        headers = {"Accept": "text/event-stream"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(f"{self.url}/jobs/{_q(job_id)}/stream", headers=headers)
        try:
            resp = urllib.request.urlopen(req, timeout=timeout)
        except urllib.error.HTTPError as exc:
            with exc:
                answer = _decode(exc.read(), exc.code, strict=False)
            err = answer.get("error") if isinstance(answer, dict) else None
            err = err if isinstance(err, dict) else {}
            raise AdminError(exc.code, str(err.get("code", "http_error")),
                             str(err.get("message", f"HTTP {exc.code}")), answer) from None
        except (urllib.error.URLError, OSError) as exc:
            raise AdminError(None, "unreachable",
                             f"cannot reach the hub at {self.url}: {exc}") from None
        with resp:
            event = "message"
            for raw in resp:
                line = raw.decode("utf-8").rstrip("\r\n")
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    yield event, json.loads(line[6:])
                    if event == "end":
                        return

    # -- plumbing ----------------------------------------------------------------------
    def request(self, method: str, path: str, body: Any = None, *,
                timeout: float | None = None) -> Any:
        """One request; the decoded JSON answer of a 2xx, else ``AdminError``."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        limit = self.timeout if timeout is None else timeout
        try:
            with urllib.request.urlopen(req, timeout=limit) as resp:
                return _decode(resp.read(), resp.status)
        except urllib.error.HTTPError as exc:
            with exc:
                raw = exc.read()
            answer = _decode(raw, exc.code, strict=False)
            err = answer.get("error") if isinstance(answer, dict) else None
            if isinstance(err, dict):
                raise AdminError(exc.code, str(err.get("code", "error")),
                                 str(err.get("message", "")), answer) from None
            raise AdminError(exc.code, "http_error", f"HTTP {exc.code} {exc.reason}") from None
        except urllib.error.URLError as exc:
            raise AdminError(None, "unreachable",
                             f"cannot reach the hub at {self.url}: {exc.reason}") from None
        except TimeoutError:
            raise AdminError(None, "unreachable",
                             f"no answer from the hub at {self.url} within {limit:g} s") from None
        except (ConnectionError, OSError) as exc:
            raise AdminError(None, "unreachable",
                             f"cannot reach the hub at {self.url}: {exc}") from None


def _q(part: str) -> str:
    return urllib.parse.quote(part, safe="")


def _decode(raw: bytes, status: int, *, strict: bool = True) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        if not strict:
            return None
        raise AdminError(status, "bad_answer", "the hub's answer is not JSON (is --admin "
                         "the admin port?)") from None
