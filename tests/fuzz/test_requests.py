"""Every unary RPC: generated requests and raw payloads that parse, any credentials."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.budget import BATCH, fuzz_settings
from tests.fuzz.methods import ALL_RPCS, UNARY_RPCS, Rpc
from tests.fuzz.payloads import (
    OVERSIZED_HEADER,
    Headers,
    credentials,
    parsable_payloads,
    serialized,
)
from tests.fuzz.target import SIGNERS, Target

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

PATHS = tuple(r.path for r in ALL_RPCS)


@pytest.mark.parametrize("rpc", UNARY_RPCS, ids=str)
@fuzz_settings()
@given(data=st.data())
async def test_requests(target: Target, rpc: Rpc, data: st.DataObject) -> None:
    """Half generated requests, half raw payloads cut down to what parses."""
    payloads = st.one_of(
        serialized(rpc.request, target.hints), parsable_payloads(rpc.request, target.hints)
    )
    creds = credentials(SIGNERS, PATHS)
    for _ in range(BATCH):
        payload = data.draw(payloads, label="payload")
        await target.unary(rpc, payload, data.draw(creds, label="credentials"))
    target.tick()
    await target.assert_serving()


@pytest.mark.parametrize("rpc", UNARY_RPCS, ids=str)
async def test_metadata_over_the_header_limit(target: Target, rpc: Rpc) -> None:
    outcome = await target.unary(rpc, b"", Headers((OVERSIZED_HEADER,)))
    assert outcome.code is grpc.StatusCode.RESOURCE_EXHAUSTED, outcome
    await target.assert_serving()
