#!/bin/sh
# core_netns.sh - the multi-host test on one machine: each pipeline stage runs in its own
# network namespace with its own address (veth pairs on a bridge), the router side in
# the root namespace; greedy tokens must equal the single-process reference.
# Needs root (ip netns); skips (exit 77) without it.
# usage: core_netns.sh BUILD_DIR MODEL_DIR N_STAGES
set -eu
build=$1 model=$2 n=${3:-2}
here=$(cd "$(dirname "$0")" && pwd)
tag=cpm$$
if [ "$(id -u)" != 0 ] || ! command -v ip >/dev/null || ! ip netns list >/dev/null 2>&1; then
    echo "SKIP: needs root and ip netns"; exit 77
fi
cleanup() {
    i=0
    while [ $i -lt "$n" ]; do
        ip netns pids ${tag}n$i 2>/dev/null | xargs -r kill 2>/dev/null || true
        ip netns del ${tag}n$i 2>/dev/null || true
        ip link del ${tag}h$i 2>/dev/null || true
        i=$((i + 1))
    done
    ip link del ${tag}br 2>/dev/null || true
}
trap cleanup EXIT INT TERM
# A private subnet per run: 10.<pid-derived>.x.0/24.
net=10.$(( ($$ % 200) + 20 )).$(( ($$ / 200) % 250 ))
ip link add ${tag}br type bridge
ip addr add $net.1/24 dev ${tag}br
ip link set ${tag}br up
namespaces="" addrs=""
i=0
while [ $i -lt "$n" ]; do
    ns=${tag}n$i
    ip netns add $ns
    ip link add ${tag}h$i type veth peer name ${tag}c$i
    ip link set ${tag}c$i netns $ns
    ip link set ${tag}h$i master ${tag}br up
    ip -n $ns addr add $net.$((i + 10))/24 dev ${tag}c$i
    ip -n $ns link set ${tag}c$i up
    ip -n $ns link set lo up
    namespaces="$namespaces $ns" addrs="$addrs $net.$((i + 10))"
    i=$((i + 1))
done
CPM_E2E_NETNS="$namespaces" CPM_E2E_ADDRS="$addrs" CPM_E2E_ROUTER_ADDR=$net.1 \
    /usr/bin/python3 "$here/core_pipeline.py" "$build" "$model" "$n"
