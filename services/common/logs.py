"""Structured logs: `event.name key=value ...`, one line each, to stderr.

supervisord captures stderr into the node's log directory and rotates it.
Debug output is per service and can be switched on at runtime with SIGUSR1
(and off again with SIGUSR2), without a restart.
"""

from __future__ import annotations

import logging
import signal
import sys
from typing import Any


def kv(event: str, **fields: Any) -> str:
    """Format a log line the way every service writes them."""
    parts = [event]
    for key, value in fields.items():
        text = str(value)
        if not text or any(c.isspace() for c in text) or '"' in text:
            text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
        parts.append(f"{key}={text}")
    return " ".join(parts)


def setup(service: str, node_id: str, level: str) -> logging.Logger:
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"log level {level!r} is not one of debug, info, warning, error")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(
            f"%(asctime)s %(levelname)s node={node_id} service={service} %(message)s",
            datefmt="%Y-%m-%dT%H:%M:%S",
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    for noisy in ("nats", "grpc", "asyncio", "sqlalchemy"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))
    log = logging.getLogger(service)

    def toggle_debug(signum: int, _frame: object) -> None:
        new = logging.DEBUG if signum == signal.SIGUSR1 else numeric
        root.setLevel(new)
        log.warning(kv("log.level", level=logging.getLevelName(new)))

    signal.signal(signal.SIGUSR1, toggle_debug)
    signal.signal(signal.SIGUSR2, toggle_debug)
    return log
