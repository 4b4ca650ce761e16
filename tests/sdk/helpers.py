"""Test helpers for the SDK: provisioned devices and a TCP proxy that can cut links."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import grpc

from relay.accounts import DeviceList, ListedDevice, build_list
from relay.clock import SystemClock
from relay.errors import AlreadyExists
from relay.model import Address
from relay.sdk import DeviceState, KeyDirectoryClient, register_device
from relay.sdk.accounts import account_public, generate_account_key, sign_list
from relay.sdk.keys import Identity
from relay.sdk.linking import approve_link, request_link, wait_for_approval

#: The first device made for each (key directory, user): it approves the later ones.
_FIRST_HOMES: dict[tuple[str, str], Path] = {}


async def add_device(
    keys_address: str, state: DeviceState, user: str, *, one_time_prekeys: int = 3
) -> Address:
    """Make ``state`` a new device of ``user``, as a person would.

    The first device of a user creates the account; if the user exists already (the
    key directory says so), the device is linked: a link request, approved on the first
    device this helper made for that user on that key directory.
    """
    async with grpc.aio.insecure_channel(keys_address) as channel:
        directory = KeyDirectoryClient(channel)
        try:
            address = await register_device(
                state, directory, "default", user, one_time_prekeys=one_time_prekeys
            )
        except AlreadyExists:
            pass
        else:
            _FIRST_HOMES[(keys_address, user)] = state.path.parent
            return address
        first = _FIRST_HOMES[(keys_address, user)]
        ticket = await request_link(
            state, directory, "default", user, one_time_prekeys=one_time_prekeys
        )
        with DeviceState.open(first) as approver:
            await approve_link(approver, KeyDirectoryClient(channel), ticket.code)
        return await wait_for_approval(state, directory)


async def provision(keys_address: str, home: Path, user: str) -> Address:
    """A new device of ``user`` whose state lives in ``home`` (linked if not the first)."""
    with DeviceState.open(home) as state:
        return await add_device(keys_address, state, user)


class RecordingBackoff:
    """Reconnects at once (no sleeping) and records the attempt numbers."""

    def __init__(self, give_up_after: int | None = None) -> None:
        self.attempts: list[int] = []
        self.called = asyncio.Event()
        self._give_up_after = give_up_after

    async def __call__(self, attempt: int) -> bool:
        self.attempts.append(attempt)
        self.called.set()
        return self._give_up_after is None or attempt <= self._give_up_after


class Proxy:
    """A TCP forwarder to ``target``. ``cut()`` drops every open connection.

    With ``drop_down`` (server to client) or ``drop_up`` (client to server) set, bytes in
    that direction are swallowed, as a link that dies silently would.
    """

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self._target = (host, int(port))
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.drop_down = False
        self.drop_up = False
        self.connections = 0

    @property
    def address(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"127.0.0.1:{port}"

    async def __aenter__(self) -> Proxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        self.cut()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    def cut(self) -> None:
        """Close every connection open now (new ones are accepted as usual)."""
        for writer in list(self._links):
            writer.transport.abort()
        self._links.clear()

    async def _accept(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        s_reader, s_writer = await asyncio.open_connection(*self._target)
        self._links |= {c_writer, s_writer}
        up = asyncio.create_task(self._pump(c_reader, s_writer, up=True))
        down = asyncio.create_task(self._pump(s_reader, c_writer, up=False))
        self._tasks |= {up, down}
        await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        for writer in (c_writer, s_writer):
            writer.transport.abort()
            self._links.discard(writer)
        for task in (up, down):
            task.cancel()
            self._tasks.discard(task)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, up: bool
    ) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                if self.drop_up if up else self.drop_down:
                    continue
                writer.write(data)
                await writer.drain()


def first_list(identity: Identity, tenant: str, user: str) -> DeviceList:
    """A new account's first signed device list, naming ``identity`` as device 1."""
    account = generate_account_key()
    unsigned = build_list(
        tenant,
        user,
        1,
        SystemClock().now_ms(),
        [ListedDevice.of(1, identity.public_key)],
        account_key=account_public(account),
    )
    return sign_list(account, unsigned)
