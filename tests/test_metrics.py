"""Metrics: a real ``relayd run`` scraped after real RPCs, checked with promtool.

The scrape must pass ``promtool check metrics``, carry per-RPC and domain series with
the counts the RPCs made, and name no user (label cardinality stays bounded). The alert
rules (deploy/prometheus/alerts.yml) pass ``promtool check rules`` and their unit tests,
and every metric name in them and in the Grafana dashboard exists in the live scrape,
so neither can drift from the code.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import urllib.request
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from relay.cli import relayd
from relay.common.metrics_http import MetricsEndpoint
from relay.config import ConfigError, load
from relaypb.relay.v1 import relay_pb2
from tests.process import Relayd, free_port
from tests.support import Device, connect, envelope, register, remove

pytestmark = pytest.mark.integration
#: The async tests share one event loop with the module's relayd (the ``live`` fixture).
module_loop = pytest.mark.asyncio(loop_scope="module")

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERTS_TEST = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "e2ee-relay.json"
#: User names of the scraped traffic: no label value (nor any text) of a scrape names them.
ALICE, BOB = "metrics-alice-x7q", "metrics-bob-x7q"
#: Every label name the metrics may carry: none of them names a user or a device.
LABELS = {
    *("grpc_service", "grpc_method", "grpc_type", "grpc_code"),
    *("outcome", "status", "limit", "kind", "peer", "reason", "cache", "result", "path"),
    *("step", "one_time", "le", "generation"),
    *("implementation", "major", "minor", "patchlevel", "version"),  # python_info
}
#: Series Prometheus makes itself, not the scraped process.
PROMETHEUS_OWN = {"up"}
METRIC_PREFIXES = ("relay_", "keyserver_", "grpc_server_", "process_", "python_")


@dataclass
class Scrape:
    """One scrape of a live relayd, parsed."""

    text: str
    #: (sample name, labels, value) of every sample.
    samples: list[tuple[str, dict[str, str], float]]
    #: Every name a query may use: families and their sample names.
    names: set[str]

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples of ``name`` whose labels include ``labels``."""
        return sum(
            v
            for n, ls, v in self.samples
            if n == name and all(ls.get(k) == want for k, want in labels.items())
        )


def parse(text: str) -> Scrape:
    samples: list[tuple[str, dict[str, str], float]] = []
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        suffixes = {
            "counter": ("_total",),
            "histogram": ("_bucket", "_sum", "_count"),
            "summary": ("_sum", "_count"),
        }.get(family.type, ())
        names.update(family.name + s for s in suffixes)  # also for families without samples
        for sample in family.samples:
            names.add(sample.name)
            samples.append((sample.name, dict(sample.labels), sample.value))
    return Scrape(text, samples, names)


@pytest.fixture(scope="module")
def promtool() -> Path:
    """promtool from Debian's prometheus package (scripts/tools/promtool.sh, cached)."""
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "tools" / "promtool.sh")],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, f"scripts/tools/promtool.sh failed:\n{done.stderr}"
    return Path(done.stdout.strip().splitlines()[-1])


def run_promtool(promtool: Path, *args: str, stdin: str | None = None) -> str:
    done = subprocess.run(
        [str(promtool), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}{done.stderr}"
    return done.stdout


async def fetch(url: str) -> str:
    def get() -> str:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return str(reply.read().decode())

    return await asyncio.to_thread(get)


async def drive(node: Relayd) -> None:
    """A few RPCs of each kind: registrations, a link, sessions, a send, a removal."""
    keys = node.keys_address
    alice = await register(keys, ALICE)
    bob = await register(keys, BOB)
    async with grpc.aio.insecure_channel(node.relay_address) as channel:
        b = await connect(channel, bob)
        assert await b.until_queue_empty() == []
        a = await connect(channel, alice, receive=False)
        (result,) = await a.send(envelope(bob.address, b"hello"))
        assert result.code == 0, result
        (got,) = await b.receive(1)
        await b.ack(got.message_id)
        # A session whose signature is wrong: Connect ends UNAUTHENTICATED.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await connect(channel, Device(alice.address, Ed25519PrivateKey.generate()))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # Bytes that are no RegisterDevice request (INVALID_ARGUMENT), a method that
        # does not exist (UNIMPLEMENTED, not counted: method labels stay bounded).
        async with grpc.aio.insecure_channel(keys) as keys_channel:
            raw = keys_channel.unary_unary("/relaypb.keys.v1.KeyDirectory/RegisterDevice")
            unknown = keys_channel.unary_unary("/relaypb.keys.v1.KeyDirectory/NoSuchMethod")
            with pytest.raises(grpc.aio.AioRpcError) as garbage:
                await raw(b"\xff\xff\xff")
            assert garbage.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await unknown(b"")
            assert missing.value.code() == grpc.StatusCode.UNIMPLEMENTED
        await a.close()
        await b.close()
    phone = await register(keys, BOB)  # ALREADY_EXISTS, then a link request and approval
    await remove(keys, phone.address)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def live(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Scrape]:
    """A ``relayd run`` (metrics on a free port) after :func:`drive`, scraped once."""
    node = Relayd(tmp_path_factory.mktemp("metrics") / "data", extra_args=["--drain-delay", "0"])
    try:
        await node.start()
        await drive(node)
        yield parse(await fetch(node.metrics_url))
    finally:
        node.stop()


@module_loop
async def test_a_live_scrape_passes_promtool(live: Scrape, promtool: Path) -> None:
    assert run_promtool(promtool, "check", "metrics", stdin=live.text) == ""


def test_promtool_check_metrics_can_fail(promtool: Path) -> None:
    done = subprocess.run(
        [str(promtool), "check", "metrics"],
        input="# HELP bad_counter x\n# TYPE bad_counter counter\nbad_counter 1\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0 and "_total" in done.stdout + done.stderr


@module_loop
async def test_per_rpc_series_count_what_was_called(live: Scrape) -> None:
    keys = "relaypb.keys.v1.KeyDirectory"
    handled = "grpc_server_handled_total"
    register_ok = live.value(handled, grpc_service=keys, grpc_method="RegisterDevice")
    assert live.value(handled, grpc_method="RegisterDevice", grpc_code="OK") == 2
    assert live.value(handled, grpc_method="RegisterDevice", grpc_code="ALREADY_EXISTS") == 1
    # Undecodable bytes are refused after this interceptor, and still counted.
    assert live.value(handled, grpc_method="RegisterDevice", grpc_code="INVALID_ARGUMENT") == 1
    assert register_ok == 4
    assert live.value("grpc_server_started_total", grpc_method="RegisterDevice") == 4
    assert live.value("grpc_server_handling_seconds_count", grpc_method="RegisterDevice") == 4
    assert live.value(handled, grpc_method="RemoveDevice", grpc_code="OK") == 1
    # Streams are counted when they end; the refused session has ended.
    assert live.value("grpc_server_started_total", grpc_method="Connect") == 3
    assert live.value(handled, grpc_method="Connect", grpc_code="UNAUTHENTICATED") == 1
    assert live.value(handled, grpc_type="bidi_stream", grpc_method="Connect") >= 1
    assert not any(ls.get("grpc_method") == "NoSuchMethod" for _, ls, _ in live.samples)


@module_loop
async def test_domain_series_count_what_happened(live: Scrape) -> None:
    assert live.value("keyserver_registrations_total", result="ok") == 2
    assert live.value("keyserver_registrations_total", result="already_exists") == 1
    assert live.value("keyserver_links_total", step="request", result="ok") == 1
    assert live.value("keyserver_links_total", step="approve", result="ok") == 1
    assert live.value("keyserver_removals_total", result="ok") == 1
    assert live.value("relay_envelopes_total") >= 1
    assert live.value("relay_auth_failures_total") == 1
    assert live.value("relay_key_cache_lookups_total", cache="identity_key") >= 3
    assert live.value("relay_send_seconds_count") >= 1
    assert live.value("process_resident_memory_bytes") > 0
    assert live.value("python_gc_collections_total") > 0
    assert "python_info" in live.names


@module_loop
async def test_no_label_names_a_user_or_device(live: Scrape) -> None:
    assert ALICE not in live.text and BOB not in live.text
    names = {k for _, labels, _ in live.samples for k in labels}
    assert names <= LABELS, f"unexpected labels {sorted(names - LABELS)}: keep them bounded"


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression reads (selectors, and names with our prefixes)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values are not names
    expr = re.sub(r"\{[^}]*\}", "{}", expr)  # nor label names inside matchers
    selectors = set(re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*[{\[]", expr))
    prefixed = {
        t for t in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr) if t.startswith(METRIC_PREFIXES)
    }
    return selectors | prefixed


def test_metric_names_finds_names_not_labels() -> None:
    expr = 'sum by (grpc_service) (rate(relay_nope_total{grpc_code=~"relay_x"}[5m])) > 0'
    assert metric_names(expr) == {"relay_nope_total"}
    assert metric_names("up{job='x'} == 0 or absent(keyserver_y)") >= {"up", "keyserver_y"}


def alert_exprs() -> list[str]:
    """The ``expr`` of every rule: one line, or a ``|`` block of deeper-indented lines.

    (A parser of this file's own layout: the project has no YAML library. The count of
    rules is checked against the count of alerts, so a rule it missed would fail.)
    """
    exprs: list[str] = []
    lines = ALERTS.read_text().splitlines()
    for i, line in enumerate(lines):
        key, _, rest = line.strip().partition(" ")
        if key != "expr:":
            continue
        if rest.strip() != "|":
            exprs.append(rest.strip())
            continue
        indent = len(line) - len(line.lstrip()) + 1
        block = []
        for follow in lines[i + 1 :]:
            if follow.strip() and len(follow) - len(follow.lstrip()) < indent:
                break
            block.append(follow.strip())
        exprs.append(" ".join(block))
    assert len(exprs) == sum(1 for x in lines if x.strip().startswith("- alert:")) > 5
    return exprs


def dashboard_exprs() -> list[str]:
    board = json.loads(DASHBOARD.read_text())

    def walk(panels: Iterable[dict[str, object]]) -> Iterable[str]:
        for panel in panels:
            for target in panel.get("targets", []) or []:  # type: ignore[attr-defined]
                yield target["expr"]
            yield from walk(panel.get("panels", []) or [])  # type: ignore[arg-type]

    exprs = list(walk(board["panels"]))
    exprs += [str(v["definition"]) for v in board["templating"]["list"] if "definition" in v]
    return exprs


def grafana_to_promql(expr: str) -> str:
    expr = expr.replace("$__rate_interval", "5m").replace('"$instance"', '".*"')
    # label_values(metric, label) is Grafana's, not PromQL: the metric is what it reads.
    return re.sub(r"label_values\(([^,]+),[^)]*\)", r"\1", expr)


@module_loop
async def test_alert_rules_pass_promtool(promtool: Path) -> None:
    assert "SUCCESS" in run_promtool(promtool, "check", "rules", str(ALERTS))
    assert "SUCCESS" in run_promtool(promtool, "test", "rules", str(ALERTS_TEST))


@module_loop
async def test_dashboard_queries_parse(promtool: Path, tmp_path: Path) -> None:
    exprs = [grafana_to_promql(e) for e in dashboard_exprs()]
    assert len(exprs) > 20
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query{i}", "expr": e} for i, e in enumerate(exprs)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    assert "SUCCESS" in run_promtool(promtool, "check", "rules", str(path))


@module_loop
async def test_rules_and_dashboard_use_only_scraped_metrics(live: Scrape) -> None:
    used: dict[str, set[str]] = {}
    for where, exprs in (("alerts.yml", alert_exprs()), ("e2ee-relay.json", dashboard_exprs())):
        for expr in exprs:
            for name in metric_names(grafana_to_promql(expr)):
                used.setdefault(name, set()).add(where)
    assert len(used) > 20
    unknown = {n: w for n, w in used.items() if n not in live.names | PROMETHEUS_OWN}
    assert not unknown, f"metrics used but not exported (renamed or removed?): {unknown}"
    # The check has teeth: a name the scrape lacks would be reported.
    assert "relay_no_such_metric_total" not in live.names


# -- configuration: on by default, a flag, a way off --------------------------------------


def test_metrics_are_on_by_default_on_loopback() -> None:
    cfg = load(None)
    assert cfg.metrics.endpoint("run") == ("metrics.listen", "127.0.0.1:9464")
    assert cfg.metrics.endpoint("relay") == ("metrics.listen", "127.0.0.1:9464")
    assert cfg.metrics.endpoint("keyserver") == ("metrics.keyserver_listen", "127.0.0.1:9465")


def test_metrics_listen_flag_and_off() -> None:
    def parsed(*argv: str) -> tuple[str, str] | None:
        args = relayd._parser().parse_args(list(argv))
        return relayd.config_from_args(args).metrics.endpoint(args.command)

    assert parsed("run", "--metrics-listen", "127.0.0.1:9999") == (
        "metrics.listen",
        "127.0.0.1:9999",
    )
    assert parsed("keyserver", "--metrics-listen", "127.0.0.1:9998") == (
        "metrics.keyserver_listen",
        "127.0.0.1:9998",
    )
    assert parsed("relay", "--metrics-listen", "off") is None
    assert load(None, {"metrics.listen": ""}).metrics.endpoint("run") is None


def test_the_old_key_says_where_it_went() -> None:
    with pytest.raises(ConfigError, match=r"node\.metrics_listen: moved to metrics\.listen"):
        load(None, {"node.metrics_listen": "127.0.0.1:9464"})


@module_loop
async def test_a_taken_port_is_an_error_naming_the_key() -> None:
    cfg = load(None)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        endpoint = MetricsEndpoint(
            "metrics.listen", f"127.0.0.1:{port}", CollectorRegistry(), cfg.tls
        )
        with pytest.raises(OSError, match=rf"metrics\.listen: cannot serve metrics on .*:{port}"):
            async with endpoint:
                pass


def test_relay_envelope_outcomes_in_the_dashboard_exist() -> None:
    # The outcome values a panel or rule may select exist in the model.
    from relay.model import Outcome

    outcomes = {o.name.lower() for o in Outcome}
    used = set(re.findall(r'outcome="([a-z_]+)"', DASHBOARD.read_text() + ALERTS.read_text()))
    assert used <= outcomes
    assert relay_pb2.OUTCOME_STORED  # the wire enum the model mirrors


# -- node links: errors counted per peer -------------------------------------------------


class _Presence:
    """Says that every peer is at ``address``."""

    def __init__(self, address: str) -> None:
        self.address = address

    async def node_address(self, node_id: str) -> str | None:
        return self.address


class _Seen:
    """A counter family whose children also say when they were incremented."""

    def __init__(self, family: Any) -> None:
        self._family = family
        self.incremented = asyncio.Event()

    def labels(self, *values: str) -> _Seen:
        self._child = self._family.labels(*values)
        return self

    def inc(self, amount: float = 1) -> None:
        self._child.inc(amount)
        self.incremented.set()


@module_loop
async def test_a_failing_node_link_is_counted_for_its_peer() -> None:
    from relay.metrics import RelayMetrics
    from relay.model import Address
    from relay.server.links import GrpcNodeLinks

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{closed.getsockname()[1]}"  # nothing listens there
    metrics = RelayMetrics()
    seen = _Seen(metrics.link_errors)
    metrics.link_errors = seen  # type: ignore[assignment]
    links = GrpcNodeLinks("relay-1", _Presence(dead), metrics)  # type: ignore[arg-type]
    try:
        links.displace("relay-2", Address("default", "someone", 1), 1)
        async with asyncio.timeout(30):
            await seen.incremented.wait()
    finally:
        await links.close()
    registry = metrics.registry
    assert registry.get_sample_value("relay_link_errors_total", {"peer": "relay-2"}) == 1.0
    assert registry.get_sample_value("relay_link_batches_total", {"peer": "relay-2"}) == 0.0


@module_loop
async def test_failed_cassandra_statements_are_counted_by_kind() -> None:
    from relay.common.cassandra.session import CassandraSession
    from relay.config import CassandraConfig
    from relay.errors import RelayError, Unavailable
    from relay.metrics import RelayMetrics

    metrics = RelayMetrics()
    seen: list[RelayError] = []

    def failed(error: RelayError) -> None:
        seen.append(error)
        metrics.cassandra_error(error)

    config = CassandraConfig(port=free_port(), request_timeout_seconds=1.0)  # nobody there
    async with CassandraSession(config, on_error=failed) as session:
        with pytest.raises(Unavailable):
            await session.execute("SELECT release_version FROM system.local", op="probe")
    assert len(seen) == 1
    kinds = {"kind": "unavailable"}
    assert metrics.registry.get_sample_value("relay_cassandra_errors_total", kinds) == 1.0
