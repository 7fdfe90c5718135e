#!/usr/bin/env bash
# netmesh demo: a control plane and three hosts, each in its own network
# namespace on a private LAN (192.0.2.0/24, TEST-NET-1), with real WireGuard
# (wireguard-go). Creates a network, joins the hosts with one enrollment key,
# pings across the mesh, shows `netmesh status`, then removes everything it made.
# Needs root (namespaces). Run through `make demo`.
set -euo pipefail

cd "$(dirname "$0")/.."
NETMESH="$PWD/.venv/bin/netmesh"
P="nmdemo$$"
WORK="$(mktemp -d /tmp/netmesh-demo.XXXXXX)"
# Listening beyond loopback, the broker speaks only TLS (its own CA, in the data dir).
SERVER="tls://127.0.0.1:4222"
HOSTS=(alpha bravo charlie)
PIDS=()
NAMESPACES=()

if [ "$(id -u)" -ne 0 ]; then
    echo "the demo builds network namespaces: run it as root" >&2
    exit 1
fi

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

cleanup() {
    local status=$?
    say "cleaning up"
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    # wireguard-go runs in a session of its own (so interfaces outlive agents):
    # find what is left by namespace, not by name.
    for ns in "${NAMESPACES[@]}"; do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
    done
    for ns in "${NAMESPACES[@]}"; do
        for _ in $(seq 50); do [ -z "$(ip netns pids "$ns" 2>/dev/null)" ] && break; sleep 0.1; done
        ip netns del "$ns" 2>/dev/null || true
    done
    if [ $status -ne 0 ]; then
        echo "demo failed; logs in $WORK" >&2
    else
        rm -rf "$WORK"
    fi
    exit $status
}
trap cleanup EXIT INT TERM

add_ns() { ip netns add "$1"; NAMESPACES+=("$1"); ip -n "$1" link set lo up; }

# in_host NS CMD...: run CMD in the namespace with a private /var/run/wireguard
# (wireguard-go's socket directory is not per network namespace) and a
# resolv.conf of its own bound over /etc/resolv.conf (the agent points the
# host's resolver at its DNS server: the demo's hosts must not share the
# machine's file).
in_host() {
    local ns=$1; shift
    [ -e "$WORK/$ns.resolv.conf" ] || cp /etc/resolv.conf "$WORK/$ns.resolv.conf"
    ip netns exec "$ns" unshare -m --propagation private sh -c \
        'mkdir -p /var/run/wireguard && mount -t tmpfs tmpfs /var/run/wireguard &&
         mount --bind "$0" /etc/resolv.conf && exec "$@"' "$WORK/$ns.resolv.conf" "$@"
}

# Admin commands are signed with the key the server made on its first start.
nm() {
    ip netns exec "$P-cp" "$NETMESH" --server "$SERVER" --admin-key "$WORK/cp/admin.key" \
        --ca "$WORK/cp/tls/ca.pem" "$@"
}

wait_for() {  # wait_for SECONDS DESCRIPTION CMD...
    local seconds=$1 what=$2; shift 2
    for _ in $(seq $((seconds * 5))); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.2
    done
    echo "timed out waiting for: $what" >&2
    return 1
}

say "building a LAN and four hosts in network namespaces ($P-*)"
add_ns "$P-lan"
ip -n "$P-lan" link add br0 type bridge
ip -n "$P-lan" link set br0 up
i=10
for h in cp "${HOSTS[@]}"; do
    i=$((i + 1))
    add_ns "$P-$h"
    ip -n "$P-lan" link add "p$i" type veth peer name eth0 netns "$P-$h"
    ip -n "$P-lan" link set "p$i" master br0 up
    ip -n "$P-$h" addr add "192.0.2.$i/24" dev eth0
    ip -n "$P-$h" link set eth0 up
    echo "  $h: 192.0.2.$i"
done
CP_ADDR=192.0.2.11

say "starting the control plane: netmesh server (embedded nats-server)"
in_host "$P-cp" "$NETMESH" server --data-dir "$WORK/cp" --listen 0.0.0.0:4222 \
    --advertise "tls://$CP_ADDR:4222" >"$WORK/server.log" 2>&1 &
PIDS+=($!)
wait_for 60 "the control plane" nm network list

say "netmesh network create demo --cidr 10.99.0.0/24"
nm network create demo --cidr 10.99.0.0/24
say "netmesh key create --network demo --uses 3"
TOKEN=$(nm key create --network demo --uses 3 --expires 1h)
echo "$TOKEN"

n=11
for h in "${HOSTS[@]}"; do
    n=$((n + 1))
    say "$h: netmesh agent up --token ... --name $h"
    in_host "$P-$h" "$NETMESH" agent up --token "$TOKEN" --name "$h" \
        --state-dir "$WORK/$h" --endpoint "192.0.2.$n" --interface netmesh0 \
        --backend userspace >"$WORK/agent-$h.log" 2>&1 &
    PIDS+=($!)
done

all_in_sync() {
    local out
    out=$(nm status --json) || return 1
    python3 - "$out" <<'PY'
import json, sys
rows = json.loads(sys.argv[1])
sys.exit(0 if len(rows) == 3 and all(r["state"] == "in sync" for r in rows) else 1)
PY
}
wait_for 60 "three agents in sync" all_in_sync

say "netmesh node list"
nm node list
mapfile -t ADDRS < <(nm node list --json | python3 -c \
    'import json,sys; [print(n["name"], n["address"]) for n in json.load(sys.stdin)]')

say "ping across the mesh (over WireGuard)"
for src in "${HOSTS[@]}"; do
    for entry in "${ADDRS[@]}"; do
        dst=${entry% *}; addr=${entry#* }
        [ "$src" = "$dst" ] && continue
        if wait_for 15 "ping $src -> $dst" ip netns exec "$P-$src" ping -c 1 -W 1 "$addr"; then
            echo "  $src -> $dst ($addr): ok"
        else
            exit 1
        fi
    done
done

say "names: every node is NODE.demo.internal, answered by each host's agent"
for h in "${HOSTS[@]}"; do
    if wait_for 10 "$h.demo.internal from ${HOSTS[0]}" \
        in_host "$P-${HOSTS[0]}" getent hosts "$h.demo.internal"; then
        echo "  $(in_host "$P-${HOSTS[0]}" getent hosts "$h.demo.internal")"
    else
        exit 1
    fi
done

peers_up() {
    local out
    out=$(nm status --json) || return 1
    python3 - "$out" <<'PY'
import json, sys
rows = json.loads(sys.argv[1])
sys.exit(0 if rows and all(p["connected"] for r in rows for p in r["peers"]) else 1)
PY
}
wait_for 30 "agents to report their handshakes" peers_up

say "netmesh status"
nm status
say "netmesh events log"
nm events log
say "netmesh events verify: every admin change carries its signature"
nm events verify
say "the demo worked"
