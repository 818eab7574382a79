"""Helpers shared by the local process managers: errors, ports, cache folder, log tails."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

#: Repository root when the package runs from a checkout (the local-broker kit lives under docker/).
REPO_ROOT = Path(__file__).resolve().parents[2]


class LocalInfraError(RuntimeError):
    """A local service could not be prepared, started or stopped; the message says why."""


def cache_root() -> Path:
    """Folder for downloads that outlive a run: $SENSORWATCH_CACHE, else $XDG_CACHE_HOME/sensorwatch,
    else ~/.cache/sensorwatch."""
    explicit = os.environ.get("SENSORWATCH_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "sensorwatch"


def free_port(exclude: set[int] | None = None) -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (the caller must bind it soon)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if not exclude or port not in exclude:
            return port
    raise LocalInfraError("could not find a free TCP port on 127.0.0.1")


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when a TCP connection to host:port succeeds within timeout seconds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def tail(path: Path, lines: int = 40) -> str:
    """Last lines of a text file, or a note when it cannot be read."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"<no log at {path}: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


def deadline(seconds: float) -> float:
    """Monotonic time seconds from now."""
    return time.monotonic() + seconds
