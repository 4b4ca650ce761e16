"""ML-KEM-1024 known-answer tests, through relay.sdk.crypto.primitives.

The vectors are ``asymmetric/MLKEM/kat_MLKEM_1024.rsp`` from the ``cryptography_vectors``
package: 1000 records (``count`` 0-999), each with the fields ``z``, ``d``, ``msg``,
``seed``, ``pk``, ``sk``, ``ct_n``, ``ss_n``, ``ct`` and ``ss`` (lower-case ``key = hex``
lines, records separated by a blank line). Every record is checked, each under its own
test id (``count=N``), through our wrappers only (``mlkem_public``,
``mlkem_encapsulate``, ``mlkem_decapsulate``), with our 64-byte private seed ``d || z``.

Checked:

* ``pk``: ``mlkem_public(d || z) == pk`` (FIPS 203 ML-KEM.KeyGen_internal(d, z)).
* ``ct`` / ``ss``: ``mlkem_decapsulate(d || z, ct) == ss``.
* ``ct_n`` / ``ss_n``: ``ct_n`` is an invalid ciphertext (unrelated to ``ct``, not a
  one-bit change of it); ``mlkem_decapsulate(d || z, ct_n) == ss_n``, and ``ss_n`` is
  the implicit-rejection secret ``J(z || ct_n) = SHAKE-256(z || ct_n, 32)`` (computed
  with hashlib), so the test shows the rejection path was taken. Conversely the valid
  ``ss`` is not ``J(z || ct)``.
* round trip: ``mlkem_encapsulate(pk)`` (fresh randomness) then
  ``mlkem_decapsulate(d || z, ...)`` give the same secret.
* lengths, for every record: ``pk`` is ``MLKEM1024_PUBLIC_LEN`` (1568), ``ct`` and
  ``ct_n`` are ``MLKEM1024_CIPHERTEXT_LEN`` (1568), ``d || z`` is ``MLKEM1024_SEED_LEN``
  (64), ``ss`` and ``ss_n`` are 32 bytes (primitives.py has no constant for the shared
  secret length, so 32 is written here), and our wrappers' outputs have these lengths.

Checked only in part, and why:

* ``sk`` is the 3168-byte expanded decapsulation key ``dk_PKE || ek || H(ek) || z``.
  pyca/cryptography neither imports nor exports that form (only the 64-byte seed), so
  ``dk_PKE`` (its first 1536 bytes) is not checked; its ``ek``, ``H(ek)`` (SHA3-256 via
  hashlib) and ``z`` segments are checked against the key our wrapper derives.
* ``msg`` is the encapsulation randomness ``m``. ``MLKEM1024PublicKey.encapsulate()``
  draws ``m`` from the OS and takes no argument, so ``ct`` cannot be reproduced from
  ``pk`` and ``msg`` (and ``mlkem_encapsulate`` is only checked by the round trip).
  Only the secret half of ML-KEM.Encaps_internal is checked: ``ss`` equals the first
  32 bytes of ``G(m || H(ek)) = SHA3-512(msg || SHA3-256(pk))`` (hashlib), which with
  the decapsulation check ties our decapsulation output to ``msg``.

Not checked:

* ``seed`` (48 bytes) seeds the NIST AES-256-CTR DRBG that generated ``d``, ``z`` and
  ``msg`` for the file; it is no input of ML-KEM and pyca offers no hook for it.

``tests/crypto/test_primitives.py`` parses its vector files with ``_blocks``, which
starts a record at an upper-case ``COUNT`` line; this file uses lower-case ``count``,
so :func:`_records` below does the same job for it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import cryptography_vectors
import pytest

from relay.sdk.crypto import primitives as p

VECTORS = Path(cryptography_vectors.__file__).parent
KAT_FILE = VECTORS / "asymmetric/MLKEM/kat_MLKEM_1024.rsp"

#: Length of an ML-KEM shared secret (FIPS 203); primitives.py defines no constant for it.
SHARED_SECRET_LEN = 32
#: Length of ``dk_PKE`` (384 * k, k = 4) inside the expanded decapsulation key.
DK_PKE_LEN = 1536
FIELDS = {"count", "z", "d", "msg", "seed", "pk", "sk", "ct_n", "ss_n", "ct", "ss"}


def _records(path: Path) -> list[dict[str, str]]:
    """``key = value`` records, each starting at its ``count`` line."""
    records: list[dict[str, str]] = []
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if line.startswith("#") or not sep:
            continue
        if key.strip() == "count":
            records.append({})
        records[-1][key.strip()] = value.strip()
    return records


KATS = _records(KAT_FILE)


def _b(vector: dict[str, str], field: str) -> bytes:
    return bytes.fromhex(vector[field])


def _seed(vector: dict[str, str]) -> bytes:
    """Our private key format: the FIPS 203 seed ``d || z``."""
    return _b(vector, "d") + _b(vector, "z")


def _rejection_secret(z: bytes, ciphertext: bytes) -> bytes:
    """FIPS 203 ``J(z || c)``: the implicit-rejection secret of ML-KEM.Decaps."""
    return hashlib.shake_256(z + ciphertext).digest(SHARED_SECRET_LEN)


kat = pytest.mark.parametrize("vector", KATS, ids=lambda v: f"count={v['count']}")


def test_kat_file_is_complete() -> None:
    assert len(KATS) == 1000
    assert [int(v["count"]) for v in KATS] == list(range(1000))
    assert all(set(v) == FIELDS for v in KATS)


def test_length_constants_match_every_vector() -> None:
    for v in KATS:
        assert len(_b(v, "pk")) == p.MLKEM1024_PUBLIC_LEN == 1568
        assert len(_b(v, "ct")) == len(_b(v, "ct_n")) == p.MLKEM1024_CIPHERTEXT_LEN == 1568
        assert len(_seed(v)) == p.MLKEM1024_SEED_LEN == 64
        assert len(_b(v, "ss")) == len(_b(v, "ss_n")) == SHARED_SECRET_LEN
        assert len(_b(v, "sk")) == DK_PKE_LEN + p.MLKEM1024_PUBLIC_LEN + 2 * 32


@kat
def test_public_key_from_seed(vector: dict[str, str]) -> None:
    public = p.mlkem_public(_seed(vector))
    assert len(public) == p.MLKEM1024_PUBLIC_LEN
    assert public == _b(vector, "pk")


@kat
def test_expanded_secret_key_tail_matches_derived_public_key(vector: dict[str, str]) -> None:
    public = p.mlkem_public(_seed(vector))
    sk = _b(vector, "sk")
    ek, h_ek, z = sk[DK_PKE_LEN:-64], sk[-64:-32], sk[-32:]
    assert ek == public
    assert h_ek == hashlib.sha3_256(public).digest()
    assert z == _b(vector, "z")


@kat
def test_decapsulate(vector: dict[str, str]) -> None:
    ciphertext = _b(vector, "ct")
    secret = p.mlkem_decapsulate(_seed(vector), ciphertext)
    assert len(secret) == SHARED_SECRET_LEN
    assert secret == _b(vector, "ss")
    # A valid ciphertext must not take the rejection path ...
    assert secret != _rejection_secret(_b(vector, "z"), ciphertext)
    # ... and its secret is K of ML-KEM.Encaps_internal(pk, msg): G(m || H(ek))[:32].
    g = hashlib.sha3_512(_b(vector, "msg") + hashlib.sha3_256(_b(vector, "pk")).digest())
    assert secret == g.digest()[:SHARED_SECRET_LEN]


@kat
def test_decapsulate_invalid_ciphertext_gives_implicit_rejection(vector: dict[str, str]) -> None:
    bad = _b(vector, "ct_n")
    assert bad != _b(vector, "ct")
    secret = p.mlkem_decapsulate(_seed(vector), bad)
    assert secret == _b(vector, "ss_n")
    assert secret == _rejection_secret(_b(vector, "z"), bad)
    assert secret != _b(vector, "ss")


@kat
def test_round_trip(vector: dict[str, str]) -> None:
    secret, ciphertext = p.mlkem_encapsulate(_b(vector, "pk"))
    assert len(secret) == SHARED_SECRET_LEN
    assert len(ciphertext) == p.MLKEM1024_CIPHERTEXT_LEN
    assert p.mlkem_decapsulate(_seed(vector), ciphertext) == secret
