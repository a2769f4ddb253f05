#!/usr/bin/env bash
# Register SuperNode public keys with a SuperLink started with --enable-supernode-auth.
#   deploy/register_nodes.sh CONNECTION KEY.pub [KEY.pub ...]
# CONNECTION is a name in $FLWR_HOME/config.toml (deploy/connect.sh). Each node is registered
# under its key file's name (node-0.pub -> node-0). A SuperNode whose key is not registered is
# refused by the SuperLink ("Failed to activate SuperNode").
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage="usage: deploy/register_nodes.sh CONNECTION KEY.pub [KEY.pub ...]"
[[ $# -ge 2 && "$1" != -h && "$1" != --help ]] || { echo "$usage" >&2; exit 2; }
connection="$1"; shift
for pub in "$@"; do
  need_file "$pub" "public key"
  name="$(basename "$pub" .pub)"
  out="$(flwr supernode register "$pub" "$connection" --name "$name" 2>&1)" \
    || die "register_nodes.sh: registering $pub failed: $(echo "$out" | tail -n 1)"
  grep -qi "registered" <<<"$out" || die "register_nodes.sh: registering $pub: $(echo "$out" | tail -n 1)"
  echo "$name: $(grep -i registered <<<"$out" | tail -n 1)"
done
