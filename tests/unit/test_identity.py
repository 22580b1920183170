"""A router's keys on disk: made once, kept, the same for every process."""

from __future__ import annotations

import multiprocessing
import stat
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path

from services.common.identity import IDENTITY_FILE, WIREGUARD_FILE, Identity

SERVICES = 4  # a router's services, all starting at once


def _load(keys: Path, start: Barrier, results: Queue[str]) -> None:
    start.wait()
    try:
        identity = Identity.load_or_create(keys)
        results.put(identity.identity_key.hex() + identity.wireguard_private_b64)
    except Exception as err:  # reported, so the parent sees which process failed and how
        results.put(f"failed: {err!r}")


def test_services_starting_together_all_get_the_one_key_on_disk(tmp_path: Path) -> None:
    # Before: each process could make its own key; one crashed on the shared
    # temporary file, another kept a key the file no longer held.
    for trial in range(10):
        keys = tmp_path / str(trial)
        start, results = multiprocessing.Barrier(SERVICES), multiprocessing.Queue()
        processes = [multiprocessing.Process(target=_load, args=(keys, start, results))
                     for _ in range(SERVICES)]
        for process in processes:
            process.start()
        got = [results.get(timeout=30) for _ in processes]
        for process in processes:
            process.join()
        on_disk = Identity.load_or_create(keys)
        assert got == [on_disk.identity_key.hex() + on_disk.wireguard_private_b64] * SERVICES
        assert sorted(p.name for p in keys.iterdir()) == [IDENTITY_FILE, WIREGUARD_FILE]
        assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in keys.iterdir())


def test_keys_are_kept_across_loads(tmp_path: Path) -> None:
    first = Identity.load_or_create(tmp_path)
    again = Identity.load_or_create(tmp_path)
    assert (again.identity_key, again.wireguard_public) == (
        first.identity_key, first.wireguard_public)
