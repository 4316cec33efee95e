#!/usr/bin/env bash
# Runs the gateway load matrix of docs/PERFORMANCE.md ("Gateway") and prints tern-load's RESULT
# lines. Each case starts a fresh gateway on an empty data directory and stops it afterwards.
#
#   benches/gateway-load.sh                # everything (about 8 minutes)
#   benches/gateway-load.sh pairs          # only the pairs cases
#   benches/gateway-load.sh conns          # only the idle-connection case
#   benches/gateway-load.sh storm          # reconnect storm: CONNS clients dropped at once
#   benches/gateway-load.sh quic           # pairs over TCP and over QUIC, side by side
#   benches/gateway-load.sh dual           # pairs over TCP, QUIC and both at once (dual channel)
#
# Environment: PORT (default 7655), DURATION (default 10s), PAIRS (default 100),
# CORES_LIST (default "2 1"), CONNS (default 19000), CONNS_CORES (default 2), JITTER (default 2s,
# the storm's reconnect window), WORK (default /tmp/tern-gateway-load).
set -euo pipefail

cd "$(dirname "$0")/.."
PORT=${PORT:-7655}
DURATION=${DURATION:-10s}
PAIRS=${PAIRS:-100}
CORES_LIST=${CORES_LIST:-"2 1"}
CONNS=${CONNS:-19000}
CONNS_CORES=${CONNS_CORES:-2}
JITTER=${JITTER:-2s}
WORK=${WORK:-/tmp/tern-gateway-load}
WHAT=${1:-all}

# Built separately: one cargo invocation would unify features and rebuild both.
cargo build --release -p tern-gateway --bins >&2
cargo build --release -p tern-benches --bins >&2
BIN="${CARGO_TARGET_DIR:-target}/release"
GW_PID=""

start_gateway() { # durability cores
    rm -rf "$WORK/data" "$WORK/gateway.log"
    mkdir -p "$WORK/data"
    : >"$WORK/gateway.log"
    # One load-generator connection sends far more than the per-client rate limits a public
    # server wants; the benchmark measures the gateway, not its limits.
    printf 'rate_messages_per_sec = 0\nrate_user_messages_per_sec = 0\nrate_requests_per_sec = 0\nrate_read_bytes_per_sec = 0\n' \
        >"$WORK/bench.toml"
    "$BIN"/tern-gateway --config "$WORK/bench.toml" --data-dir "$WORK/data" \
        --tcp "127.0.0.1:$PORT" --quic "127.0.0.1:$PORT" --durability "$1" --cores "$2" \
        --log warn 2>"$WORK/gateway.log" &
    GW_PID=$!
    for _ in $(seq 100); do
        if grep -q "listening on" "$WORK/gateway.log"; then
            return 0
        fi
        sleep 0.1
    done
    echo "gateway did not start:" >&2
    cat "$WORK/gateway.log" >&2
    exit 1
}

stop_gateway() {
    [ -n "$GW_PID" ] || return 0
    kill -TERM "$GW_PID" 2>/dev/null || true
    wait "$GW_PID" 2>/dev/null || true
    GW_PID=""
}
trap stop_gateway EXIT

pairs() { # durability cores label extra-args...
    local d=$1 c=$2 label=$3
    shift 3
    start_gateway "$d" "$c"
    echo "== pairs $label (load: $(cut -d' ' -f1-3 /proc/loadavg))" >&2
    "$BIN"/tern-load pairs --server "127.0.0.1:$PORT" --data-dir "$WORK/data" \
        --pairs "$PAIRS" --duration "$DURATION" --gateway-pid "$GW_PID" --label "$label" "$@" \
        | tee -a "$WORK/pairs.txt" || true
    stop_gateway
}

if [ "$WHAT" = all ] || [ "$WHAT" = pairs ]; then
    for c in $CORES_LIST; do
        for d in fsync wal memory; do
            pairs "$d" "$c" "$d-cores$c"
        done
        pairs fsync "$c" "fsync-cores$c-20k" --rate 20000
    done
fi

if [ "$WHAT" = all ] || [ "$WHAT" = quic ]; then
    # The same pairs over QUIC (the gateway's UDP port is the TCP port number).
    for c in $CORES_LIST; do
        pairs fsync "$c" "tcp-fsync-cores$c"
        pairs fsync "$c" "quic-fsync-cores$c" --transport quic
        pairs fsync "$c" "quic-fsync-cores$c-20k" --transport quic --rate 20000
    done
fi

if [ "$WHAT" = all ] || [ "$WHAT" = dual ]; then
    # Dual channel: every user on a TCP connection and a QUIC one joined to its session, each
    # Send on both, each Deliver on both (the gateway's UDP port is the TCP port number).
    for c in $CORES_LIST; do
        pairs fsync "$c" "tcp-fsync-cores$c"
        pairs fsync "$c" "quic-fsync-cores$c" --transport quic
        pairs fsync "$c" "dual-fsync-cores$c" --transport dual --quic-server "127.0.0.1:$PORT"
        pairs fsync "$c" "dual-fsync-cores$c-20k" --transport dual --quic-server "127.0.0.1:$PORT" \
            --rate 20000
    done
fi

if [ "$WHAT" = all ] || [ "$WHAT" = conns ]; then
    for c in $CONNS_CORES; do
        start_gateway fsync "$c"
        echo "== conns $CONNS, gateway cores $c (load: $(cut -d' ' -f1-3 /proc/loadavg))" >&2
        "$BIN"/tern-load conns --server "127.0.0.1:$PORT" --data-dir "$WORK/data" \
            --count "$CONNS" --procs 2 --source-ips 127.0.0.2,127.0.0.3 \
            --gateway-pid "$GW_PID" --hold 5s | tee -a "$WORK/conns.txt" || true
        stop_gateway
    done
fi

if [ "$WHAT" = all ] || [ "$WHAT" = storm ]; then
    # Reconnect storm: CONNS logged-in clients over 2 generator processes (each holds at most its
    # open-file limit), every 10th having been sent a message, all dropped at once; each
    # reconnects within JITTER, retries with backoff (CONNECTION_LIMIT included) and syncs.
    for c in $CORES_LIST; do
        start_gateway fsync "$c"
        echo "== storm $CONNS, gateway cores $c (load: $(cut -d' ' -f1-3 /proc/loadavg))" >&2
        "$BIN"/tern-load conns --storm --server "127.0.0.1:$PORT" --data-dir "$WORK/data" \
            --count "$CONNS" --procs 2 --source-ips 127.0.0.2,127.0.0.3 \
            --gateway-pid "$GW_PID" --hold 2s --jitter "$JITTER" --storm-timeout 120s \
            --message-every 10 | tee -a "$WORK/storm.txt" || true
        if ! grep -qs '^State:[[:space:]]*[RSDT]' "/proc/$GW_PID/status"; then
            echo "gateway died during the storm; its log:" >&2
            tail -n 50 "$WORK/gateway.log" >&2
        fi
        stop_gateway
    done
fi
