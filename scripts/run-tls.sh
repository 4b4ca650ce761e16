#!/usr/bin/env bash
# `make run-tls`: the quick start (relayd run) over TLS with development certificates.
# Makes a CA and certificates in $DATA/certs if there are none, writes $DATA/tls.toml
# and runs relayd; relayctl then needs --tls-ca $DATA/certs/ca.pem (or RELAY_TLS_CA).
set -euo pipefail
BIN=${BIN:-.venv/bin}
DATA=${RELAY_DATA_DIR:-./data}
CERTS=$DATA/certs

if [ ! -f "$CERTS/ca.pem" ] || [ ! -f "$CERTS/node-relay-1.pem" ]; then
  "$BIN/relayd" dev-certs "$CERTS" > /dev/null
  echo "made a development CA and certificates in $CERTS"
fi
cat > "$DATA/tls.toml" <<TOML
# Written by \`make run-tls\`: the quick start over TLS (development certificates).
[tls]
cert_file = "$CERTS/node-relay-1.pem"
key_file = "$CERTS/node-relay-1.key"
client_ca_file = "$CERTS/ca.pem"
ca_file = "$CERTS/ca.pem"
TOML
cat <<TEXT
TLS on 127.0.0.1:50051 (relay) and 127.0.0.1:50052 (key directory). In other terminals:
  export PATH=\$PWD/.venv/bin:\$PATH RELAY_TLS_CA=$CERTS/ca.pem   # or: relayctl --tls-ca $CERTS/ca.pem
  relayctl --home /tmp/bob init bob        (then the rest of the README quick start)
Rotate: replace $CERTS/node-relay-1.pem/.key (or kill -HUP the relayd); open streams stay.
TEXT
exec "$BIN/relayd" run --data-dir "$DATA" --config "$DATA/tls.toml"
