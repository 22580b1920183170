"""ctypes binding of libmeshdp: nft command batches applied in-process.

    nft = Nft()                      # this thread's network namespace
    nft = Nft(netns="r2")            # /run/netns/r2, from any namespace
    nft.run("add table inet t")      # nft's text output; NftError on failure
    nft.json("list tables")          # nft's JSON objects, metainfo left out
    nft.usage_dump("mesh_meter", ["u6_0", "u4_0"], ":label")  # see counters.py
    nft.bpf_open(create=True)        # the forwarded counters (eBPF), see meshbpf.c

A context binds to the namespace it is opened in: libnftables opens its
netlink socket then. Only commands that name interfaces by string (`iifname`,
not `iif`) are safe on a context opened for another namespace, because
libnftables resolves interface indexes in the caller's current namespace.
"""

from __future__ import annotations

import ctypes
import errno
import json as jsonlib
import os
import re
import struct
import threading
import weakref
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from types import TracebackType
from typing import Any

LIBRARY = Path(__file__).with_name("libmeshdp.so")
NETNS_DIR = Path("/run/netns")  # where `ip netns add` puts named namespaces
NFT_CTX_OUTPUT_JSON = 1 << 4  # libnftables.h
BPF_LOG_LEN = 1 << 16  # the verifier's log, on a program it refuses
USAGE_DUMP_TRIES = 10  # each retry means another transaction committed meanwhile
_PREFIX = struct.Struct("=2I16s")  # struct meshbpf_prefix

# libnftables keeps process-wide state (its interface cache), so calls through
# different contexts must not overlap either: one lock for all of them.
_lock = threading.Lock()


class ShimNotBuilt(RuntimeError):
    """libmeshdp.so is missing: the set-up step that builds it has not run."""


class NftError(Exception):
    """nft refused a batch; nothing of it was applied (a batch is one transaction)."""

    def __init__(self, commands: str, rc: int, error: str) -> None:
        self.commands = commands
        self.rc = rc
        self.error = error.strip()
        super().__init__(
            f"nft failed (rc {rc}): {self.error or 'no error text'}\n"
            f"--- commands ---\n{commands.rstrip()}"
        )


@cache
def _library() -> ctypes.CDLL:
    if not LIBRARY.exists():
        raise ShimNotBuilt(
            "dataplane/libmeshdp.so is not built: run `bash deploy/install.sh` "
            "(or make -C dataplane)"
        )
    lib = ctypes.CDLL(str(LIBRARY), use_errno=True)
    lib.meshdp_ctx_new.argtypes = [ctypes.c_char_p]
    lib.meshdp_ctx_new.restype = ctypes.c_void_p
    lib.meshdp_ctx_free.argtypes = [ctypes.c_void_p]
    lib.meshdp_ctx_free.restype = None
    # c_void_p rather than c_char_p for the strings: ctypes would convert a
    # c_char_p to bytes and lose the pointer that must be freed.
    lib.meshdp_run.argtypes = [
        ctypes.c_void_p,
        ctypes.c_char_p,
        ctypes.c_uint,
        ctypes.POINTER(ctypes.c_void_p),
        ctypes.POINTER(ctypes.c_void_p),
    ]
    lib.meshdp_run.restype = ctypes.c_int
    lib.meshdp_str_free.argtypes = [ctypes.c_void_p]
    lib.meshdp_str_free.restype = None
    lib.meshdp_usage_dump.argtypes = [
        ctypes.c_void_p,
        ctypes.c_char_p,
        ctypes.POINTER(ctypes.c_char_p),
        ctypes.c_uint,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.POINTER(ctypes.c_void_p),
        ctypes.POINTER(ctypes.c_size_t),
    ]
    lib.meshdp_usage_dump.restype = ctypes.c_int
    lib.meshdp_bpf_open.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p,
                                    ctypes.c_size_t]
    lib.meshdp_bpf_sweep.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.meshdp_bpf_prefixes.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint]
    lib.meshdp_bpf_delete.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.meshdp_bpf_usage_fd.argtypes = [ctypes.c_void_p]
    for call in ("open", "sweep", "prefixes", "delete", "usage_fd"):
        getattr(lib, f"meshdp_bpf_{call}").restype = ctypes.c_int
    return lib


def _take_string(lib: ctypes.CDLL, pointer: ctypes.c_void_p) -> str:
    try:
        return ctypes.string_at(pointer.value).decode(errors="replace") if pointer.value else ""
    finally:
        lib.meshdp_str_free(pointer)


class Nft:
    """One libnftables context with buffered output, in one network namespace."""

    def __init__(self, netns: str | None = None) -> None:
        """netns: a name under /run/netns or a namespace file path; None = this thread's."""
        lib = _library()
        path = None if netns is None else str(netns if "/" in netns else NETNS_DIR / netns)
        with _lock:
            ctx = lib.meshdp_ctx_new(os.fsencode(path) if path else None)
        if not ctx:
            code = ctypes.get_errno()
            where = f" in network namespace {path}" if path else ""
            raise OSError(code, f"cannot open an nftables context{where}: {os.strerror(code)}")
        self.netns = netns
        self._lib = lib
        self._ctx: int = ctx
        self._free = weakref.finalize(self, lib.meshdp_ctx_free, ctx)

    def run(self, commands: str) -> str:
        """Apply a batch of nft commands atomically; return what nft printed."""
        return self._call(commands, 0)

    def json(self, commands: str) -> list[dict[str, Any]]:
        """Run one listing command with JSON output; return its objects."""
        out = self._call(commands, NFT_CTX_OUTPUT_JSON)
        if not out.strip():
            return []
        return [obj for obj in jsonlib.loads(out)["nftables"] if "metainfo" not in obj]

    def usage_dump(self, table: str, sets: Sequence[str], label: str,
                   forwarded: bool = False) -> bytes:
        """The shards `sets` of an `inet` usage set, read as of one ruleset generation,
        and with `forwarded` the eBPF counters of forwarded traffic (as set len(sets)).

        The layout is meshdp_usage_dump's (dataplane/counters.py reads it).
        Reads again while transactions interrupt it (a few times); OSError
        otherwise.
        """
        if not self._free.alive:
            raise ValueError("this Nft context is closed")
        names = (ctypes.c_char_p * len(sets))(*(s.encode() for s in sets))
        out, size = ctypes.c_void_p(), ctypes.c_size_t()
        for _ in range(USAGE_DUMP_TRIES):
            with _lock:
                rc = self._lib.meshdp_usage_dump(
                    self._ctx, table.encode(), names, len(sets), label.encode(),
                    int(forwarded), ctypes.byref(out), ctypes.byref(size),
                )
            if rc != -errno.EINTR:
                break
        try:
            if rc != 0:
                raise OSError(-rc, f"cannot dump the usage sets of inet {table}: "
                                   f"{os.strerror(-rc)}")
            return ctypes.string_at(out.value, size.value)
        finally:
            self._lib.meshdp_str_free(out)

    def bpf_open(self, create: bool) -> bool:
        """Find this namespace's forwarded counters (False if there are none), or
        with `create` make them anew (replacing any); either way attach their
        program to every interface. OSError otherwise, with the verifier's log."""
        log = ctypes.create_string_buffer(BPF_LOG_LEN)
        rc = self._bpf("open", int(create), log, len(log))
        if rc == -errno.ENOENT:
            return False
        if rc < 0:
            text = log.value.decode(errors="replace").strip()
            raise OSError(-rc, f"cannot set up the forwarded counters: {os.strerror(-rc)}"
                               + (f"\n--- verifier ---\n{text}" if text else ""))
        return True

    def bpf_sweep(self, force: bool = False) -> None:
        """Attach the counting program to interfaces new since the last sweep (or all)."""
        self._bpf("sweep", int(force))

    def bpf_prefixes(self, prefixes: Sequence[tuple[int, bytes, int]]) -> None:
        """Count forwarded traffic by exactly these (IP version, network address,
        length); a prefix that stays is never missing meanwhile."""
        packed = b"".join(_PREFIX.pack(version, length, address)
                          for version, address, length in prefixes)
        self._bpf("prefixes", packed, len(prefixes))

    def bpf_delete(self, interface: str | None) -> int:
        """Delete an interface's forwarded counters, or (None) those of removed
        prefixes; how many."""
        return self._bpf("delete", interface.encode() if interface is not None else None)

    def bpf_usage_fd(self) -> int:
        """The forwarded counters' array, mmappable: struct meshbpf_slot elements,
        element 0 the header (dataplane/meshbpf.h)."""
        return self._bpf("usage_fd")

    def _bpf(self, call: str, *args: object) -> int:
        """-errno of `open` is the caller's to handle; any other's raises."""
        if not self._free.alive:
            raise ValueError("this Nft context is closed")
        with _lock:
            rc: int = getattr(self._lib, f"meshdp_bpf_{call}")(self._ctx, *args)
        if rc < 0 and call != "open":
            raise OSError(-rc, f"forwarded counters ({call}): {os.strerror(-rc)}")
        return rc

    def close(self) -> None:
        self._free()

    def __enter__(self) -> Nft:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _call(self, commands: str, flags: int) -> str:
        if not self._free.alive:
            raise ValueError("this Nft context is closed")
        if "\0" in commands:
            raise ValueError("nft commands must not contain NUL characters")
        out, err = ctypes.c_void_p(), ctypes.c_void_p()
        with _lock:
            rc = self._lib.meshdp_run(
                self._ctx, commands.encode(), flags, ctypes.byref(out), ctypes.byref(err)
            )
        stdout, stderr = _take_string(self._lib, out), _take_string(self._lib, err)
        if rc == -errno.ENOMEM and out.value is None:
            raise MemoryError("libmeshdp could not copy nft's output")
        if rc != 0:
            raise NftError(commands, rc, stderr)
        return stdout


def chain_fingerprint(nft: Nft, family: str, table: str, pattern: re.Pattern[str]) -> str | None:
    """The structure version a table carries in a chain comment; None if the
    table is absent, "" if it has no version.

    Chains only: a listing of the table, or of every table, would make
    libnftables fetch every set element (the usage counters); and its JSON
    leaves comments out.
    """
    listing = nft.run(f"list chains {family}")
    if f"table {family} {table} {{" not in listing:
        return None
    match = pattern.search(listing)
    return match.group(1) if match else ""
