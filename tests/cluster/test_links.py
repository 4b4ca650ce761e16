"""Node links on their own listener, mutual TLS with node identity, and strangers' frames.

The attack frames are the ones issue 10 describes: an envelope forwarded with a forged
sender and the very ``prev_seq`` the target's session expects (the best guess there
is, read from the node in this process), a ``Displace`` with a huge epoch, and a flood
of ``repoll_all``. From a stranger they must all fail, wherever they are sent: the
public (device) port serves no NodeLink at all, and the mutual-TLS link port refuses a
peer without a certificate of the cluster's CA, and one whose certificate names
another node (or none). The target device stays connected and gets nothing forged.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from relay.common.convert import address_to_pb
from relay.common.devcerts import make_dev_certs
from relay.common.status import error_info
from relay.common.tls import channel_credentials
from relay.config import ConfigError
from relay.core.peers import REPOLL_BURST
from relay.model import Address
from relay.server.app import RelayApp
from relaypb.node.v1 import node_pb2, node_pb2_grpc
from relaypb.relay.v1 import relay_pb2
from tests.cluster.conftest import Cluster
from tests.conftest import test_config as make_config
from tests.services import REDIS_PORT, REDIS_URL, require
from tests.support import Device, RawSession, channel_to, connect, envelope, register

pytestmark = [pytest.mark.services, pytest.mark.integration]

HUGE_EPOCH = 2**63
FLOOD = 50


def counter(node: RelayApp, name: str, labels: dict[str, str] | None = None) -> float:
    """The sum of a counter's samples on ``node`` (those matching ``labels``)."""
    total = 0.0
    for metric in node.metrics.registry.collect():
        for sample in metric.samples:
            if sample.name == name and all(
                sample.labels.get(k) == v for k, v in (labels or {}).items()
            ):
                total += sample.value
    return total


def refused(node: RelayApp, reason: str) -> float:
    return counter(node, "relay_link_refused_total", {"reason": reason})


def forged_forward(node: RelayApp, sender: Device, target: Device) -> node_pb2.Forward:
    """An envelope "from" ``sender`` that ``target``'s session on ``node`` would deliver.

    White box: the prev_seq is read from the session, the guess an attacker hopes for.
    """
    session = node.relay.sessions.get(target.address) if node.relay else None
    assert session is not None
    last = session._last_from.get(sender.address, 0)
    assert last > 0, "the target must have had an envelope from the sender"
    return node_pb2.Forward(
        envelope=relay_pb2.Envelope(
            message_id=os.urandom(16),
            sender=address_to_pb(sender.address),
            recipient=address_to_pb(target.address),
            content=b"forged",
            server_timestamp_ms=1,
        ),
        seq=last + 1,
        prev_seq=last,
    )


def attack(
    from_node: str, target: Address, forward: node_pb2.Forward | None = None
) -> list[node_pb2.NodeBatch]:
    """A forged delivery (if ``forward``), a Displace with a huge epoch, then a repoll flood.

    The forward goes alone: with a repoll_all in the same batch the session would read
    its queue first, and drop the forward (it is not in the store).
    """
    batches = [node_pb2.NodeBatch(from_node=from_node, forwards=[forward])] if forward else []
    displace = node_pb2.Displace(device=address_to_pb(target), epoch=HUGE_EPOCH)
    batches.append(node_pb2.NodeBatch(from_node=from_node, displaces=[displace]))
    batches += [node_pb2.NodeBatch(from_node=from_node, repoll_all=True) for _ in range(FLOOD)]
    return batches


async def inject(channel: grpc.aio.Channel, batches: list[node_pb2.NodeBatch]) -> grpc.StatusCode:
    """Send ``batches`` on one NodeLink call; the status it ended with (OK: all taken).

    The batches go as a request iterator: gRPC stops reading it when the server ends
    the call, so the status is the server's (a write of our own racing the server's
    refusal would fail with the client's INTERNAL instead).
    """
    try:
        async with asyncio.timeout(20):
            summary = await node_pb2_grpc.NodeLinkStub(channel).Link(iter(batches))
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    assert summary.batches == len(batches)
    return grpc.StatusCode.OK


def mtls_channel(
    target: str, ca: Path, cert: Path | None = None, key: Path | None = None
) -> grpc.aio.Channel:
    """A TLS channel verified with ``ca``, presenting ``cert`` if given."""
    creds = channel_credentials(str(ca), cert_file=str(cert or ""), key_file=str(key or ""))
    return grpc.aio.secure_channel(target, creds)


async def wait_for(condition: Callable[[], bool], seconds: float = 20) -> None:
    """Poll ``condition`` (a counter another node's task moves) until it holds."""
    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)  # polling a counter, not ordering events
    raise AssertionError(f"not within {seconds} s")


async def exchange(a: RawSession, b: RawSession, bob: Device, content: bytes) -> None:
    """``a`` sends ``content`` to bob; it is the next (and only) thing bob's ``b`` gets."""
    (res,) = await a.send(envelope(bob.address, content))
    assert res.outcome == relay_pb2.OUTCOME_STORED
    got = await b.receive(1)
    assert [e.content for e in got] == [content]
    await b.ack(*(e.message_id for e in got))


async def assert_untouched(
    node: RelayApp, a: RawSession, b: RawSession, bob: Device, epoch: int
) -> None:
    """Bob's session on ``node`` is the one he opened, and gets genuine envelopes only."""
    assert node.relay is not None
    session = node.relay.sessions.get(bob.address)
    assert session is not None and session.epoch == epoch and session.end_error is None
    assert b.frames.empty()  # nothing forged (and no error) arrived
    await exchange(a, b, bob, b"genuine after the attack")


# -- the device port ------------------------------------------------------------------


async def test_the_device_port_serves_no_node_links(cluster: Cluster) -> None:
    alice = await register(cluster.keys_address, "alice")
    bob = await register(cluster.keys_address, "bob")
    target = cluster.nodes[0]
    async with (
        grpc.aio.insecure_channel(cluster.addresses[0]) as ch0,
        grpc.aio.insecure_channel(cluster.addresses[1]) as ch1,
    ):
        b = await connect(ch0, bob)
        await b.until_queue_empty()
        a = await connect(ch1, alice, receive=False)
        await exchange(a, b, bob, b"genuine")  # over the link: bob's session knows alice
        batches = attack("relay-1", bob.address, forged_forward(target, alice, bob))
        for address in cluster.addresses:
            async with grpc.aio.insecure_channel(address) as public:
                assert await inject(public, batches) == grpc.StatusCode.UNIMPLEMENTED
        # The links themselves are elsewhere, and work.
        assert target.link_address != target.address
        await assert_untouched(target, a, b, bob, b.ready.session_epoch)
        await a.close()
        await b.close()


async def test_plaintext_links_ignore_a_forged_displace_and_a_repoll_flood(
    cluster: Cluster,
) -> None:
    """On loopback without TLS, the core's own checks still hold (rules 2 and 3)."""
    alice = await register(cluster.keys_address, "alice")
    bob = await register(cluster.keys_address, "bob")
    target = cluster.nodes[0]
    async with (
        grpc.aio.insecure_channel(cluster.addresses[0]) as ch0,
        grpc.aio.insecure_channel(cluster.addresses[1]) as ch1,
    ):
        b = await connect(ch0, bob)
        await b.until_queue_empty()
        a = await connect(ch1, alice, receive=False)
        await exchange(a, b, bob, b"genuine")
        async with grpc.aio.insecure_channel(target.link_address) as link:
            assert await inject(link, attack("relay-9", bob.address)) == grpc.StatusCode.OK
        assert refused(target, "displace_epoch") == 1
        assert refused(target, "repoll_rate") >= FLOOD - REPOLL_BURST
        await assert_untouched(target, a, b, bob, b.ready.session_epoch)
        await a.close()
        await b.close()


async def test_plaintext_links_off_loopback_are_refused(tmp_path: Path) -> None:
    require("Redis", REDIS_PORT)
    settings = {
        "presence.backend": "redis",
        "presence.redis_url": REDIS_URL,
        "presence.key_prefix": f"test-{os.urandom(4).hex()}:",
        "node.link_listen": "0.0.0.0:0",
    }
    with pytest.raises(ConfigError, match=r"node\.link_listen"):
        async with RelayApp(make_config(tmp_path / "data", **settings)):
            pass


# -- mutual TLS -------------------------------------------------------------------------


async def test_mtls_links_carry_traffic_and_displacements(tls_cluster: Cluster) -> None:
    cluster, ca = tls_cluster, tls_cluster.tls_ca
    alice = await register(cluster.keys_address, "alice", tls_ca=ca)
    bob = await register(cluster.keys_address, "bob", tls_ca=ca)
    async with (
        channel_to(cluster.addresses[0], ca) as ch0,
        channel_to(cluster.addresses[1], ca) as ch1,
        channel_to(cluster.addresses[2], ca) as ch2,
    ):
        b = await connect(ch1, bob)
        await b.until_queue_empty()
        a = await connect(ch0, alice)
        await a.until_queue_empty()
        before = counter(cluster.nodes[0], "relay_link_batches_total")
        for i in range(50):
            (res,) = await a.send(envelope(bob.address, b"%d" % i))
            assert res.outcome == relay_pb2.OUTCOME_STORED
        got = await b.receive(50)
        assert [e.content for e in got] == [b"%d" % i for i in range(50)]
        assert counter(cluster.nodes[0], "relay_link_batches_total") > before
        # A newer session of bob on node 2 displaces the one on node 1, over a link.
        new = await connect(ch2, bob)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await b.frame()
        assert info.value.code() == grpc.StatusCode.ABORTED
        detail = error_info(info.value)
        assert detail is not None and detail.reason == "SESSION_DISPLACED"
        assert detail.metadata["session_epoch"] == str(new.ready.session_epoch)
        assert all(refused(n, "displace_epoch") == 0 for n in cluster.nodes)
        await new.until_queue_empty()
        await a.send(envelope(bob.address, b"to node 2"))
        (last,) = await new.receive(1)
        assert last.content == b"to node 2"
        await a.close()
        await new.close()


async def test_strangers_cannot_inject_over_the_link_port(
    tls_cluster: Cluster, tmp_path: Path
) -> None:
    cluster, ca = tls_cluster, tls_cluster.tls_ca
    certs = cluster.certs
    assert certs is not None and certs.client is not None
    alice = await register(cluster.keys_address, "alice", tls_ca=ca)
    bob = await register(cluster.keys_address, "bob", tls_ca=ca)
    target = cluster.nodes[0]
    link = target.link_address
    # A certificate naming relay-1, from a CA the cluster does not trust.
    other = make_dev_certs(tmp_path / "other-ca", node_ids=["relay-1"])
    async with (
        channel_to(cluster.addresses[0], ca) as ch0,
        channel_to(cluster.addresses[1], ca) as ch1,
    ):
        b = await connect(ch0, bob)
        await b.until_queue_empty()
        a = await connect(ch1, alice, receive=False)
        await exchange(a, b, bob, b"genuine")
        batches = attack("relay-1", bob.address, forged_forward(target, alice, bob))
        relay2, client = certs.nodes["relay-2"], certs.client
        stranger = other.nodes["relay-1"]
        attempts = {
            "the public port": (channel_to(target.address, ca), grpc.StatusCode.UNIMPLEMENTED),
            "plaintext": (grpc.aio.insecure_channel(link), grpc.StatusCode.UNAVAILABLE),
            "no client certificate": (mtls_channel(link, certs.ca), grpc.StatusCode.UNAVAILABLE),
            "another CA's relay-1": (
                mtls_channel(link, certs.ca, stranger.cert, stranger.key),
                grpc.StatusCode.UNAVAILABLE,
            ),
            "a certificate naming no node": (
                mtls_channel(link, certs.ca, client.cert, client.key),
                grpc.StatusCode.PERMISSION_DENIED,
            ),
            "relay-2's certificate": (
                mtls_channel(link, certs.ca, relay2.cert, relay2.key),
                grpc.StatusCode.PERMISSION_DENIED,
            ),
        }
        for what, (channel, expected) in attempts.items():
            async with channel:
                assert await inject(channel, batches) == expected, what
        assert refused(target, "peer_identity") == 2
        assert refused(target, "displace_epoch") == 0  # nothing of theirs was even read
        await assert_untouched(target, a, b, bob, b.ready.session_epoch)

        # Control: relay-1's own certificate is a cluster node, trusted with forwards (so
        # the forged frame was a real threat); its Displace and flood are still refused.
        own = certs.nodes["relay-1"]
        batches = attack("relay-1", bob.address, forged_forward(target, alice, bob))
        async with mtls_channel(link, certs.ca, own.cert, own.key) as channel:
            assert await inject(channel, batches) == grpc.StatusCode.OK
        (forged,) = await b.receive(1)
        assert forged.content == b"forged"
        assert refused(target, "displace_epoch") == 1
        assert refused(target, "repoll_rate") >= FLOOD - REPOLL_BURST
        await assert_untouched(target, a, b, bob, b.ready.session_epoch)
        await a.close()
        await b.close()


async def test_a_node_with_another_nodes_certificate_is_refused(tls_cluster: Cluster) -> None:
    cluster, ca = tls_cluster, tls_cluster.tls_ca
    alice = await register(cluster.keys_address, "alice", tls_ca=ca)
    bob = await register(cluster.keys_address, "bob", tls_ca=ca)
    target = cluster.nodes[0]
    impostor = await cluster.stack.enter_async_context(
        RelayApp(cluster.node_config(3, certificate_of="relay-2"))
    )
    async with (
        channel_to(target.address, ca) as ch0,
        channel_to(impostor.address, ca) as ch3,
        channel_to(cluster.addresses[1], ca) as ch1,
    ):
        b = await connect(ch0, bob)
        await b.until_queue_empty()
        a3 = await connect(ch3, alice, receive=False)
        (res,) = await a3.send(envelope(bob.address, b"via relay-3"))
        assert res.outcome == relay_pb2.OUTCOME_STORED  # durable: the store has it
        # relay-3 wakes bob's node over a link presenting relay-2's certificate: refused.
        await wait_for(lambda: refused(target, "peer_identity") >= 1)
        assert target.relay is not None
        session = target.relay.sessions.get(bob.address)
        assert session is not None and session.end_error is None
        # Bob is still served: a send through a genuine node arrives (after the stored
        # one from relay-3, which his session reads from the store in order).
        a1 = await connect(ch1, alice, receive=False)
        await a1.send(envelope(bob.address, b"via relay-1"))
        contents: list[bytes] = []
        while b"via relay-1" not in contents:
            contents += [e.content for e in await b.receive(1)]
        assert contents in ([b"via relay-1"], [b"via relay-3", b"via relay-1"])
        await a3.close()
        await a1.close()
        await b.close()
