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
#   benches/gateway-load.sh flood          # pairs at FLOOD_RATE alone, then under a connection flood
#   benches/gateway-load.sh fanout         # one group with K online members and one sender
#   benches/gateway-load.sh room           # pairs alone, then next to a busy live room
#   benches/gateway-load.sh webhook        # pairs without webhooks, then with a dead endpoint
#
# Environment: PORT (default 7655), DURATION (default 10s), PAIRS (default 100),
# CORES_LIST (default "2 1"), CONNS (default 19000), CONNS_CORES (default 2), JITTER (default 2s,
# the storm's reconnect window), WORK (default /tmp/tern-gateway-load), GATEWAY_CONFIG (extra
# lines for the gateway's configuration file, e.g. 'max_connections_per_ip = 1000').
# Flood: FLOOD_RATE (default 5000, the pairs' Sends/s), FLOOD_MODES (default
# "connect-close silent"; also "garbage"), FLOOD_CONCURRENCY (default 256, attempts in flight for
# connect-close and garbage), FLOOD_HOLD (default 10000, sockets held open at once by silent),
# FLOOD_START (default "before": the flood starts 1 s before the pairs log in; "after": 1 s after).
# Fan-out: FANOUT_MEMBERS (default "1000 10000"), FANOUT_RATE_<K> (the fixed-rate run's Sends/s
# for K members; default 1,000,000 / K, i.e. a million deliveries/s offered), FANOUT_READERS
# (default 1: threads reading the members; 0 = one per CPU), FANOUT_READ_PAUSE_US (default 0: how
# long each reader waits after a round of reads, see `tern-load fanout --help`).
# Room: ROOM_VIEWERS (default 18000), ROOM_RATE (default 20 messages/s).
# Webhook: WEBHOOK_CORES (default 2), WEBHOOK_RATES (default "0 5000": the pairs' Sends/s, 0 = as
# fast as the window allows), WEBHOOK_PORT (default PORT + 1, the dead endpoint's TCP port).
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
FLOOD_RATE=${FLOOD_RATE:-5000}
FLOOD_MODES=${FLOOD_MODES:-"connect-close silent"}
FLOOD_CONCURRENCY=${FLOOD_CONCURRENCY:-256}
FLOOD_HOLD=${FLOOD_HOLD:-10000}
FANOUT_MEMBERS=${FANOUT_MEMBERS:-"1000 10000"}
FANOUT_READERS=${FANOUT_READERS:-1}
FANOUT_READ_PAUSE_US=${FANOUT_READ_PAUSE_US:-0}
ROOM_VIEWERS=${ROOM_VIEWERS:-18000}
ROOM_RATE=${ROOM_RATE:-20}
WEBHOOK_CORES=${WEBHOOK_CORES:-2}
WEBHOOK_RATES=${WEBHOOK_RATES:-"0 5000"}
WEBHOOK_PORT=${WEBHOOK_PORT:-$((PORT + 1))}
# Extra configuration after GATEWAY_CONFIG (the webhook case's [webhook] table).
WEBHOOK_TOML=""
WHAT=${1:-all}

# Built separately: one cargo invocation would unify features and rebuild both.
cargo build --release -p tern-gateway --bins >&2
cargo build --release -p tern-benches --bins >&2
BIN="${CARGO_TARGET_DIR:-target}/release"
GW_PID=""
FLOOD_PID=""

start_gateway() { # durability cores
    rm -rf "$WORK/data" "$WORK/gateway.log"
    mkdir -p "$WORK/data"
    : >"$WORK/gateway.log"
    # One load-generator connection sends far more than the per-client rate limits a public
    # server wants; the benchmark measures the gateway, not its limits.
    printf 'rate_messages_per_sec = 0\nrate_user_messages_per_sec = 0\nrate_requests_per_sec = 0\nrate_read_bytes_per_sec = 0\n' \
        >"$WORK/bench.toml"
    [ -z "${GATEWAY_CONFIG:-}" ] || printf '%s\n' "$GATEWAY_CONFIG" >>"$WORK/bench.toml"
    [ -z "$WEBHOOK_TOML" ] || printf '%s\n' "$WEBHOOK_TOML" >>"$WORK/bench.toml"
    "$BIN"/tern-gateway --config "$WORK/bench.toml" --data-dir "$WORK/data" \
        --tcp "127.0.0.1:$PORT" --quic "127.0.0.1:$PORT" --api 127.0.0.1:0 --durability "$1" --cores "$2" \
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
    if [ -n "$FLOOD_PID" ]; then
        kill -TERM "$FLOOD_PID" 2>/dev/null || true
        wait "$FLOOD_PID" 2>/dev/null || true
        FLOOD_PID=""
    fi
    [ -n "$GW_PID" ] || return 0
    kill -TERM "$GW_PID" 2>/dev/null || true
    wait "$GW_PID" 2>/dev/null || true
    GW_PID=""
FLOOD_PID=""
}
trap stop_gateway EXIT

run_pairs() { # out-file label extra-args... (against the running gateway)
    local out=$1 label=$2
    shift 2
    echo "== pairs $label (load: $(cut -d' ' -f1-3 /proc/loadavg))" >&2
    "$BIN"/tern-load pairs --server "127.0.0.1:$PORT" --data-dir "$WORK/data" \
        --pairs "$PAIRS" --duration "$DURATION" --gateway-pid "$GW_PID" --label "$label" "$@" \
        | tee -a "$out" || true
}

pairs() { # durability cores label extra-args...
    local d=$1 c=$2 label=$3
    shift 3
    start_gateway "$d" "$c"
    run_pairs "$WORK/pairs.txt" "$label" "$@"
    stop_gateway
}

gateway_alive() { # what-just-happened
    if ! grep -qs '^State:[[:space:]]*[RSDT]' "/proc/$GW_PID/status"; then
        echo "gateway died $1; its log:" >&2
        tail -n 50 "$WORK/gateway.log" >&2
        GW_PID=""
    fi
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
            --gateway-pid "$GW_PID" --hold 5s --settle 5s | tee -a "$WORK/conns.txt" || true
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

if [ "$WHAT" = all ] || [ "$WHAT" = flood ]; then
    # Does a flood of connection attempts starve logged-in users? Pairs at a fixed rate alone
    # (baseline), then the same pairs while `tern-load flood` (another process, from 127.0.0.2)
    # floods the same TCP port with connections that never log in, one round per mode. The flood
    # starts 1 s before the pairs log in and lasts 3 s longer than they send, so the pairs' logins
    # and their whole send window are under it. The pairs' RESULT lines are comparable: delivered
    # rate (must be FLOOD_RATE), p50/p99, lost and dup (must be 0).
    secs=${DURATION%s}
    case $secs in '' | *[!0-9]*)
        echo "flood: DURATION must be whole seconds (e.g. 10s), not $DURATION" >&2
        exit 1
        ;;
    esac
    : >"$WORK/flood.txt"
    for c in $CORES_LIST; do
        start_gateway fsync "$c"
        run_pairs "$WORK/flood.txt" "baseline-fsync-cores$c" --rate "$FLOOD_RATE"
        gateway_alive "during the baseline"
        stop_gateway
        for mode in $FLOOD_MODES; do
            conc=$FLOOD_CONCURRENCY
            [ "$mode" = silent ] && conc=$FLOOD_HOLD
            start_gateway fsync "$c"
            echo "== flood $mode, $conc in flight, $((secs + 3))s (load: $(cut -d' ' -f1-3 /proc/loadavg))" >&2
            flood=("$BIN"/tern-load flood --server "127.0.0.1:$PORT" --source-ips 127.0.0.2
                --mode "$mode" --concurrency "$conc" --duration "$((secs + 3))s"
                --gateway-pid "$GW_PID" --label "$mode-fsync-cores$c")
            if [ "${FLOOD_START:-before}" = after ]; then
                # The pairs log in undisturbed; the flood starts 1 s into their send window.
                run_pairs "$WORK/flood.txt" "flood-$mode-after-login-fsync-cores$c" \
                    --rate "$FLOOD_RATE" &
                pairs_pid=$!
                sleep 1
                "${flood[@]}" >"$WORK/flood-$mode.out" 2>&1 &
                FLOOD_PID=$!
                wait "$pairs_pid" || true
            else
                "${flood[@]}" >"$WORK/flood-$mode.out" 2>&1 &
                FLOOD_PID=$!
                sleep 1
                run_pairs "$WORK/flood.txt" "flood-$mode-fsync-cores$c" --rate "$FLOOD_RATE"
            fi
            wait "$FLOOD_PID" || true
            FLOOD_PID=""
            cat "$WORK/flood-$mode.out"
            grep '^RESULT' "$WORK/flood-$mode.out" >>"$WORK/flood.txt" || true
            gateway_alive "during the $mode flood"
            if [ -n "$GW_PID" ]; then
                echo "gateway log: $(grep -c . "$WORK/gateway.log") lines, $(grep -ci 'warn' "$WORK/gateway.log") warnings" >&2
                grep -i 'warn\|error' "$WORK/gateway.log" | sort | uniq -c | sort -rn | head -5 >&2 || true
            fi
            stop_gateway
        done
    done
    echo "== flood summary (pairs: baseline, then under each flood; flood processes after)"
    grep '^RESULT workload=pairs' "$WORK/flood.txt" \
        | awk '{ l = ""; for (i = 2; i <= NF; i++) if ($i ~ /^(label|delivered_per_s|p50_us|p99_us|p999_us|max_us|lost|dup|errors)=/) l = l " " $i; print "pairs" l }' || true
    grep '^RESULT workload=flood' "$WORK/flood.txt" \
        | awk '{ l = ""; for (i = 2; i <= NF; i++) if ($i ~ /^(mode|attempts_per_s|connected|errors|refused|connect_p99_us|endings|held_p50_ms|gw_cpu_pct|listen_overflows|gw_rss_start_kib|gw_rss_peak_kib|gw_rss_after_kib|gw_fds_peak|gw_fds_after)=/) l = l " " $i; print "flood" l }' || true
    grep '^RESULT' "$WORK/flood.txt" || true
fi

if [ "$WHAT" = all ] || [ "$WHAT" = fanout ]; then
    # Group fan-out: one group with K online members and one sender, for each K in
    # FANOUT_MEMBERS: as fast as a window of 64 unanswered Sends allows, then at a fixed rate
    # (FANOUT_RATE_<K>, default 100 msgs/s for K=10,000 and 1,000 for K=1,000) for the latency.
    : >"$WORK/fanout.txt"
    for c in $CORES_LIST; do
        for k in $FANOUT_MEMBERS; do
            rate_var="FANOUT_RATE_$k"
            rate=${!rate_var:-$((1000000 / k))}
            for r in 0 "$rate"; do
                start_gateway fsync "$c"
                echo "== fanout members $k rate $r, gateway cores $c (load: $(cut -d' ' -f1-3 /proc/loadavg))" >&2
                "$BIN"/tern-load fanout --server "127.0.0.1:$PORT" --data-dir "$WORK/data" \
                    --members "$k" --rate "$r" --readers "$FANOUT_READERS" \
                    --read-pause-us "$FANOUT_READ_PAUSE_US" \
                    --duration "$DURATION" --gateway-pid "$GW_PID" \
                    --label "fsync-cores$c" | tee -a "$WORK/fanout.txt" || true
                gateway_alive "during fanout"
                stop_gateway
            done
        done
    done
    grep '^RESULT' "$WORK/fanout.txt" || true
fi

if [ "$WHAT" = all ] || [ "$WHAT" = room ]; then
    # A busy live room next to 1:1 traffic: pairs at full speed alone (baseline), then the same
    # pairs while one room with ROOM_VIEWERS viewers gets ROOM_RATE messages/s (every 10th a
    # priority message) from another tern-load process. The room's RESULT line follows.
    secs=${DURATION%s}
    : >"$WORK/room.txt"
    for c in $CORES_LIST; do
        start_gateway fsync "$c"
        run_pairs "$WORK/room.txt" "baseline-fsync-cores$c"
        stop_gateway
        start_gateway fsync "$c"
        echo "== room $ROOM_VIEWERS viewers at $ROOM_RATE msgs/s, gateway cores $c" >&2
        "$BIN"/tern-load fanout --room --server "127.0.0.1:$PORT" --data-dir "$WORK/data" \
            --members "$ROOM_VIEWERS" --rate "$ROOM_RATE" --priority-every 10 \
            --duration "$((secs + 4))s" --gateway-pid "$GW_PID" --label "room-fsync-cores$c" \
            >"$WORK/room.out" 2>&1 &
        FLOOD_PID=$!
        for _ in $(seq 600); do
            grep -qs "members logged in" "$WORK/room.out" && break
            sleep 0.1
        done
        sleep 1
        run_pairs "$WORK/room.txt" "with-room-fsync-cores$c"
        wait "$FLOOD_PID" || true
        FLOOD_PID=""
        cat "$WORK/room.out"
        grep '^RESULT' "$WORK/room.out" >>"$WORK/room.txt" || true
        gateway_alive "during the room"
        stop_gateway
    done
    grep '^RESULT' "$WORK/room.txt" || true
fi

if [ "$WHAT" = all ] || [ "$WHAT" = webhook ]; then
    # Does a dead webhook endpoint slow messages down? The same pairs, for each rate in
    # WEBHOOK_RATES: first on a gateway without webhooks, then on one whose [webhook] sends
    # after_send and delivery_receipt events to `tern-load blackhole`, a local endpoint that
    # accepts connections and never answers (it stops when the gateway has stopped, or after
    # a time bound). Compare delivered_per_s and the SendAck latency (ack_p50_us, ack_p99_us);
    # the webhook counters read from /metrics after each dead run follow.
    secs=${DURATION%s}
    case $secs in '' | *[!0-9]*)
        echo "webhook: DURATION must be whole seconds (e.g. 10s), not $DURATION" >&2
        exit 1
        ;;
    esac
    mkdir -p "$WORK"
    : >"$WORK/webhook.txt"
    c=$WEBHOOK_CORES
    for r in $WEBHOOK_RATES; do
        start_gateway fsync "$c"
        run_pairs "$WORK/webhook.txt" "nohook-fsync-cores$c-rate$r" --rate "$r"
        gateway_alive "without webhooks"
        stop_gateway

        WEBHOOK_TOML=$(printf '[webhook]\nurl = "http://127.0.0.1:%s/hook"\nsecret = "bench"\nevents = ["after_send", "delivery_receipt"]' "$WEBHOOK_PORT")
        start_gateway fsync "$c"
        WEBHOOK_TOML=""
        # Emptied here, not only by the redirection below: that happens in the background
        # process, maybe after the first look for its "listening" line.
        : >"$WORK/blackhole.out"
        "$BIN"/tern-load blackhole --listen "127.0.0.1:$WEBHOOK_PORT" --watch-pid "$GW_PID" \
            --duration "$((secs + 60))s" >"$WORK/blackhole.out" 2>&1 &
        hole_pid=$!
        for _ in $(seq 100); do
            grep -qs "blackhole listening" "$WORK/blackhole.out" && break
            sleep 0.1
        done
        if ! grep -qs "blackhole listening" "$WORK/blackhole.out"; then
            echo "the dead endpoint did not start:" >&2
            cat "$WORK/blackhole.out" >&2
            exit 1
        fi
        run_pairs "$WORK/webhook.txt" "deadhook-fsync-cores$c-rate$r" --rate "$r"
        gateway_alive "with a dead webhook endpoint"
        api=$(sed -n 's/^tern-gateway API listening on //p' "$WORK/gateway.log" | head -n 1)
        if [ -n "$api" ] && [ -n "$GW_PID" ]; then
            curl -sf --max-time 5 -H "Authorization: Bearer $(cat "$WORK/data/api_secret")" \
                "$api/metrics" | grep '^tern_webhook_events_total' \
                | sed "s/^/METRIC label=deadhook-fsync-cores$c-rate$r /" \
                | tee -a "$WORK/webhook.txt" || true
        fi
        # The endpoint sees the gateway go and stops by itself; its RESULT line follows.
        stop_gateway
        wait "$hole_pid" || true
        cat "$WORK/blackhole.out"
        grep '^RESULT' "$WORK/blackhole.out" >>"$WORK/webhook.txt" || true
    done
    echo "== webhook summary (pairs without webhooks, then with a dead endpoint, per rate)"
    grep '^RESULT workload=pairs' "$WORK/webhook.txt" \
        | awk '{ l = ""; for (i = 2; i <= NF; i++) if ($i ~ /^(label|delivered_per_s|p50_us|p99_us|ack_p50_us|ack_p99_us|ack_max_us|lost|dup|errors|cpu_us_per_msg)=/) l = l " " $i; print "pairs" l }' || true
    grep '^METRIC' "$WORK/webhook.txt" || true
    grep '^RESULT workload=blackhole' "$WORK/webhook.txt" || true
fi
