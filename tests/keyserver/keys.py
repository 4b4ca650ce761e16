"""Real device keys for tests: registrations and prekeys that verify."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from cryptography.hazmat.primitives.asymmetric import mlkem
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from keyserver.directory import KeyDirectory
from keyserver.model import (
    DeviceRecord,
    LinkRequestInput,
    OneTimePrekey,
    PqPrekey,
    Registration,
    SignedPrekey,
)
from relay import authproof
from relay.accounts import DeviceList, ListedDevice, build_list
from relay.common.convert import device_list_to_pb
from relay.model import Address
from relaypb.keys.v1 import keys_pb2

#: The time stamped on test device lists (the directory does not check it).
NOW_MS = 1_700_000_000_000

RAW = (Encoding.Raw, PublicFormat.Raw)


def public(key: Any) -> bytes:
    return bytes(key.public_key().public_bytes(*RAW))


def x25519() -> bytes:
    return public(X25519PrivateKey.generate())


_MLKEM_PUBLICS: list[bytes] = []


def mlkem1024() -> bytes:
    """A valid ML-KEM-1024 public key (a few real ones, reused: key generation is slow)."""
    if len(_MLKEM_PUBLICS) < 8:
        _MLKEM_PUBLICS.append(mlkem.MLKEM1024PrivateKey.generate().public_key().public_bytes_raw())
        return _MLKEM_PUBLICS[-1]
    _MLKEM_PUBLICS.append(_MLKEM_PUBLICS.pop(0))
    return _MLKEM_PUBLICS[-1]


@dataclass
class DeviceKeys:
    """A device's identity keys, able to sign what the key directory checks."""

    signing: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    identity_dh_key: bytes = field(default_factory=x25519)

    @property
    def identity_key(self) -> bytes:
        return public(self.signing)

    def sign(self, data: bytes) -> bytes:
        return self.signing.sign(data)

    def signed_prekey(self, key_id: int = 1) -> SignedPrekey:
        pk = x25519()
        return SignedPrekey(key_id, pk, self.sign(authproof.signed_prekey_transcript(pk)))

    def pq_prekey(self, key_id: int = 1) -> PqPrekey:
        pk = mlkem1024()
        return PqPrekey(key_id, pk, self.sign(authproof.pq_prekey_transcript(pk)))

    def pq_prekeys(self, key_ids: Iterable[int]) -> tuple[PqPrekey, ...]:
        return tuple(self.pq_prekey(i) for i in key_ids)

    def registration(
        self,
        tenant: str = "acme",
        user: str = "alice",
        one_time: Iterable[int] = (),
        one_time_pq: Iterable[int] = (),
        *,
        account: Account | None = None,
        number: int = 1,
        **kw: Any,
    ) -> Registration:
        """A registration creating the account of ``user`` (``account``: a fresh one)."""
        ik, dhk = self.identity_key, self.identity_dh_key
        account = account or Account(tenant, user)
        first = account.first_list(number, ik)
        reg = Registration(
            tenant=tenant,
            user=user,
            identity_key=ik,
            identity_dh_key=dhk,
            identity_dh_signature=self.sign(authproof.identity_dh_transcript(dhk)),
            signed_prekey=self.signed_prekey(),
            one_time_prekeys=one_time_prekeys(one_time),
            proof=self.sign(authproof.registration_transcript(tenant, user, ik, dhk)),
            last_resort_pq_prekey=self.pq_prekey(key_id=1_000_000),
            one_time_pq_prekeys=self.pq_prekeys(one_time_pq),
            account_key=account.public_key,
            device_list=first,
        )
        return replace(reg, **kw)

    def link_request(
        self, tenant: str = "acme", user: str = "alice", **kw: Any
    ) -> LinkRequestInput:
        """A RequestLink of this device to join ``user``."""
        ik, dhk = self.identity_key, self.identity_dh_key
        link_key = x25519()
        inp = LinkRequestInput(
            tenant=tenant,
            user=user,
            identity_key=ik,
            identity_dh_key=dhk,
            identity_dh_signature=self.sign(authproof.identity_dh_transcript(dhk)),
            signed_prekey=self.signed_prekey(),
            last_resort_pq_prekey=self.pq_prekey(key_id=1_000_000),
            link_key=link_key,
            proof=self.sign(authproof.link_request_transcript(tenant, user, ik, dhk, link_key)),
        )
        return replace(inp, **kw)


@dataclass
class Account:
    """A user's account key, able to sign the user's device lists."""

    tenant: str = "acme"
    user: str = "alice"
    private: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    version: int = 0
    devices: list[ListedDevice] = field(default_factory=list)

    @property
    def public_key(self) -> bytes:
        return public(self.private)

    def sign(self, unsigned: DeviceList) -> DeviceList:
        return replace(unsigned, signature=self.private.sign(unsigned.transcript()))

    def listed(self, devices: Iterable[ListedDevice], version: int) -> DeviceList:
        unsigned = build_list(
            self.tenant, self.user, version, NOW_MS, devices, account_key=self.public_key
        )
        return self.sign(unsigned)

    def first_list(self, number: int, identity_key: bytes) -> DeviceList:
        """The list of a new account: one device; remembered as the current one."""
        self.version += 1
        self.devices = [ListedDevice.of(number, identity_key)]
        return self.listed(self.devices, self.version)

    def with_device(self, number: int, identity_key: bytes) -> DeviceList:
        """The next list with one more device (not remembered: call ``commit``)."""
        return self.listed([*self.devices, ListedDevice.of(number, identity_key)], self.version + 1)

    def without(self, number: int) -> DeviceList:
        """The next list without device ``number`` (not remembered: call ``commit``)."""
        return self.listed([d for d in self.devices if d.device != number], self.version + 1)

    def commit(self, device_list: DeviceList) -> DeviceList:
        """Remember ``device_list`` as the current list (it was accepted)."""
        self.version = device_list.version
        self.devices = list(device_list.devices)
        return device_list


async def add_device(
    core: KeyDirectory, account: Account, keys: DeviceKeys | None = None
) -> DeviceRecord:
    """Link a new device to ``account``'s user through the core: request, then approve.

    The approval is made as the user's first listed device.
    """
    keys = keys or DeviceKeys()
    link = await core.linking.request(keys.link_request(account.tenant, account.user))
    approver = Address(account.tenant, account.user, account.devices[0].device)
    links, _current, number = await core.linking.pending(approver)
    assert link.request_id in [x.request_id for x in links]
    new_list = account.with_device(number, keys.identity_key)
    address = await core.linking.approve(approver, link.request_id, new_list, b"s" * 96)
    account.commit(new_list)
    [record] = [
        r for r in await core.list_devices(account.tenant, account.user) if r.address == address
    ]
    return record


def one_time_prekeys(key_ids: Iterable[int]) -> tuple[OneTimePrekey, ...]:
    return tuple(OneTimePrekey(i, x25519()) for i in key_ids)


def signed_prekey_pb(spk: SignedPrekey) -> keys_pb2.SignedPrekey:
    return keys_pb2.SignedPrekey(
        key_id=spk.key_id, public_key=spk.public_key, signature=spk.signature
    )


def one_time_pb(prekeys: Iterable[OneTimePrekey]) -> list[keys_pb2.OneTimePrekey]:
    return [keys_pb2.OneTimePrekey(key_id=p.key_id, public_key=p.public_key) for p in prekeys]


def pq_pb(prekey: PqPrekey) -> keys_pb2.PqPrekey:
    return keys_pb2.PqPrekey(
        key_id=prekey.key_id, public_key=prekey.public_key, signature=prekey.signature
    )


def registration_pb(reg: Registration) -> keys_pb2.RegisterDeviceRequest:
    request = keys_pb2.RegisterDeviceRequest(
        tenant=reg.tenant,
        user=reg.user,
        identity_key=reg.identity_key,
        identity_dh_key=reg.identity_dh_key,
        identity_dh_signature=reg.identity_dh_signature,
        one_time_prekeys=one_time_pb(reg.one_time_prekeys),
        proof=reg.proof,
    )
    if reg.signed_prekey is not None:
        request.signed_prekey.CopyFrom(signed_prekey_pb(reg.signed_prekey))
    if reg.last_resort_pq_prekey is not None:
        request.last_resort_pq_prekey.CopyFrom(pq_pb(reg.last_resort_pq_prekey))
    request.one_time_pq_prekeys.extend(pq_pb(p) for p in reg.one_time_pq_prekeys)
    request.account_key = reg.account_key
    if reg.device_list is not None:
        request.device_list.CopyFrom(device_list_to_pb(reg.device_list))
    request.registration_token = reg.registration_token
    request.reset = reg.reset
    return request
