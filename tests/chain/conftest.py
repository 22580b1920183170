"""The chains the contract tests run on: eth-tester (py-evm, in process) and
anvil (a real node on loopback), one of each per test module; anvil is
stopped however the module ends."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.chain.harness import ChainUnderTest, chain_under_test


@pytest.fixture(scope="module", params=["eth-tester", "anvil"])
def chain(request: pytest.FixtureRequest) -> Iterator[ChainUnderTest]:
    with chain_under_test(request.param) as under_test:
        yield under_test
