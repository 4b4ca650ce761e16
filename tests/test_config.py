"""Configuration loading: defaults, TOML, overrides, and errors that name the key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.config import ApiKeyConfig, ConfigError, load


def test_defaults() -> None:
    cfg = load(None)
    assert cfg.storage.backend == "embedded" and cfg.node.listen == "127.0.0.1:50051"
    assert cfg.cassandra.consistency == "LOCAL_QUORUM"


def test_toml_with_lists_tables_and_overrides(tmp_path: Path) -> None:
    f = tmp_path / "relay.toml"
    f.write_text(
        '[storage]\nbackend = "cassandra"\n'
        '[cassandra]\ncontact_points = ["10.0.0.1", "10.0.0.2"]\n'
        '[presence]\nbackend = "redis"\ncache_seconds = 2\n'
        '[[api_keys]]\ntenant = "t"\nname = "billing"\nkey_file = "/k"\n'
    )
    cfg = load(f, {"node.id": "relay-9"})
    assert cfg.cassandra.contact_points == ("10.0.0.1", "10.0.0.2")
    assert cfg.presence.cache_seconds == 2.0
    assert cfg.api_keys == (ApiKeyConfig("t", "billing", "/k"),)
    assert cfg.node.id == "relay-9"


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ('[limits]\nmax_envelope_bytes = "big"\n', "limits.max_envelope_bytes"),
        ("[limits]\nmax_envelop_bytes = 1\n", "limits.max_envelop_bytes"),
        ('[storage]\nbackend = "mysql"\n', "storage.backend"),
        ('[cassandra]\nconsistency = "MOST"\n', "cassandra.consistency"),
        ("[limits]\nmax_queue_depth = -1\n", "limits.max_queue_depth"),
        ('[nodes]\nid = "x"\n', "nodes"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, text: str, path: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=path.replace(".", r"\.")):
        load(f)


@pytest.mark.parametrize("level", ["ONE", "LOCAL_ONE", "ANY"])
def test_weak_write_consistency_is_refused_unless_allowed(tmp_path: Path, level: str) -> None:
    f = tmp_path / "weak.toml"
    f.write_text(f'[cassandra]\nconsistency = "{level}"\n')
    with pytest.raises(ConfigError, match=r"cassandra\.consistency.*LOCAL_QUORUM"):
        load(f)
    if level != "ANY":  # ANY cannot read at all: never allowed
        f.write_text(f'[cassandra]\nconsistency = "{level}"\nallow_weak_write_consistency = true\n')
        assert load(f).cassandra.consistency == level
    for strong in ("LOCAL_QUORUM", "QUORUM", "EACH_QUORUM", "ALL"):
        f.write_text(f'[cassandra]\nconsistency = "{strong}"\n')
        assert load(f).cassandra.consistency == strong


def test_api_key_file_is_read_and_kept_as_digest(tmp_path: Path) -> None:
    key = tmp_path / "k"
    key.write_text("a" * 31 + "\n")
    with pytest.raises(ConfigError, match=r"shorter than 32 characters.*relayd gen-api-key"):
        ApiKeyConfig("t", "svc", str(key)).key_digest()
    key.write_text("a-long-enough-api-key-0123456789\n")
    assert len(ApiKeyConfig("t", "svc", str(key)).key_digest()) == 32
