"""``make helm-check``: lint the chart, render it, validate every manifest offline.

    python scripts/tools/helm_check.py --helm PATH [--chart helm/e2ee-relay]

For the default values, values-dev.yaml and values-production.yaml: ``helm lint
--strict``, ``helm template`` at the oldest Kubernetes the chart allows (Chart.yaml
kubeVersion), then every rendered object is validated with kubernetes-validate in
strict mode (unknown fields are errors) against that version's schemas and the newest
it knows (KUBERNETES_VERSIONS). The Prometheus Operator's kinds are CRDs that
kubernetes-validate has no schema for: they are skipped, by name, and counted.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

#: Newest first: what kubernetes-validate ships, and the chart's kubeVersion floor.
KUBERNETES_VERSIONS = ("1.37.0", "1.30.0")
#: CRDs (monitoring.coreos.com/v1) without a schema in kubernetes-validate.
SKIPPED_KINDS = frozenset({"ServiceMonitor", "PrometheusRule"})
VALUES_FILES = ("", "values-dev.yaml", "values-production.yaml")


def render(helm: str, chart: Path, values: str, kube_version: str) -> list[dict[str, Any]]:
    """``helm template`` of the chart with ``values`` (a file in the chart, or none)."""
    cmd = [helm, "template", "check", str(chart), "--kube-version", kube_version]
    if values:
        cmd += ["-f", str(chart / values)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def lint(helm: str, chart: Path, values: str) -> None:
    """``helm lint --strict`` with ``values``."""
    cmd = [helm, "lint", "--strict", str(chart)]
    if values:
        cmd += ["-f", str(chart / values)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def validate(docs: list[dict[str, Any]], kube_version: str) -> tuple[int, int, list[str]]:
    """Validate ``docs``: (validated, skipped, errors)."""
    validated = skipped = 0
    errors: list[str] = []
    for doc in docs:
        name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        if doc.get("kind") in SKIPPED_KINDS:
            skipped += 1
            continue
        try:
            kubernetes_validate.validate(doc, kube_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = "/".join(str(p) for p in exc.path)
            errors.append(f"{name}: {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            errors.append(f"{name}: no schema ({exc})")
        validated += 1
    return validated, skipped, errors


def check(helm: str, chart: Path, values: str) -> tuple[bool, list[str]]:
    """Lint, render (at the chart's floor version) and validate one values file."""
    label = values or "values.yaml (defaults)"
    lines: list[str] = []
    try:
        lint(helm, chart, values)
        # Rendered once, at the oldest Kubernetes the chart allows (so kubeVersion admits
        # it); no template depends on the version, so the same objects meet every schema.
        docs = render(helm, chart, values, KUBERNETES_VERSIONS[-1])
    except subprocess.CalledProcessError as exc:
        return False, [
            f"helm-check: {label}: {' '.join(exc.cmd[:2])} failed:\n{exc.stdout}{exc.stderr}"
        ]
    ok = True
    for version in KUBERNETES_VERSIONS:
        validated, skipped, errors = validate(docs, version)
        if errors:
            lines.append(f"helm-check: {label}, Kubernetes {version}: {len(errors)} invalid")
            lines += [f"  {error}" for error in errors]
            ok = False
        else:
            lines.append(
                f"helm-check: {label}, Kubernetes {version}: {validated} objects valid "
                f"(strict), {skipped} skipped ({', '.join(sorted(SKIPPED_KINDS))}: CRDs)"
            )
    return ok, lines


def main() -> int:
    """Run every check; print one line per values file and Kubernetes version."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--helm", required=True, help="the helm binary")
    parser.add_argument("--chart", type=Path, default=Path("helm/e2ee-relay"))
    args = parser.parse_args()
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=2) as pool:  # the machines have 2 cores
        results = list(pool.map(lambda v: check(args.helm, args.chart, v), VALUES_FILES))
    for _, lines in results:
        print("\n".join(lines))
    failed = not all(ok for ok, _ in results)
    print(f"helm-check: {'FAILED' if failed else 'ok'} in {time.monotonic() - started:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
