"""Streaming RPCs: Relay.Connect's hostile first frames, hellos, answers and early sends;
generated requests on any other stream."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.budget import BATCH, EXAMPLES, fuzz_settings
from tests.fuzz.messages import messages
from tests.fuzz.methods import ALL_RPCS, STREAMING_RPCS, Rpc
from tests.fuzz.payloads import OVERSIZED_HEADER, Anonymous, Headers, credentials, oversized_payload
from tests.fuzz.streams import (
    Frame,
    HelloAs,
    Step,
    run_session,
    run_stream,
    steps,
    unparsable_frames,
)
from tests.fuzz.target import SIGNERS, Target

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

PATHS = tuple(r.path for r in ALL_RPCS)
#: Streams with a driver of their own; every other one gets generated requests.
CONNECT = tuple(r for r in STREAMING_RPCS if r.path == "/relaypb.relay.v1.Relay/Connect")
OTHER_STREAMS = tuple(r for r in STREAMING_RPCS if r not in CONNECT)
#: Devices whose keys answer challenges (the victim too: its own sessions are allowed).
MEMBERS = ("victim", *SIGNERS)


@pytest.mark.parametrize("rpc", CONNECT, ids=str)
@fuzz_settings()
@given(data=st.data())
async def test_sessions(target: Target, rpc: Rpc, data: st.DataObject) -> None:
    plans = steps(target.hints, MEMBERS)
    creds = credentials(SIGNERS, PATHS)
    for _ in range(BATCH):
        plan = data.draw(plans, label="steps")
        await run_session(target, rpc, plan, data.draw(creds, label="credentials"))
    target.tick()
    await target.assert_serving()


@pytest.mark.parametrize("rpc", CONNECT, ids=str)
@fuzz_settings(examples=EXAMPLES // 5, expect_failure=True)
@given(data=st.data())
async def test_frames_that_do_not_parse(target: Target, rpc: Rpc, data: st.DataObject) -> None:
    plans = steps(target.hints, MEMBERS)
    bad = unparsable_frames(target.hints).map(Frame)
    creds = credentials(SIGNERS, PATHS)
    for _ in range(BATCH):
        plan = data.draw(plans, label="steps")
        plan.insert(data.draw(st.integers(0, len(plan)), label="at"), data.draw(bad, label="bad"))
        await run_session(target, rpc, plan, data.draw(creds, label="credentials"))
    target.tick()
    await target.assert_serving()


@pytest.mark.parametrize("rpc", CONNECT, ids=str)
async def test_frame_over_the_message_limit(target: Target, rpc: Rpc) -> None:
    plans: list[list[Step]] = [
        [Frame(oversized_payload())],
        [HelloAs("victim"), Frame(oversized_payload())],
    ]
    for plan in plans:
        code = await run_session(target, rpc, plan, Anonymous())
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED, plan[:-1]
    await target.assert_serving()


@pytest.mark.parametrize("rpc", CONNECT, ids=str)
async def test_metadata_over_the_header_limit(target: Target, rpc: Rpc) -> None:
    code = await run_session(target, rpc, [HelloAs("victim")], Headers((OVERSIZED_HEADER,)))
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
    await target.assert_serving()


@pytest.mark.parametrize("rpc", OTHER_STREAMS, ids=str)
@fuzz_settings()
@given(data=st.data())
async def test_other_streams(target: Target, rpc: Rpc, data: st.DataObject) -> None:
    count = st.integers(0, 4) if rpc.client_streaming else st.just(1)
    requests = messages(rpc.request, target.hints).map(lambda m: m.SerializeToString())
    creds = credentials(SIGNERS, PATHS)
    for _ in range(BATCH):
        sent = [data.draw(requests, label="request") for _ in range(data.draw(count))]
        await run_stream(target, rpc, sent, data.draw(creds, label="credentials"))
    target.tick()
    await target.assert_serving()
