"""relayctl: a device on the command line.

init / link / approve make and join accounts; send, listen and chat carry messages;
trust, safety-number and devices show and accept who is who; remove-device ends one.

Every message is end-to-end encrypted (PQXDH + Double Ratchet, see docs/protocol.md):
the relay and the key directory only ever see ciphertext.

Expected failures print one line on stderr and exit 1 (2 for usage errors).
"""

from __future__ import annotations

import os

# gRPC's C core logs each failed TLS handshake on stderr (read once, when it loads):
# relayctl says what failed in one line of its own. GRPC_VERBOSITY=INFO shows them.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

from relay.cli.output import quiet_broken_pipe, version_text
from relay.clock import SystemClock
from relay.config import ConfigError
from relay.errors import AlreadyExists, RelayError, TlsFailure, Unavailable
from relay.model import Address
from relay.sdk import DeviceState, ExponentialBackoff, KeyDirectoryClient, register_device
from relay.sdk.accounts import Accounts, account_public, safety_number
from relay.sdk.channels import endpoint, open_channel
from relay.sdk.device import remove_device
from relay.sdk.keys import DEFAULT_ONE_TIME_PREKEYS
from relay.sdk.linking import approve_link, request_link, wait_for_approval
from relay.sdk.secure import SecureClient, SecureMessage
from relay.sdk.state import DB_NAME

DEFAULT_HOME = "~/.relayctl"
DEFAULT_RELAY = "127.0.0.1:50051"
DEFAULT_KEYS = "127.0.0.1:50052"
DEFAULT_TENANT = "default"
#: Connection attempts before a command says the relay is unreachable.
CONNECT_ATTEMPTS = 4
HINT = "is it running? Start it with `make run`"
EXAMPLES = """examples:
  relayctl --home /tmp/bob init bob
  relayctl --home /tmp/alice init alice
  relayctl --home /tmp/bob listen --count 1 &
  relayctl --home /tmp/alice send bob "hello"
  relayctl --home /tmp/alice chat bob        (and `chat alice` in another terminal)
  relayctl --home /tmp/bob2 link bob         (shows a code; then on bob's first device:)
  relayctl --home /tmp/bob approve CODE
  relayctl --home /tmp/alice safety-number bob
  relayctl --tls-ca data/certs/ca.pem --home /tmp/bob init bob   (servers on TLS: make run-tls)
"""


class CliError(Exception):
    """An expected failure: printed as one line, exit status 1."""


class _FirstConnectBackoff:
    """Give up after a few failed attempts until the first session; then retry forever."""

    def __init__(self) -> None:
        self.connected = False
        self._inner = ExponentialBackoff()

    async def __call__(self, attempt: int) -> bool:
        if not self.connected and attempt > CONNECT_ATTEMPTS:
            return False
        return await self._inner(attempt)


def _open_registered(args: argparse.Namespace) -> tuple[DeviceState, Address]:
    home: Path = args.home
    if DeviceState.exists(home):
        state = DeviceState.open(home)
        address = state.address()
        if address is not None:
            return state, address
        state.close()
    raise CliError(f"{home} holds no registered device: run `relayctl --home {home} init USER`")


@contextlib.asynccontextmanager
async def _directory(args: argparse.Namespace) -> AsyncIterator[KeyDirectoryClient]:
    """A client of the key directory at --keys, over TLS with --tls-ca unless plain loopback."""
    async with open_channel(args.keys, tls_ca=args.tls_ca) as channel:
        yield KeyDirectoryClient(
            channel, target=endpoint("key directory", args.keys, tls_ca=args.tls_ca)
        )


def _tenant(args: argparse.Namespace, own: Address | None = None) -> str:
    return str(args.tenant or (own.tenant if own else DEFAULT_TENANT))


def _new_device(device: Address) -> None:
    print(f"relayctl: {device.user} has a new device: {device}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _fresh_home(args: argparse.Namespace) -> Iterator[None]:
    """Refuse a home that holds a registered device, unless --force.

    With --force the old state is moved aside for the command and put back if it fails,
    so a refused registration never costs the device it would have replaced; once the
    command succeeds the old state is kept as ``device.db.replaced-<time>``.
    """
    home: Path = args.home
    if not DeviceState.exists(home):
        yield
        return
    with DeviceState.open(home) as old:
        registered = old.address()
    if registered is None:
        yield
        return
    if not args.force:
        raise CliError(f"{home} already holds device {registered}; use --force to replace it")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    moved = [(home / (DB_NAME + s), home / f"{DB_NAME}{s}.replaced-{stamp}") for s in _DB_FILES]
    for src, dst in moved:
        if src.exists():
            src.rename(dst)
    try:
        yield
    except BaseException:
        for src, dst in moved:
            src.unlink(missing_ok=True)
            if dst.exists():
                dst.rename(src)
        raise
    print(f"the replaced device's state is kept as {moved[0][1]}", file=sys.stderr)


_DB_FILES = ("", "-wal", "-shm")


async def cmd_init(args: argparse.Namespace) -> None:
    """Create the account of a new USER with this device as its first device.

    A user that exists already is refused: add a device to it with `link` instead.
    """
    home: Path = args.home
    tenant = _tenant(args)
    with _fresh_home(args), DeviceState.open(home) as state:
        async with _directory(args) as directory:
            try:
                address = await register_device(
                    state,
                    directory,
                    tenant,
                    args.user,
                    one_time_prekeys=args.prekeys,
                    registration_token=args.token or "",
                    reset=args.reset,
                )
            except AlreadyExists:
                raise CliError(
                    f"user {args.user!r} exists already in tenant {tenant!r}: to add this "
                    f"device to it, run `relayctl --home {home} link {args.user}` and approve "
                    "the code it shows on a device the user has"
                ) from None
    print(f"registered {address} (home {home})")


async def cmd_link(args: argparse.Namespace) -> None:
    """Ask to add this new device to an existing USER; wait for the approval.

    Shows a code: on a device USER has already, run `relayctl approve CODE`. The account
    key comes over an end-to-end-encrypted channel; the servers only see ciphertext.
    """
    home: Path = args.home
    tenant = _tenant(args)
    with _fresh_home(args), DeviceState.open(home) as state:
        async with _directory(args) as directory:
            ticket = await request_link(
                state, directory, tenant, args.user, one_time_prekeys=args.prekeys
            )
            print(f"link code: {ticket.code}", flush=True)
            minutes = max(1, (ticket.expires_at_ms - SystemClock().now_ms()) // 60_000)
            print(
                f"on a device of {args.user}, run: relayctl approve {ticket.code}   "
                f"(waiting; the code expires in {minutes} minutes)",
                file=sys.stderr,
                flush=True,
            )
            address = await wait_for_approval(state, directory)
    print(f"linked {address} (home {home})")


async def cmd_approve(args: argparse.Namespace) -> None:
    """Approve the new device that shows CODE (from `relayctl link`) as one of this user's."""
    state, _ = _open_registered(args)
    with state:
        async with _directory(args) as directory:
            address = await approve_link(state, directory, args.code)
    print(f"approved {address}")


async def cmd_trust(args: argparse.Namespace) -> None:
    """Accept USER's current account key (after they reset their account).

    Compare `relayctl safety-number USER` with them first, out of band.
    """
    state, own = _open_registered(args)
    with state:
        async with SecureClient(
            state, args.relay, args.keys, receive=False, tls_ca=args.tls_ca
        ) as client:
            device_list = await client.trust(args.user)
    print(
        f"trusting the account key of {own.tenant}/{args.user} ({len(device_list.devices)} devices)"
    )


async def cmd_safety_number(args: argparse.Namespace) -> None:
    """Print the number you and USER both see if you have each other's true account keys.

    It is the number for USER's account key as the key directory serves it now (its
    list verified). If that key is not the one this device trusts, a note says so:
    compare the number with USER, and only then run `relayctl trust USER`.
    """
    state, own = _open_registered(args)
    with state:
        accounts = Accounts(state)
        private = accounts.own_private()
        pinned = accounts.pinned_key(own.tenant, args.user)
        identity = state.identity()
        assert identity is not None
        async with _directory(args) as directory:
            directory.sign_as(identity, own)
            current = await directory.device_list(own.tenant, args.user)
        if not current.verifies():
            raise CliError(f"the device list of {args.user} is not validly signed")
        if pinned is None:
            accounts.check(current)  # first contact: pin it, as a send would
        elif pinned != current.account_key:
            print(
                f"relayctl: {args.user}'s account key changed since this device trusted it; "
                f"this number is for the new key: compare it with {args.user}, then run "
                f"`relayctl trust {args.user}`",
                file=sys.stderr,
            )
    mine = (f"{own.tenant}/{own.user}", account_public(private))
    print(safety_number(mine, (f"{own.tenant}/{args.user}", current.account_key)))


async def cmd_send(args: argparse.Namespace) -> None:
    """Send TEXT, end-to-end encrypted, to every device of USER.

    This user's other devices get a copy. Prints the message id once the relay has
    every copy.
    """
    state, _ = _open_registered(args)
    with state:
        backoff = _FirstConnectBackoff()
        try:
            async with asyncio.timeout(args.timeout):
                async with SecureClient(
                    state,
                    args.relay,
                    args.keys,
                    receive=False,
                    backoff=backoff,
                    on_new_device=_new_device,
                    tls_ca=args.tls_ca,
                ) as client:
                    receipt = await client.send(args.user, args.text.encode())
        except TimeoutError:
            raise CliError(f"relay {args.relay} did not answer within {args.timeout} s") from None
    print(receipt.message_id.hex())


def _format(message: SecureMessage, own: Address) -> str:
    sender = message.sender
    who = f"{sender.user}/{sender.device}" if sender.tenant == own.tenant else str(sender)
    text = message.body.decode("utf-8", errors="replace")
    if message.outgoing:
        return f"{who} -> {message.peer}: {text}"
    return f"{who}: {text}"


async def cmd_listen(args: argparse.Namespace) -> None:
    """Decrypt and print incoming messages as 'user/device: text', acknowledging each.

    Copies of messages this user sent from another device print as
    'user/device -> peer: text'.
    """
    state, own = _open_registered(args)
    received = 0
    with state:
        backoff = _FirstConnectBackoff()
        try:
            async with asyncio.timeout(args.timeout):
                async with SecureClient(
                    state,
                    args.relay,
                    args.keys,
                    backoff=backoff,
                    on_new_device=_new_device,
                    tls_ca=args.tls_ca,
                ) as client:
                    backoff.connected = True
                    print(f"listening as {own} on {args.relay}", file=sys.stderr, flush=True)
                    async for message in client.messages():
                        print(_format(message, own), flush=True)
                        received += 1
                        if args.count and received >= args.count:
                            await client.ack(message)
                            break
        except TimeoutError:
            if args.count:
                raise CliError(
                    f"timed out after {args.timeout} s with {received} of {args.count} messages"
                ) from None


async def _stdin_lines() -> AsyncIterator[str]:
    """Lines of standard input, read without blocking the event loop."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    try:
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), sys.stdin
        )
    except ValueError:  # a regular file: read it whole
        for line in sys.stdin.read().splitlines():
            yield line
        return
    try:
        while line_bytes := await reader.readline():
            yield line_bytes.decode("utf-8", errors="replace").rstrip("\r\n")
    finally:
        transport.close()


async def cmd_chat(args: argparse.Namespace) -> None:
    """An interactive end-to-end encrypted chat with USER.

    Each line typed is sent to every device of USER (and to this user's other devices);
    incoming messages print as 'user/device: text'. End with Ctrl-D (or Ctrl-C).
    """
    state, own = _open_registered(args)
    with state:
        backoff = _FirstConnectBackoff()
        async with SecureClient(
            state,
            args.relay,
            args.keys,
            backoff=backoff,
            on_new_device=_new_device,
            tls_ca=args.tls_ca,
        ) as client:
            backoff.connected = True
            print(
                f"chatting with {args.user} as {own} (end-to-end encrypted); Ctrl-D ends",
                file=sys.stderr,
                flush=True,
            )

            async def show() -> None:
                async for message in client.messages():
                    print(_format(message, own), flush=True)

            printer = asyncio.create_task(show())
            try:
                async for line in _stdin_lines():
                    if not line.strip():
                        continue
                    if printer.done():
                        break
                    await client.send(args.user, line.encode())
            finally:
                printer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await printer


async def cmd_whoami(args: argparse.Namespace) -> None:
    """Print this device's address and identity key."""
    state, own = _open_registered(args)
    with state:
        identity = state.identity()
    assert identity is not None
    print(f"{own} (home {state.path.parent})")
    print(f"identity key {identity.public_key.hex()}")


async def cmd_devices(args: argparse.Namespace) -> None:
    """List the devices of USER from its signed device list (verified, trust on first use)."""
    state, own = _open_registered(args)
    with state:
        identity = state.identity()
        assert identity is not None
        async with _directory(args) as directory:
            directory.sign_as(identity, own)
            device_list = Accounts(state, on_new_device=_new_device).check(
                await directory.device_list(own.tenant, args.user)
            )
            registered = {
                d.address.device: d for d in await directory.list_devices(own.tenant, args.user)
            }
    print(
        f"signed device list version {device_list.version}, account key "
        f"{device_list.account_key.hex()}",
        file=sys.stderr,
    )
    for entry in device_list.devices:
        info = registered.get(entry.device)
        when = "?"
        if info is not None:
            when = datetime.fromtimestamp(info.registered_at_ms / 1000, UTC).isoformat(
                timespec="seconds"
            )
        address = Address(own.tenant, args.user, entry.device)
        print(f"{address}  registered {when}  identity key {entry.identity_key.hex()}")


async def cmd_remove_device(args: argparse.Namespace) -> None:
    """Remove device N of this device's user (this device itself, or a lost one).

    Signs the user's next device list without it with the account key; relay nodes end
    the device's sessions at once and drop what waits for it.
    """
    state, _ = _open_registered(args)
    with state:
        async with _directory(args) as directory:
            target = await remove_device(state, directory, args.device)
    print(f"removed {target}")


Command = Callable[[argparse.Namespace], Awaitable[None]]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of relayctl."""
    parser = argparse.ArgumentParser(
        prog="relayctl",
        description="A device of the end-to-end-encrypted relay.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--home",
        metavar="DIR",
        default=DEFAULT_HOME,
        help=f"device state directory (default {DEFAULT_HOME})",
    )
    parser.add_argument(
        "--relay",
        metavar="HOST:PORT",
        default=os.environ.get("RELAY_ADDR", DEFAULT_RELAY),
        help=f"relay node HOST:PORT (env RELAY_ADDR, default {DEFAULT_RELAY})",
    )
    parser.add_argument(
        "--keys",
        metavar="HOST:PORT",
        default=os.environ.get("RELAY_KEYS_ADDR", DEFAULT_KEYS),
        help=f"key directory HOST:PORT (env RELAY_KEYS_ADDR, default {DEFAULT_KEYS})",
    )
    parser.add_argument(
        "--tls-ca",
        metavar="FILE",
        default=os.environ.get("RELAY_TLS_CA", ""),
        help="PEM file of the CA that signed the relay's and key directory's TLS "
        "certificates (env RELAY_TLS_CA; `relayd dev-certs` makes ca.pem). Without it: "
        "the system's trusted CAs for other hosts, plaintext for loopback",
    )
    parser.add_argument(
        "--tenant",
        metavar="TENANT",
        help=f"tenant (default: this device's tenant, else {DEFAULT_TENANT!r})",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log to stderr")
    parser.add_argument("--version", action="version", version=version_text("relayctl"))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Command, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=fn.__doc__)
        p.set_defaults(fn=fn)
        return p

    p = add("init", cmd_init, "create a new USER with this device as its first device")
    p.add_argument("user", metavar="USER", help="the new user")
    p.add_argument("--force", action="store_true", help="replace the device already in --home")
    p.add_argument(
        "--prekeys",
        metavar="N",
        type=int,
        default=DEFAULT_ONE_TIME_PREKEYS,
        help=f"one-time prekeys to upload (default {DEFAULT_ONE_TIME_PREKEYS})",
    )
    p.add_argument(
        "--token", metavar="T", help="registration token from the app's backend (token tenants)"
    )
    p.add_argument(
        "--reset",
        action="store_true",
        help="replace USER's account (all its devices go; needs a reset token)",
    )
    p = add("link", cmd_link, "add this new device to an existing USER (shows a code)")
    p.add_argument("user", metavar="USER", help="the existing user to join")
    p.add_argument("--force", action="store_true", help="replace the device already in --home")
    p.add_argument(
        "--prekeys",
        metavar="N",
        type=int,
        default=DEFAULT_ONE_TIME_PREKEYS,
        help=f"one-time prekeys to upload (default {DEFAULT_ONE_TIME_PREKEYS})",
    )
    p = add("approve", cmd_approve, "approve the new device that shows CODE")
    p.add_argument("code", metavar="CODE", help="the code `relayctl link` shows")
    p = add("trust", cmd_trust, "accept USER's new account key (after a reset)")
    p.add_argument("user", metavar="USER", help="the user whose key to accept")
    p = add("safety-number", cmd_safety_number, "the number to compare with USER out of band")
    p.add_argument("user", metavar="USER", help="the other user")
    p = add("send", cmd_send, "send TEXT (encrypted) to every device of USER")
    p.add_argument("user", metavar="USER", help="recipient user")
    p.add_argument("text", metavar="TEXT", help="message text")
    p.add_argument(
        "--timeout",
        metavar="S",
        type=float,
        default=30.0,
        help="give up after S seconds (default 30)",
    )
    p = add("listen", cmd_listen, "decrypt and print incoming messages, acknowledging each")
    p.add_argument("--count", metavar="N", type=int, default=0, help="exit after N messages")
    p.add_argument(
        "--timeout",
        metavar="S",
        type=float,
        default=None,
        help="stop after S seconds (an error if --count messages have not come)",
    )
    p = add("chat", cmd_chat, "interactive encrypted chat with USER (lines from stdin)")
    p.add_argument("user", metavar="USER", help="the user to chat with")
    add("whoami", cmd_whoami, "show this device's address and identity key")
    p = add("devices", cmd_devices, "list the registered devices of USER")
    p.add_argument("user", metavar="USER", help="the user to list")
    p = add("remove-device", cmd_remove_device, "remove device N of this device's user")
    p.add_argument("device", metavar="N", type=int, help="the device number to remove")
    return parser


@quiet_broken_pipe
def main(argv: Sequence[str] | None = None) -> int:
    """Run relayctl; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.home = Path(args.home).expanduser()
    if args.tls_ca and not Path(args.tls_ca).is_file():
        parser.error(f"--tls-ca {args.tls_ca}: no such file (the CA's PEM certificate)")
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(args.fn(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        raise  # stdout's reader went away: quiet_broken_pipe ends quietly
    except (CliError, RelayError, OSError, ConfigError) as exc:
        message = " ".join(str(exc).split())
        if isinstance(exc, ConfigError):  # an unreadable --tls-ca file
            message = f"--tls-ca {args.tls_ca}: {message}"
        elif isinstance(exc, TlsFailure):
            if not args.tls_ca:
                message = f"{message} (give the CA with --tls-ca FILE)"
        elif isinstance(exc, Unavailable):
            message = f"{message} ({HINT})"
        print(f"relayctl: error: {message}", file=sys.stderr)
        return 1
    with contextlib.suppress(BrokenPipeError):
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
