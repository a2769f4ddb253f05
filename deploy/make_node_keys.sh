#!/usr/bin/env bash
# One ECDSA (NIST P-384) key pair per SuperNode, in OpenSSH format as Flower expects.
#   deploy/make_node_keys.sh OUT_DIR NAME [NAME ...]
# Writes OUT_DIR/NAME (private key: stays on that SuperNode's host) and OUT_DIR/NAME.pub (public
# key: register it with deploy/register_nodes.sh). An existing key is kept.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage="usage: deploy/make_node_keys.sh OUT_DIR NAME [NAME ...]"
[[ $# -ge 2 && "$1" != -h && "$1" != --help ]] || { echo "$usage" >&2; exit 2; }
command -v ssh-keygen >/dev/null || die "ssh-keygen not found (apt-get install openssh-client)"
out="$1"; shift
mkdir -p "$out"
chmod 700 "$out"
for name in "$@"; do
  [[ "$name" =~ ^[A-Za-z0-9_.-]+$ ]] || die "key name '$name': use letters, digits, '_', '-', '.'"
  if [[ ! -f "$out/$name" ]]; then
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "$name" -f "$out/$name"
  fi
  echo "$out/$name (private), $out/$name.pub (public)"
done
