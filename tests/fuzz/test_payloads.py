"""Every unary RPC: bytes its request type does not parse, and a message over the limit."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.budget import BATCH, EXAMPLES, fuzz_settings
from tests.fuzz.methods import ALL_RPCS, UNARY_RPCS, Rpc
from tests.fuzz.payloads import Anonymous, credentials, oversized_payload, unparsable_payloads
from tests.fuzz.target import SIGNERS, Target

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

PATHS = tuple(r.path for r in ALL_RPCS)


@pytest.mark.parametrize("rpc", UNARY_RPCS, ids=str)
@fuzz_settings(examples=EXAMPLES // 5, expect_failure=True)  # the parser refuses them all alike
@given(data=st.data())
async def test_payloads_that_do_not_parse(target: Target, rpc: Rpc, data: st.DataObject) -> None:
    payloads = unparsable_payloads(rpc.request, target.hints)
    creds = credentials(SIGNERS, PATHS)
    for _ in range(BATCH):
        payload = data.draw(payloads, label="payload")
        await target.unary(rpc, payload, data.draw(creds, label="credentials"))
    target.tick()
    await target.assert_serving()


@pytest.mark.parametrize("rpc", UNARY_RPCS, ids=str)
async def test_payload_over_the_message_limit(target: Target, rpc: Rpc) -> None:
    outcome = await target.unary(rpc, oversized_payload(), Anonymous())
    assert outcome.code is grpc.StatusCode.RESOURCE_EXHAUSTED, outcome
    await target.assert_serving()
