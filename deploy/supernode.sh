#!/usr/bin/env bash
# Start one SuperNode (TLS, authenticated by its private key) in the foreground.
#   deploy/supernode.sh --superlink HOST:PORT --ca ca.crt --key NODE_KEY \
#       --partition-id I --num-partitions N [--held-out] [--data-dir DIR] [--name NAME] \
#       [--port 9094] [--home DIR] [-- FLAGS]
# Node config sent to the apps: partition-id, num-partitions, held-out (true/false), and with
# --data-dir, data-dir="<absolute path>" (this client's own files; see docs/DEPLOY.md for what the
# apps read today). --port is this node's local Runtime API port (127.0.0.1): distinct per node on
# one host. --home is the node's FLWR_HOME (installed app bundles). Flags after `--` go to
# flower-supernode unchanged (e.g. --max-retries 3).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage="usage: deploy/supernode.sh --superlink HOST:PORT --ca FILE --key FILE --partition-id I --num-partitions N [--held-out] [--data-dir DIR] [--name NAME] [--port PORT] [--home DIR] [-- FLAGS]"
superlink="" ca="" key="" pid="" nparts="" heldout=false data_dir="" name="" port=9094 home="" extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --superlink) need_value "$1" "${2:-}"; superlink="$2"; shift 2 ;;
    --ca) need_value "$1" "${2:-}"; ca="$2"; shift 2 ;;
    --key) need_value "$1" "${2:-}"; key="$2"; shift 2 ;;
    --partition-id) need_value "$1" "${2:-}"; pid="$2"; shift 2 ;;
    --num-partitions) need_value "$1" "${2:-}"; nparts="$2"; shift 2 ;;
    --held-out) heldout=true; shift ;;
    --data-dir) need_value "$1" "${2:-}"; data_dir="$2"; shift 2 ;;
    --name) need_value "$1" "${2:-}"; name="$2"; shift 2 ;;
    --port) need_value "$1" "${2:-}"; port="$2"; shift 2 ;;
    --home) need_value "$1" "${2:-}"; home="$2"; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) echo "$usage"; exit 0 ;;
    *) die "supernode.sh: unknown argument '$1' ($usage)" ;;
  esac
done
[[ -n "$superlink" ]] || die "supernode.sh: --superlink HOST:PORT is required"
[[ -n "$ca" ]] || die "supernode.sh: --ca FILE (the CA certificate, ca.crt) is required"
[[ -n "$key" ]] || die "supernode.sh: --key FILE (this node's private key) is required"
need_file "$ca" "--ca"
need_file "$key" "--key"
[[ "$pid" =~ ^[0-9]+$ ]] || die "supernode.sh: --partition-id needs a non-negative integer, got '$pid'"
[[ "$nparts" =~ ^[0-9]+$ ]] || die "supernode.sh: --num-partitions needs a positive integer, got '$nparts'"
(( pid < nparts )) || die "supernode.sh: --partition-id $pid must be < --num-partitions $nparts"

node_config="partition-id=$pid num-partitions=$nparts held-out=$heldout"
if [[ -n "$data_dir" ]]; then
  [[ -e "$data_dir" ]] || die "supernode.sh: --data-dir: nothing at $data_dir"
  data_dir="$(cd "$(dirname "$data_dir")" && pwd)/$(basename "$data_dir")"
  [[ "$data_dir" != *[\"\ ]* ]] || die "supernode.sh: --data-dir: no spaces or quotes in the path, please"
  node_config="$node_config data-dir=\"$data_dir\""
fi
if [[ -n "$name" ]]; then
  [[ "$name" =~ ^[A-Za-z0-9_.-]+$ ]] || die "supernode.sh: --name: letters, digits, '_', '-', '.'"
  node_config="$node_config name=\"$name\""
fi
if [[ -n "$home" ]]; then mkdir -p "$home"; export FLWR_HOME="$(cd "$home" && pwd)"; fi
echo "supernode: $superlink, node config: $node_config" >&2
exec flower-supernode --superlink "$superlink" --root-certificates "$ca" \
  --auth-supernode-private-key "$key" --port "$port" --node-config "$node_config" "${extra[@]}"
