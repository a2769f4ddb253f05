#!/usr/bin/env bash
# Start a SuperLink with TLS and SuperNode authentication, in the foreground (run it under
# systemd, tmux or `&`; stop it with SIGTERM).
#   deploy/superlink.sh --certs DIR [--host 0.0.0.0] [--port 9093] [--state-dir DIR] [-- FLAGS]
# --certs DIR holds ca.crt, server.pem, server.key (deploy/make_certs.sh). --state-dir keeps the
# SuperLink's database (registered SuperNodes, runs) and log: a restarted SuperLink still knows
# its nodes. Flags after `--` go to flower-superlink unchanged.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage="usage: deploy/superlink.sh --certs DIR [--host HOST] [--port PORT] [--state-dir DIR] [-- FLAGS]"
certs="" host="127.0.0.1" port=9093 state="./superlink-state" extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --certs) need_value "$1" "${2:-}"; certs="$2"; shift 2 ;;
    --host) need_value "$1" "${2:-}"; host="$2"; shift 2 ;;
    --port) need_value "$1" "${2:-}"; port="$2"; shift 2 ;;
    --state-dir) need_value "$1" "${2:-}"; state="$2"; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) echo "$usage"; exit 0 ;;
    *) die "superlink.sh: unknown argument '$1' ($usage)" ;;
  esac
done
[[ -n "$certs" ]] || die "superlink.sh: --certs DIR is required ($usage)"
for f in ca.crt server.pem server.key; do need_file "$certs/$f" "--certs"; done
mkdir -p "$state"
state="$(cd "$state" && pwd)"
certs="$(cd "$certs" && pwd)"
# The SuperLink runs the ServerApp: relative paths in the app resolve against this directory.
export FLWR_HOME="${FLWR_HOME:-$state/flwr-home}"
export HFZ_OUTPUT_ROOT="${HFZ_OUTPUT_ROOT:-$PWD}"
exec flower-superlink \
  --ssl-ca-certfile "$certs/ca.crt" --ssl-certfile "$certs/server.pem" --ssl-keyfile "$certs/server.key" \
  --enable-supernode-auth --disable-runtime-dependency-installation \
  --host "$host" --port "$port" --database "$state/state.db" "${extra[@]}"
