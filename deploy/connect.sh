#!/usr/bin/env bash
# Add a TLS connection to the `flwr` CLI's config ($FLWR_HOME/config.toml, default ~/.flwr).
#   deploy/connect.sh NAME HOST:PORT CA_CERT|--insecure [--default]
# `flwr run . NAME`, `flwr supernode register KEY.pub NAME`, `flwr ls NAME` then use it.
# An existing [superlink.NAME] section is left as it is (edit the file to change it).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage="usage: deploy/connect.sh NAME HOST:PORT CA_CERT|--insecure [--default]"
[[ $# -ge 3 && "$1" != -h && "$1" != --help ]] || { echo "$usage" >&2; exit 2; }
name="$1" address="$2" ca="$3" default="${4:-}"
[[ "$name" =~ ^[A-Za-z0-9_-]+$ ]] || die "connect.sh: connection name '$name': letters, digits, '_', '-'"
if [[ "$ca" == --insecure ]]; then
  entry='insecure = true'
else
  need_file "$ca" "CA_CERT"
  ca="$(cd "$(dirname "$ca")" && pwd)/$(basename "$ca")"
  entry="root-certificates = \"$ca\""
fi
home="${FLWR_HOME:-$HOME/.flwr}"
mkdir -p "$home"
config="$home/config.toml"
if [[ ! -f "$config" ]]; then
  printf '[superlink]\ndefault = "%s"\n' "$name" > "$config"
elif [[ "$default" == --default ]]; then
  die "connect.sh: --default with an existing $config: set default = \"$name\" under [superlink] by hand"
fi
if grep -q "^\[superlink\.$name\]" "$config"; then
  echo "connection '$name' already in $config (left unchanged)"
else
  printf '\n[superlink.%s]\naddress = "%s"\n%s\n' "$name" "$address" "$entry" >> "$config"
  echo "connection '$name' -> $address ($entry) added to $config"
fi
