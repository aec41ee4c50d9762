"""Keep secrets given as command-line flags out of the process list.

A flag's value is in ``/proc/PID/cmdline`` for every user of the machine to
read (``ps``). The programs of this project read secrets from files and
variables for that reason, and warn when one comes as a flag; this rewrites the
process title so that it does not show the value meanwhile (with
``setproctitle``, which overwrites what ``ps`` reads on Linux and the BSDs).
"""

from __future__ import annotations

import sys
from collections.abc import Collection, Sequence

__all__ = ["SECRET_FLAGS", "URL_FLAGS", "hide_secret_flags", "masked_argv", "without_password"]

# Flags whose whole value is a secret, and flags holding a URL whose password is.
SECRET_FLAGS = frozenset({"--agent-secret", "--admin-token", "--token", "--secret"})
URL_FLAGS = frozenset({"--redis", "--redis-url"})


def without_password(url: str) -> str:
    """The URL with the password of its user part as ``***``: the one masker of the
    project (process titles here; the hub's logs and ``dispatcher config``)."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not sep or not at:
        return url
    user = userinfo.split(":", 1)[0] if ":" in userinfo else ""
    return f"{scheme}://{user}:***@{host}"


def masked_argv(argv: Sequence[str], secret: Collection[str] = SECRET_FLAGS,
                urls: Collection[str] = URL_FLAGS) -> list[str]:
    """``argv`` with the values of ``secret`` flags and the passwords in ``urls``
    flags replaced by ``***`` (``--flag value`` and ``--flag=value`` alike)."""
    out: list[str] = []
    pending: str | None = None  # the flag whose value comes next
    for arg in argv:
        if pending is not None:
            out.append("***" if pending in secret else without_password(arg))
            pending = None
            continue
        name, eq, value = arg.partition("=")
        if name in secret or name in urls:
            if eq:
                shown = "***" if name in secret else without_password(value)
                out.append(f"{name}={shown}")
            else:
                out.append(arg)
                pending = name
        else:
            out.append(arg)
    return out


def hide_secret_flags(argv: Sequence[str] | None = None) -> bool:
    """Show this process with its secret flag values masked; True when the title
    changed (False: nothing to hide, or ``setproctitle`` is not installed)."""
    args = list(sys.argv if argv is None else argv)
    masked = masked_argv(args)
    if masked == args:
        return False
    try:
        import setproctitle  # noqa: PLC0415 (only when there is something to hide)
    except ImportError:
        return False
    setproctitle.setproctitle(" ".join([sys.executable, *masked]))
    return True
