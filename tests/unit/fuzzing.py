"""Shared hypothesis settings and strategies for the wire-format fuzz tests."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st

FUZZ = settings(max_examples=300, deadline=None)


@st.composite
def mutations(draw: st.DrawFn, base: bytes) -> bytes:
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(("set", "insert", "delete")))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "insert" or not data:
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "set":
            data[at] = draw(st.integers(0, 255))
        else:
            del data[at : at + draw(st.integers(1, 8))]
    return bytes(data)
