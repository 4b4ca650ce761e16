#!/usr/bin/env bash
# Local backing services for the e2ee relay: Redis and a single-node Cassandra,
# installed and run without Docker. See docs/services.md.
#
# TLS as well (unless SERVICES_TLS=0): dev certificates (relay.common.devcerts, made
# again when missing or within 30 days of expiry) in $RELAY_TLS_DIR, a second Redis
# that speaks only TLS on $REDIS_TLS_PORT, and Cassandra's client encryption on a
# second native port, $CASSANDRA_TLS_PORT (client certificate required). The
# plaintext ports stay as they are.
#
# Usage: scripts/services/services.sh COMMAND
#   start            install (cached) and start Redis and Cassandra, wait until both answer
#   stop             stop both (SIGTERM via pidfile, SIGKILL after $STOP_TIMEOUT s)
#   restart          stop, then start
#   status           print each service up/down with its port (exit 0 all up, 3 otherwise)
#   start-redis      / stop-redis      the plaintext Redis only
#   start-redis-tls  / stop-redis-tls  the TLS Redis only
#   start-cassandra  / stop-cassandra  one service only (both of its ports)
#   certs            only make (or renew) the dev certificates
#   fetch            only download the Cassandra jars into the cache
#   wipe             stop both and delete their run dirs (data, logs, certificates): a clean node
#
# Environment (all optional):
#   RELAY_CACHE_DIR          download cache            (default: $HOME/.cache/e2ee-relay)
#   RELAY_RUN_DIR            data, logs, pidfiles      (default: $RELAY_CACHE_DIR/run)
#   RELAY_MAVEN_REPO         Maven local repository    (default: $RELAY_CACHE_DIR/m2)
#   REDIS_PORT               Redis port on 127.0.0.1   (default: 6379)
#   REDIS_READY_TIMEOUT      seconds to wait for PING  (default: 30)
#   REDIS_TLS_PORT           TLS-only Redis port       (default: 6380)
#   SERVICES_TLS             1: certificates and the TLS ports; 0: plaintext only (default: 1)
#   RELAY_TLS_DIR            dev certificates          (default: $RELAY_RUN_DIR/tls)
#   CASSANDRA_VERSION        org.apache.cassandra:cassandra-all version (default: 5.0.8)
#   CASSANDRA_PORT           CQL native port           (default: 9042)
#   CASSANDRA_TLS_PORT       CQL native port, TLS only (default: 9142)
#   CASSANDRA_STORAGE_PORT   inter-node storage port   (default: 7000)
#   CASSANDRA_READY_TIMEOUT  seconds to wait for CQL   (default: 180)
#   CASSANDRA_HEAP_MIN       JVM -Xms                  (default: 256m)
#   CASSANDRA_HEAP_MAX       JVM -Xmx                  (default: 2g)
#   CASSANDRA_CLUSTER_NAME   cluster_name              (default: e2ee-relay-test)
#   STOP_TIMEOUT             seconds between SIGTERM and SIGKILL (default: 30)
#   PYTHON                   interpreter for the readiness check
#                            (default: .venv/bin/python of the repo, else python3)
#   JAVA                     java binary  (default: $JAVA_HOME/bin/java, else java)
#   MVN                      maven binary (default: mvn)
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)
readonly SCRIPT_DIR REPO_ROOT
readonly HOST=127.0.0.1

abspath() {
  case $1 in
    /*) printf '%s\n' "$1" ;;
    *) printf '%s\n' "$PWD/$1" ;;
  esac
}

RELAY_CACHE_DIR=$(abspath "${RELAY_CACHE_DIR:-$HOME/.cache/e2ee-relay}")
RELAY_RUN_DIR=$(abspath "${RELAY_RUN_DIR:-$RELAY_CACHE_DIR/run}")
RELAY_MAVEN_REPO=$(abspath "${RELAY_MAVEN_REPO:-$RELAY_CACHE_DIR/m2}")
REDIS_PORT=${REDIS_PORT:-6379}
REDIS_READY_TIMEOUT=${REDIS_READY_TIMEOUT:-30}
REDIS_TLS_PORT=${REDIS_TLS_PORT:-6380}
SERVICES_TLS=${SERVICES_TLS:-1}
RELAY_TLS_DIR=$(abspath "${RELAY_TLS_DIR:-$RELAY_RUN_DIR/tls}")
CASSANDRA_VERSION=${CASSANDRA_VERSION:-5.0.8}
CASSANDRA_PORT=${CASSANDRA_PORT:-9042}
CASSANDRA_TLS_PORT=${CASSANDRA_TLS_PORT:-9142}
CASSANDRA_STORAGE_PORT=${CASSANDRA_STORAGE_PORT:-7000}
CASSANDRA_READY_TIMEOUT=${CASSANDRA_READY_TIMEOUT:-180}
CASSANDRA_HEAP_MIN=${CASSANDRA_HEAP_MIN:-256m}
CASSANDRA_HEAP_MAX=${CASSANDRA_HEAP_MAX:-2g}
CASSANDRA_CLUSTER_NAME=${CASSANDRA_CLUSTER_NAME:-e2ee-relay-test}
STOP_TIMEOUT=${STOP_TIMEOUT:-30}
if [[ -n ${JAVA_HOME:-} && -x ${JAVA_HOME:-}/bin/java ]]; then
  JAVA=${JAVA:-$JAVA_HOME/bin/java}
else
  JAVA=${JAVA:-java}
fi
MVN=${MVN:-mvn}

readonly REDIS_DIR=$RELAY_RUN_DIR/redis
readonly REDIS_PIDFILE=$REDIS_DIR/redis.pid
readonly REDIS_LOG=$REDIS_DIR/redis.log
readonly REDIS_TLS_DIR=$RELAY_RUN_DIR/redis-tls
readonly REDIS_TLS_PIDFILE=$REDIS_TLS_DIR/redis.pid
readonly REDIS_TLS_LOG=$REDIS_TLS_DIR/redis.log
readonly TLS_CA=$RELAY_TLS_DIR/ca.pem
readonly TLS_CLIENT_CERT=$RELAY_TLS_DIR/client.pem
readonly TLS_CLIENT_KEY=$RELAY_TLS_DIR/client.key

readonly CASS_HOME=$RELAY_CACHE_DIR/cassandra-$CASSANDRA_VERSION
readonly CASS_LIB=$CASS_HOME/lib
readonly CASS_MARKER=$CASS_HOME/.lib-complete
readonly CASS_DIR=$RELAY_RUN_DIR/cassandra
readonly CASS_CONF=$CASS_DIR/conf
readonly CASS_PIDFILE=$CASS_DIR/cassandra.pid
readonly CASS_LOG=$CASS_DIR/cassandra.log

# ---------------------------------------------------------------- helpers

say() { printf '%s\n' "$*"; }
warn() { printf '%s\n' "$*" >&2; }
die() {
  warn "error: $*"
  exit 1
}

now() { printf '%s' "$EPOCHREALTIME"; }
# since START -> seconds elapsed, one decimal
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }

# Pick the interpreter for the readiness checks.
python_bin() {
  if [[ -n ${PYTHON:-} ]]; then
    local p=$PYTHON
    [[ $p == */* && $p != /* && -x $REPO_ROOT/$p ]] && p=$REPO_ROOT/$p
    if command -v "$p" >/dev/null 2>&1; then
      printf '%s\n' "$p"
      return
    fi
    warn "warning: PYTHON=$PYTHON not found, falling back to python3"
  elif [[ -x $REPO_ROOT/.venv/bin/python ]]; then
    printf '%s\n' "$REPO_ROOT/.venv/bin/python"
    return
  fi
  command -v python3 >/dev/null 2>&1 || die "no python3 found for the readiness check"
  printf '%s\n' python3
}

# pid_alive PID: running and not a zombie
pid_alive() {
  local pid=$1 stat
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 0
  stat=${stat##*) }
  [[ ${stat%% *} != Z ]]
}

# pid_matches PID PATTERN: the process's command line contains PATTERN
pid_matches() {
  local cmdline
  cmdline=$(tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null) || return 1
  [[ $cmdline == *"$2"* ]]
}

# read_pid PIDFILE PATTERN -> prints the pid if the pidfile names a live matching process
read_pid() {
  local pid
  [[ -f $1 ]] || return 1
  pid=$(tr -dc '0-9' <"$1")
  if pid_alive "$pid" && pid_matches "$pid" "$2"; then
    printf '%s\n' "$pid"
    return 0
  fi
  return 1
}

tcp_open() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

# Serialise mutating commands (two concurrent `start`s must not race).
# Children must not inherit fd 9, or they would hold the lock forever.
take_lock() {
  mkdir -p "$RELAY_RUN_DIR"
  command -v flock >/dev/null 2>&1 || return 0
  exec 9>"$RELAY_RUN_DIR/.services.lock"
  if ! flock -n 9; then
    say "waiting for another services.sh in $RELAY_RUN_DIR ..."
    flock 9
  fi
}

# stop_pid NAME PIDFILE PATTERN PORT
stop_pid() {
  local name=$1 pidfile=$2 pattern=$3 port=$4 pid t0 deadline
  if ! pid=$(read_pid "$pidfile" "$pattern"); then
    rm -f "$pidfile"
    if tcp_open "$port"; then
      warn "$name: no process of ours, but something listens on $HOST:$port (not started by this script; left alone)"
    else
      say "$name: not running"
    fi
    return 0
  fi
  t0=$(now)
  kill -TERM "$pid" 2>/dev/null || true
  deadline=$((SECONDS + STOP_TIMEOUT))
  while pid_alive "$pid" && ((SECONDS < deadline)); do sleep 0.2; done
  if pid_alive "$pid"; then
    warn "$name: pid $pid still alive after ${STOP_TIMEOUT} s, sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    deadline=$((SECONDS + 10))
    while pid_alive "$pid" && ((SECONDS < deadline)); do sleep 0.2; done
    pid_alive "$pid" && die "$name: pid $pid survived SIGKILL"
  fi
  rm -f "$pidfile"
  say "$name: stopped after $(since "$t0") s (pid $pid)"
}

# ---------------------------------------------------------------- certificates

# TLS_STATE: unknown (not checked yet), on (certificates present), off (SERVICES_TLS=0
# or they could not be made); CERTS_RENEWED=1 when this run made a new set.
TLS_STATE=unknown
CERTS_RENEWED=0

# ensure_certs: make or renew the dev certificates once per run; sets TLS_STATE
ensure_certs() {
  [[ $TLS_STATE == unknown ]] || return 0
  if [[ $SERVICES_TLS != 1 ]]; then
    TLS_STATE=off
    return 0
  fi
  local out rc=0 t0
  t0=$(now)
  out=$(exec 9>&- "$(python_bin)" "$SCRIPT_DIR/make_certs.py" --dir "$RELAY_TLS_DIR" 2>&1) || rc=$?
  if ((rc != 0)); then
    warn "tls: could not make the dev certificates in $RELAY_TLS_DIR: $out"
    warn "tls: starting without the TLS ports (Redis $REDIS_TLS_PORT, Cassandra $CASSANDRA_TLS_PORT)"
    TLS_STATE=off
    return 0
  fi
  TLS_STATE=on
  if [[ $out == *regenerated* ]]; then
    CERTS_RENEWED=1
    say "tls: made dev certificates in $RELAY_TLS_DIR in $(since "$t0") s (ca.pem, service-redis, service-cassandra, client)"
  fi
}

# tls_probe PROTOCOL PORT: a TLS handshake (dev CA, client certificate) and one request
tls_probe() {
  "$(python_bin)" "$SCRIPT_DIR/tls_probe.py" --protocol "$1" --host "$HOST" --port "$2" \
    --ca "$TLS_CA" --cert "$TLS_CLIENT_CERT" --key "$TLS_CLIENT_KEY" 9>&-
}

# ---------------------------------------------------------------- redis

redis_ping() {
  if command -v redis-cli >/dev/null 2>&1; then
    [[ $(timeout 3 redis-cli -h "$HOST" -p "$REDIS_PORT" ping 2>/dev/null) == PONG ]]
  else
    "$(python_bin)" - "$HOST" "$REDIS_PORT" <<'PY' 2>/dev/null
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2) as s:
    s.sendall(b"PING\r\n")
    sys.exit(0 if s.recv(64).startswith(b"+PONG") else 1)
PY
  fi
}

install_redis() {
  command -v redis-server >/dev/null 2>&1 && return 0
  command -v apt-get >/dev/null 2>&1 || die "redis-server is not installed and apt-get is not available"
  local sudo=() t0 log=$REDIS_DIR/apt.log
  [[ $EUID -eq 0 ]] || sudo=(sudo)
  t0=$(now)
  say "redis: installing Debian package redis-server ..."
  export DEBIAN_FRONTEND=noninteractive
  if ! "${sudo[@]}" apt-get install -y -q redis-server >"$log" 2>&1; then
    say "redis: apt-get install failed; running apt-get update and retrying"
    "${sudo[@]}" apt-get update -q >>"$log" 2>&1 || true
    if ! "${sudo[@]}" apt-get install -y -q redis-server >>"$log" 2>&1; then
      tail -n 30 "$log" >&2
      die "redis: apt-get install redis-server failed (log: $log)"
    fi
  fi
  # The package may start its own redis on 6379 through its init script. That
  # one is not ours (no pidfile here, persistence on): stop it and keep it off.
  if [[ -x /etc/init.d/redis-server ]]; then
    "${sudo[@]}" /etc/init.d/redis-server stop >>"$log" 2>&1 || true
    if command -v update-rc.d >/dev/null 2>&1; then
      "${sudo[@]}" update-rc.d redis-server disable >>"$log" 2>&1 || true
    fi
  fi
  command -v redis-server >/dev/null 2>&1 || die "redis: redis-server still not on PATH after install"
  say "redis: installed $(redis-server --version | awk '{sub(/^v=/, "", $3); print $3}') in $(since "$t0") s"
}

start_redis() {
  local pid t0 deadline
  mkdir -p "$REDIS_DIR"
  if redis_ping; then
    if pid=$(read_pid "$REDIS_PIDFILE" redis-server); then
      say "redis: already running on $HOST:$REDIS_PORT (pid $pid)"
    else
      say "redis: already answering on $HOST:$REDIS_PORT (not started by this script; left alone)"
    fi
    return 0
  fi
  if tcp_open "$REDIS_PORT"; then
    die "redis: port $HOST:$REDIS_PORT is taken by something that does not answer PING"
  fi
  install_redis
  rm -f "$REDIS_PIDFILE"
  t0=$(now)
  redis-server --daemonize yes --bind "$HOST" --port "$REDIS_PORT" --protected-mode yes \
    --pidfile "$REDIS_PIDFILE" --logfile "$REDIS_LOG" --dir "$REDIS_DIR" \
    --save "" --appendonly no 9>&- </dev/null ||
    die "redis: redis-server failed to start (log: $REDIS_LOG)"
  deadline=$((SECONDS + REDIS_READY_TIMEOUT))
  while ! redis_ping; do
    if [[ -f $REDIS_PIDFILE ]] && ! read_pid "$REDIS_PIDFILE" redis-server >/dev/null; then
      tail -n 60 "$REDIS_LOG" >&2 || true
      die "redis: redis-server exited during start-up (log: $REDIS_LOG)"
    fi
    if ((SECONDS >= deadline)); then
      tail -n 60 "$REDIS_LOG" >&2 || true
      die "redis: no PONG on $HOST:$REDIS_PORT after ${REDIS_READY_TIMEOUT} s (log: $REDIS_LOG)"
    fi
    sleep 0.1
  done
  pid=$(read_pid "$REDIS_PIDFILE" redis-server || echo '?')
  say "redis: ready on $HOST:$REDIS_PORT after $(since "$t0") s (pid $pid, log $REDIS_LOG)"
}

stop_redis() { stop_pid redis "$REDIS_PIDFILE" redis-server "$REDIS_PORT"; }

redis_tls_ping() { tls_probe redis "$REDIS_TLS_PORT" 2>/dev/null; }

# The TLS Redis: a second redis-server, TLS only (--port 0), client certificates
# verified when presented (--tls-auth-clients optional).
start_redis_tls() {
  local pid t0 deadline
  ensure_certs
  [[ $TLS_STATE == on ]] || return 0
  mkdir -p "$REDIS_TLS_DIR"
  if pid=$(read_pid "$REDIS_TLS_PIDFILE" redis-server); then
    if ((CERTS_RENEWED)); then
      say "redis-tls: new certificates; restarting pid $pid"
      stop_redis_tls
    elif redis_tls_ping; then
      say "redis-tls: already running on $HOST:$REDIS_TLS_PORT (pid $pid)"
      return 0
    fi
  elif redis_tls_ping; then
    say "redis-tls: already answering on $HOST:$REDIS_TLS_PORT (not started by this script; left alone)"
    return 0
  fi
  if tcp_open "$REDIS_TLS_PORT"; then
    die "redis-tls: port $HOST:$REDIS_TLS_PORT is taken by something that does not answer a TLS PING verified by $TLS_CA (set REDIS_TLS_PORT)"
  fi
  install_redis
  rm -f "$REDIS_TLS_PIDFILE"
  t0=$(now)
  redis-server --daemonize yes --bind "$HOST" --port 0 --tls-port "$REDIS_TLS_PORT" \
    --tls-cert-file "$RELAY_TLS_DIR/service-redis.pem" \
    --tls-key-file "$RELAY_TLS_DIR/service-redis.key" \
    --tls-ca-cert-file "$TLS_CA" --tls-auth-clients optional --protected-mode yes \
    --pidfile "$REDIS_TLS_PIDFILE" --logfile "$REDIS_TLS_LOG" --dir "$REDIS_TLS_DIR" \
    --save "" --appendonly no 9>&- </dev/null ||
    die "redis-tls: redis-server failed to start (log: $REDIS_TLS_LOG)"
  deadline=$((SECONDS + REDIS_READY_TIMEOUT))
  while ! redis_tls_ping; do
    if [[ -f $REDIS_TLS_PIDFILE ]] && ! read_pid "$REDIS_TLS_PIDFILE" redis-server >/dev/null; then
      tail -n 60 "$REDIS_TLS_LOG" >&2 || true
      die "redis-tls: redis-server exited during start-up (log: $REDIS_TLS_LOG)"
    fi
    if ((SECONDS >= deadline)); then
      tail -n 60 "$REDIS_TLS_LOG" >&2 || true
      tls_probe redis "$REDIS_TLS_PORT" || true
      die "redis-tls: no TLS PONG on $HOST:$REDIS_TLS_PORT after ${REDIS_READY_TIMEOUT} s (log: $REDIS_TLS_LOG)"
    fi
    sleep 0.1
  done
  pid=$(read_pid "$REDIS_TLS_PIDFILE" redis-server || echo '?')
  say "redis-tls: ready on $HOST:$REDIS_TLS_PORT after $(since "$t0") s (pid $pid, CA $TLS_CA)"
}

stop_redis_tls() { stop_pid redis-tls "$REDIS_TLS_PIDFILE" redis-server "$REDIS_TLS_PORT"; }

# ---------------------------------------------------------------- cassandra

fetch_cassandra() {
  local jar=$CASS_LIB/cassandra-all-$CASSANDRA_VERSION.jar tmp t0 n size
  if [[ -f $CASS_MARKER && -f $jar ]]; then
    return 0
  fi
  command -v "$MVN" >/dev/null 2>&1 || die "cassandra: '$MVN' (Maven) not found; apt-get install maven"
  t0=$(now)
  say "cassandra: downloading cassandra-all $CASSANDRA_VERSION and its dependencies from Maven Central ..."
  mkdir -p "$CASS_HOME"
  tmp=$(mktemp -d "$CASS_HOME/fetch.XXXXXX")
  cp "$SCRIPT_DIR/pom.xml" "$tmp/pom.xml"
  if ! (cd "$tmp" && "$MVN" -B -q -f "$tmp/pom.xml" \
    -Dmaven.repo.local="$RELAY_MAVEN_REPO" -Dcassandra.version="$CASSANDRA_VERSION" \
    dependency:copy-dependencies -DoutputDirectory="$tmp/lib" -DincludeScope=runtime \
    >"$tmp/mvn.log" 2>&1 9>&- </dev/null); then
    tail -n 40 "$tmp/mvn.log" >&2
    cp "$tmp/mvn.log" "$CASS_HOME/fetch.log" 2>/dev/null || true
    rm -rf "$tmp"
    die "cassandra: Maven download failed (log: $CASS_HOME/fetch.log)"
  fi
  if [[ ! -f $tmp/lib/cassandra-all-$CASSANDRA_VERSION.jar ]] || ! compgen -G "$tmp/lib/jamm-*.jar" >/dev/null; then
    cp "$tmp/mvn.log" "$CASS_HOME/fetch.log"
    rm -rf "$tmp"
    die "cassandra: download incomplete (no cassandra-all or jamm jar; log: $CASS_HOME/fetch.log)"
  fi
  rm -rf "$CASS_LIB"
  mv "$tmp/lib" "$CASS_LIB"
  mv "$tmp/mvn.log" "$CASS_HOME/fetch.log"
  rm -rf "$tmp"
  n=$(find "$CASS_LIB" -name '*.jar' | wc -l)
  size=$(du -sm "$CASS_LIB" | cut -f1)
  printf 'version=%s\njars=%s\nfetched=%s\n' "$CASSANDRA_VERSION" "$n" "$(date -u +%FT%TZ)" >"$CASS_MARKER"
  say "cassandra: fetched $n jars ($size MiB) in $(since "$t0") s into $CASS_LIB"
}

write_cassandra_conf() {
  local tpl
  mkdir -p "$CASS_CONF" "$CASS_DIR/logs" "$CASS_DIR/triggers"
  tpl=$(<"$SCRIPT_DIR/cassandra.yaml.template")
  tpl=${tpl//@CLUSTER_NAME@/$CASSANDRA_CLUSTER_NAME}
  tpl=${tpl//@HOST@/$HOST}
  tpl=${tpl//@STORAGE_PORT@/$CASSANDRA_STORAGE_PORT}
  tpl=${tpl//@NATIVE_PORT@/$CASSANDRA_PORT}
  tpl=${tpl//@DATA_DIR@/$CASS_DIR}
  tpl=${tpl//@CLIENT_ENCRYPTION@/$(client_encryption)}
  printf '%s\n' "$tpl" >"$CASS_CONF/cassandra.yaml"
  cp "$SCRIPT_DIR/logback.xml" "$CASS_CONF/logback.xml"
  # java @argfiles have no comments: strip them.
  grep -Ev '^[[:space:]]*(#|$)' "$SCRIPT_DIR/jvm17-server.options" >"$CASS_CONF/jvm.args"
}

# The cassandra.yaml lines for client encryption: a second native port that speaks
# only TLS, with the PEM files of $RELAY_TLS_DIR, client certificates required. The
# plaintext port stays plaintext (Cassandra serves it UNENCRYPTED when the two differ).
client_encryption() {
  if [[ $TLS_STATE != on ]]; then
    printf '%s\n' "# client encryption: off (SERVICES_TLS=0 or no dev certificates)"
    return
  fi
  cat <<EOF
native_transport_port_ssl: $CASSANDRA_TLS_PORT
client_encryption_options:
  enabled: true
  optional: false
  ssl_context_factory:
    class_name: org.apache.cassandra.security.PEMBasedSslContextFactory
  keystore: $RELAY_TLS_DIR/cassandra-keystore.pem
  truststore: $TLS_CA
  require_client_auth: true
EOF
}

# wait_cassandra_tls PID: wait for the TLS port to answer OPTIONS; exit 1 if it does not
wait_cassandra_tls() {
  local pid=$1 deadline
  [[ $TLS_STATE == on ]] || return 0
  deadline=$((SECONDS + 30))
  while ! tls_probe cql "$CASSANDRA_TLS_PORT" 2>/dev/null; do
    if ((SECONDS >= deadline)) || ! pid_alive "$pid"; then
      tail -n 60 "$CASS_LOG" >&2 || true
      tls_probe cql "$CASSANDRA_TLS_PORT" || true
      die "cassandra: plaintext CQL is up but the TLS port $HOST:$CASSANDRA_TLS_PORT does not answer (log: $CASS_LOG)"
    fi
    sleep 0.2
  done
  say "cassandra: TLS on $HOST:$CASSANDRA_TLS_PORT (client certificate required, CA $TLS_CA)"
}

# wait_cassandra PID T0: wait for CQL; on failure show the log and exit 1
wait_cassandra() {
  local pid=$1 t0=$2 rc=0 out py
  py=$(python_bin)
  # exec: no subshell left holding the lock fd if this script is killed.
  out=$(exec 9>&- "$py" "$SCRIPT_DIR/cassandra_ready.py" --host "$HOST" --port "$CASSANDRA_PORT" \
    --timeout "$CASSANDRA_READY_TIMEOUT" --pid "$pid") || rc=$?
  case $rc in
    0)
      say "cassandra: ready on $HOST:$CASSANDRA_PORT after $(since "$t0") s (release $out, pid $pid, log $CASS_LOG)"
      wait_cassandra_tls "$pid"
      return 0
      ;;
    2) warn "cassandra: the JVM (pid $pid) exited during start-up; last 60 lines of $CASS_LOG:" ;;
    *) warn "cassandra: not answering CQL after ${CASSANDRA_READY_TIMEOUT} s; last 60 lines of $CASS_LOG:" ;;
  esac
  tail -n 60 "$CASS_LOG" >&2 || true
  if pid_alive "$pid"; then
    warn "cassandra: stopping the unresponsive JVM (pid $pid)"
    stop_cassandra >&2
  fi
  rm -f "$CASS_PIDFILE"
  exit 1
}

start_cassandra() {
  local pid t0 jamm rc=0
  mkdir -p "$CASS_DIR"
  ensure_certs
  if pid=$(read_pid "$CASS_PIDFILE" CassandraDaemon); then
    if ! "$(python_bin)" "$SCRIPT_DIR/cassandra_ready.py" --host "$HOST" --port "$CASSANDRA_PORT" \
      --timeout 5 >/dev/null 2>&1 9>&-; then
      say "cassandra: pid $pid is still starting; waiting for it"
      wait_cassandra "$pid" "$(now)"
      return 0
    fi
    if [[ $TLS_STATE == on ]] && ((CERTS_RENEWED)); then
      say "cassandra: new certificates; restarting pid $pid so that its TLS port serves them"
      stop_cassandra
    elif [[ $TLS_STATE == on ]] && ! tls_probe cql "$CASSANDRA_TLS_PORT" 2>/dev/null; then
      say "cassandra: pid $pid has no TLS port $CASSANDRA_TLS_PORT (started by an older services.sh); restarting it"
      stop_cassandra
    else
      say "cassandra: already running on $HOST:$CASSANDRA_PORT (pid $pid)"
      return 0
    fi
  fi
  rm -f "$CASS_PIDFILE"
  if tcp_open "$CASSANDRA_PORT"; then
    "$(python_bin)" "$SCRIPT_DIR/cassandra_ready.py" --host "$HOST" --port "$CASSANDRA_PORT" \
      --timeout 5 >/dev/null 2>&1 9>&- || rc=$?
    if ((rc == 0)); then
      say "cassandra: already answering on $HOST:$CASSANDRA_PORT (not started by this script; left alone)"
      return 0
    fi
    die "cassandra: port $HOST:$CASSANDRA_PORT is taken by something that does not answer CQL"
  fi
  if tcp_open "$CASSANDRA_STORAGE_PORT"; then
    die "cassandra: storage port $HOST:$CASSANDRA_STORAGE_PORT is taken (set CASSANDRA_STORAGE_PORT)"
  fi
  if [[ $TLS_STATE == on ]] && tcp_open "$CASSANDRA_TLS_PORT"; then
    die "cassandra: TLS port $HOST:$CASSANDRA_TLS_PORT is taken (set CASSANDRA_TLS_PORT)"
  fi
  command -v "$JAVA" >/dev/null 2>&1 || die "cassandra: '$JAVA' not found; apt-get install openjdk-17-jre-headless"
  fetch_cassandra
  write_cassandra_conf
  jamm=$(compgen -G "$CASS_LIB/jamm-*.jar" | head -n 1)
  if [[ -f $CASS_LOG ]]; then mv -f "$CASS_LOG" "$CASS_LOG.1"; fi
  t0=$(now)
  # setsid: own session, so the node outlives this shell and its terminal.
  setsid "$JAVA" "@$CASS_CONF/jvm.args" \
    "-Xms$CASSANDRA_HEAP_MIN" "-Xmx$CASSANDRA_HEAP_MAX" \
    "-javaagent:$jamm" \
    "-Dcassandra.config=file://$CASS_CONF/cassandra.yaml" \
    "-Dcassandra.storagedir=$CASS_DIR" \
    "-Dcassandra.logdir=$CASS_DIR/logs" \
    "-Dcassandra.triggers_dir=$CASS_DIR/triggers" \
    "-Dlogback.configurationFile=$CASS_CONF/logback.xml" \
    -cp "$CASS_LIB/*" org.apache.cassandra.service.CassandraDaemon \
    </dev/null >"$CASS_LOG" 2>&1 9>&- &
  pid=$!
  printf '%s\n' "$pid" >"$CASS_PIDFILE"
  say "cassandra: started JVM pid $pid ($CASSANDRA_VERSION, heap $CASSANDRA_HEAP_MIN..$CASSANDRA_HEAP_MAX); waiting up to ${CASSANDRA_READY_TIMEOUT} s for CQL ..."
  wait_cassandra "$pid" "$t0"
}

stop_cassandra() { stop_pid cassandra "$CASS_PIDFILE" CassandraDaemon "$CASSANDRA_PORT"; }

# ---------------------------------------------------------------- commands

status() {
  local pid rc=0 release
  if redis_ping; then
    pid=$(read_pid "$REDIS_PIDFILE" redis-server || echo 'not ours')
    say "redis:     up   $HOST:$REDIS_PORT (pid $pid)"
  else
    say "redis:     down $HOST:$REDIS_PORT"
    rc=3
  fi
  if [[ $SERVICES_TLS == 1 ]]; then
    if [[ -f $TLS_CA ]] && redis_tls_ping; then
      pid=$(read_pid "$REDIS_TLS_PIDFILE" redis-server || echo 'not ours')
      say "redis-tls: up   $HOST:$REDIS_TLS_PORT (pid $pid, CA $TLS_CA)"
    else
      say "redis-tls: down $HOST:$REDIS_TLS_PORT"
      rc=3
    fi
  fi
  if tcp_open "$CASSANDRA_PORT" &&
    release=$("$(python_bin)" "$SCRIPT_DIR/cassandra_ready.py" --host "$HOST" \
      --port "$CASSANDRA_PORT" --timeout 5 2>/dev/null); then
    pid=$(read_pid "$CASS_PIDFILE" CassandraDaemon || echo 'not ours')
    say "cassandra: up   $HOST:$CASSANDRA_PORT (pid $pid, release $release)"
  elif pid=$(read_pid "$CASS_PIDFILE" CassandraDaemon); then
    say "cassandra: down $HOST:$CASSANDRA_PORT (JVM pid $pid running but not answering CQL: starting?)"
    rc=3
  else
    say "cassandra: down $HOST:$CASSANDRA_PORT"
    rc=3
  fi
  if [[ $SERVICES_TLS == 1 ]]; then
    if [[ -f $TLS_CA ]] && tls_probe cql "$CASSANDRA_TLS_PORT" 2>/dev/null; then
      say "cassandra: up   $HOST:$CASSANDRA_TLS_PORT (TLS, client certificate required)"
    else
      say "cassandra: down $HOST:$CASSANDRA_TLS_PORT (TLS)"
      rc=3
    fi
  fi
  return "$rc"
}

wipe() {
  stop_cassandra
  stop_redis_tls
  stop_redis
  [[ -n $RELAY_RUN_DIR && $RELAY_RUN_DIR != / ]] || die "refusing to wipe RELAY_RUN_DIR='$RELAY_RUN_DIR'"
  rm -rf "$CASS_DIR" "$REDIS_DIR" "$REDIS_TLS_DIR" "$RELAY_TLS_DIR"
  say "wiped $CASS_DIR, $REDIS_DIR, $REDIS_TLS_DIR and $RELAY_TLS_DIR (downloads in $RELAY_CACHE_DIR kept)"
}

usage() {
  cat <<EOF
usage: ${0##*/} {start|stop|restart|status|start-redis|stop-redis|start-redis-tls|stop-redis-tls|start-cassandra|stop-cassandra|certs|fetch|wipe}
  start     install (cached) and start Redis ($HOST:$REDIS_PORT, TLS $HOST:$REDIS_TLS_PORT)
            and Cassandra ($HOST:$CASSANDRA_PORT, TLS $HOST:$CASSANDRA_TLS_PORT)
  stop      stop both services
  restart   stop, then start
  status    show whether each service answers (exit 0 if all up, 3 otherwise)
  start-redis | stop-redis | start-redis-tls | stop-redis-tls | start-cassandra | stop-cassandra
            one service only
  certs     only make (or renew) the dev certificates in $RELAY_TLS_DIR
  fetch     only download the Cassandra $CASSANDRA_VERSION jars into $RELAY_CACHE_DIR
  wipe      stop both and delete their data, logs and certificates under $RELAY_RUN_DIR
Environment variables are documented at the top of this script and in docs/services.md.
EOF
}

main() {
  local cmd=${1:-}
  case $cmd in
    start)
      take_lock
      start_redis
      start_redis_tls
      start_cassandra
      ;;
    stop)
      take_lock
      stop_cassandra
      stop_redis_tls
      stop_redis
      ;;
    restart)
      take_lock
      stop_cassandra
      stop_redis_tls
      stop_redis
      start_redis
      start_redis_tls
      start_cassandra
      ;;
    status) status ;;
    start-redis)
      take_lock
      start_redis
      ;;
    stop-redis)
      take_lock
      stop_redis
      ;;
    start-redis-tls)
      take_lock
      start_redis_tls
      ;;
    stop-redis-tls)
      take_lock
      stop_redis_tls
      ;;
    certs)
      take_lock
      ensure_certs
      [[ $TLS_STATE == on ]] || die "tls: no certificates (SERVICES_TLS=$SERVICES_TLS)"
      say "tls: dev certificates in $RELAY_TLS_DIR"
      ;;
    start-cassandra)
      take_lock
      start_cassandra
      ;;
    stop-cassandra)
      take_lock
      stop_cassandra
      ;;
    fetch)
      take_lock
      fetch_cassandra
      say "cassandra: jars cached in $CASS_LIB"
      ;;
    wipe)
      take_lock
      wipe
      ;;
    -h | --help | help) usage ;;
    *)
      usage >&2
      [[ -n $cmd ]] && warn "unknown command: $cmd"
      exit 2
      ;;
  esac
}

main "$@"
