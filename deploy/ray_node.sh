#!/usr/bin/env bash
# One node of a Ray cluster for large `flwr run` simulations, in the foreground (`ray start --block`).
#   deploy/ray_node.sh head   [--port 6379] [--num-cpus N] [--client-port 10001] [--temp-dir DIR] [-- FLAGS]
#   deploy/ray_node.sh worker --address HEAD_IP:PORT [--num-cpus N] [--temp-dir DIR] [-- FLAGS]
# Run `head` on the machine that will run the simulation SuperLink (deploy/sim_superlink.sh),
# `worker` on every other machine. Each machine needs the same virtualenv (path and packages, this
# project installed with `pip install -e .`). Stop a node with SIGTERM/Ctrl-C on this process:
# `ray stop` would kill every Ray process on the host, other users' included. Flags after `--` go
# to `ray start` (e.g. --object-store-memory, --node-ip-address, --resources).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage="usage: deploy/ray_node.sh head [--port P] [--num-cpus N] [--client-port P] [--temp-dir DIR] [-- FLAGS] | deploy/ray_node.sh worker --address HEAD_IP:PORT [--num-cpus N] [--temp-dir DIR] [-- FLAGS]"
[[ $# -ge 1 && ( "$1" == head || "$1" == worker ) ]] || { echo "$usage" >&2; exit 2; }
role="$1"; shift
port=6379 client_port=10001 cpus="" address="" temp="" extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --port) need_value "$1" "${2:-}"; port="$2"; shift 2 ;;
    --client-port) need_value "$1" "${2:-}"; client_port="$2"; shift 2 ;;
    --num-cpus) need_value "$1" "${2:-}"; cpus="$2"; shift 2 ;;
    --address) need_value "$1" "${2:-}"; address="$2"; shift 2 ;;
    --temp-dir) need_value "$1" "${2:-}"; temp="$2"; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) echo "$usage"; exit 0 ;;
    *) die "ray_node.sh: unknown argument '$1' ($usage)" ;;
  esac
done
command -v ray >/dev/null || die "ray not found (pip install 'flwr[simulation]==1.42.0' in $HFZ_VENV)"
args=(--block --disable-usage-stats --num-gpus 0)
[[ -n "$cpus" ]] && args+=(--num-cpus "$cpus")
# A private --temp-dir keeps this cluster's address out of /tmp/ray/ray_current_cluster, which a
# plain ray.init() on this host (anyone's local simulation) would otherwise join.
if [[ -n "$temp" ]]; then mkdir -p "$temp"; args+=(--temp-dir "$(cd "$temp" && pwd)"); fi
export RAY_USAGE_STATS_ENABLED=0
if [[ "$role" == head ]]; then
  exec ray start --head --port "$port" --ray-client-server-port "$client_port" \
    --include-dashboard=false "${args[@]}" "${extra[@]}"
fi
[[ -n "$address" ]] || die "ray_node.sh worker: --address HEAD_IP:PORT is required"
exec ray start --address "$address" "${args[@]}" "${extra[@]}"
