"""One thread for a service's netlink work.

pyroute2's synchronous IPRoute runs an event loop of its own, so it cannot be
used on the service's asyncio loop; and its socket belongs to the thread
that made it. A service makes its IPRoute lazily inside the calls it sends
here, so every call runs on the same single thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class NetlinkThread:
    def __init__(self, name: str = "netlink") -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def run(self, call: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, call, *args)
