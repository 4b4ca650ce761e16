"""Generated requests, with every kind of credentials, on every unary RPC."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.budget import BATCH, fuzz_settings
from tests.fuzz.messages import messages
from tests.fuzz.methods import ALL_RPCS, UNARY_RPCS, Rpc
from tests.fuzz.payloads import credentials
from tests.fuzz.target import SIGNERS, Target

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

PATHS = tuple(r.path for r in ALL_RPCS)


@pytest.mark.parametrize("rpc", UNARY_RPCS, ids=str)
@fuzz_settings()
@given(data=st.data())
async def test_generated_requests(target: Target, rpc: Rpc, data: st.DataObject) -> None:
    requests = messages(rpc.request, target.hints)
    creds = credentials(SIGNERS, PATHS)
    for _ in range(BATCH):
        request = data.draw(requests, label="request")
        plan = data.draw(creds, label="credentials")
        await target.unary(rpc, request.SerializeToString(deterministic=True), plan)
    target.tick()
    await target.assert_serving()
