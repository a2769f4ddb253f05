#!/usr/bin/env bash
# A SuperLink in simulation mode whose simulations run on an existing Ray cluster, foreground.
#   deploy/sim_superlink.sh --ray-address HEAD_IP:PORT [--certs DIR | --insecure] [--host 127.0.0.1]
#                           [--port 9093] [--state-dir DIR] [--pythonpath DIR] [-- FLAGS]
# Flower 1.42 has no run or federation option for a Ray address: its Ray backend calls ray.init()
# with only num_cpus/num_gpus/logging_level/log_to_driver, and ray.init() joins the cluster named by
# $RAY_ADDRESS. This script exports RAY_ADDRESS for the SuperLink, whose flwr-simulation processes
# inherit it. Do not set init-args-num-cpus/-gpus in the federation config then (Ray refuses them
# when joining a cluster). --pythonpath: a directory holding the app's top-level modules
# (client_app.py) at the same path on every Ray node (docs/DEPLOY.md).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage="usage: deploy/sim_superlink.sh --ray-address HEAD_IP:PORT [--certs DIR | --insecure] [--host H] [--port P] [--state-dir DIR] [--pythonpath DIR] [-- FLAGS]"
ray_address="" certs="" insecure=false host=127.0.0.1 port=9093 state="./superlink-state" pypath="" extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --ray-address) need_value "$1" "${2:-}"; ray_address="$2"; shift 2 ;;
    --certs) need_value "$1" "${2:-}"; certs="$2"; shift 2 ;;
    --insecure) insecure=true; shift ;;
    --host) need_value "$1" "${2:-}"; host="$2"; shift 2 ;;
    --port) need_value "$1" "${2:-}"; port="$2"; shift 2 ;;
    --state-dir) need_value "$1" "${2:-}"; state="$2"; shift 2 ;;
    --pythonpath) need_value "$1" "${2:-}"; pypath="$2"; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) echo "$usage"; exit 0 ;;
    *) die "sim_superlink.sh: unknown argument '$1' ($usage)" ;;
  esac
done
[[ -n "$ray_address" ]] || die "sim_superlink.sh: --ray-address HEAD_IP:PORT is required ($usage)"
tls=()
if [[ -n "$certs" ]]; then
  for f in ca.crt server.pem server.key; do need_file "$certs/$f" "--certs"; done
  certs="$(cd "$certs" && pwd)"
  tls=(--ssl-ca-certfile "$certs/ca.crt" --ssl-certfile "$certs/server.pem" --ssl-keyfile "$certs/server.key")
elif [[ "$insecure" == true ]]; then
  tls=(--insecure)
else
  die "sim_superlink.sh: give --certs DIR (TLS) or --insecure"
fi
mkdir -p "$state"
state="$(cd "$state" && pwd)"
export FLWR_HOME="${FLWR_HOME:-$state/flwr-home}"
export HFZ_OUTPUT_ROOT="${HFZ_OUTPUT_ROOT:-$PWD}"
export RAY_ADDRESS="$ray_address" RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0
if [[ -n "$pypath" ]]; then
  [[ -d "$pypath" ]] || die "sim_superlink.sh: --pythonpath: no directory at $pypath"
  export PYTHONPATH="$(cd "$pypath" && pwd)${PYTHONPATH:+:$PYTHONPATH}"
fi
exec flower-superlink --simulation "${tls[@]}" --disable-runtime-dependency-installation \
  --host "$host" --port "$port" --database "$state/state.db" "${extra[@]}"
