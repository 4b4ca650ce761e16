# syntax=docker/dockerfile:1
# The relayd image: relay node, key directory and migrations (`relayd COMMAND`).
#
#   docker build -t e2ee-relay:0.1.0 .
#
# Stages: `probe` builds grpc_health_probe (the chart's gRPC health checks over TLS,
# which Kubernetes' own gRPC probe cannot do); `build` builds the relay's wheel and the
# wheels of its dependencies; the final stage installs them with no build tools left.

ARG PYTHON_IMAGE=python:3.11-slim

FROM golang:1.26-bookworm AS probe
ARG GRPC_HEALTH_PROBE_VERSION=v0.4.63
ENV CGO_ENABLED=0 GOTOOLCHAIN=local
RUN GOBIN=/out go install "github.com/grpc-ecosystem/grpc-health-probe@${GRPC_HEALTH_PROBE_VERSION}"

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY relay ./relay
COPY keyserver ./keyserver
COPY relaypb ./relaypb
COPY loadtest ./loadtest
# The relay's wheel and one for every dependency (with the cluster extra: the Cassandra
# driver and the Redis client), so the final stage installs offline.
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[cluster]"

FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="e2ee-relay" \
      org.opencontainers.image.description="End-to-end-encrypted message relay: relayd" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels "e2ee-relay[cluster]==${VERSION}" \
    && useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin relay \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/relay /etc/relay/certs
# `go install` names it after the module (grpc-health-probe); the chart calls grpc_health_probe.
COPY --from=probe /out/grpc-health-probe /usr/local/bin/grpc_health_probe
WORKDIR /var/lib/relay
USER 10001:10001
# device (relay), key directory, node links, metrics of relay nodes and key directory
EXPOSE 50051 50052 50053 9464 9465
ENTRYPOINT ["relayd"]
CMD ["--help"]
