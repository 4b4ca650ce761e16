"""Plaintext never reaches the server: `relayd run` (embedded store) as a real process.

Known random plaintexts go through the relay and key directory while the recipient is
offline (so every envelope is stored). Then the server's whole data directory and its
DEBUG log are searched for them (raw, hex, base64, repr, and the common marker): zero
hits. As a control, the same search finds the ciphertexts the sender sealed, so the
search would have found the plaintexts had they been stored. Finally the recipient
reads every message.
"""

from __future__ import annotations

from pathlib import Path

from relay.sdk.secure import SecureClient
from tests.e2ee.helpers import (
    canaries,
    found_ciphertext,
    hits,
    provision,
    read_tree,
    record_seals,
    scan_files,
    take,
)
from tests.process import Relayd

COUNT = 40


async def test_plaintexts_never_reach_the_embedded_store_or_the_logs(tmp_path: Path) -> None:
    server = Relayd(tmp_path / "server" / "data", extra_args=["--log-level", "DEBUG"])
    await server.start()
    try:
        alice = await provision(server.keys_address, tmp_path / "alice", "alice")
        bob = await provision(server.keys_address, tmp_path / "bob", "bob")
        plaintexts = canaries(COUNT)
        async with SecureClient(alice, server.relay_address, server.keys_address) as sender:
            sealed = record_seals(sender)
            for plaintext in plaintexts:
                await sender.send("bob", plaintext)
        assert len(sealed) == COUNT

        data_dir = tmp_path / "server" / "data"
        assert server.log_path is not None
        log = server.log_path
        assert scan_files(data_dir, plaintexts) == {}
        assert hits(read_tree(log), plaintexts) == []
        # Control: the stored ciphertexts are found by the same kind of search.
        stored = read_tree(data_dir)
        assert all(found_ciphertext(c, stored) for c in sealed)

        async with SecureClient(bob, server.relay_address, server.keys_address) as reader:
            received = await take(reader, COUNT)
        assert [m.body for m in received] == plaintexts
        assert hits(read_tree(log), plaintexts) == []
        assert scan_files(data_dir, plaintexts) == {}
    finally:
        assert server.stop() == 0, server.log()
