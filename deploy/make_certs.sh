#!/usr/bin/env bash
# A private CA and a SuperLink server certificate signed by it (RSA 2048, 365 days).
#   deploy/make_certs.sh OUT_DIR [HOST ...]
# The server certificate's subjectAltName always holds IP:127.0.0.1 and DNS:localhost, plus every
# HOST given (an IPv4/IPv6 address becomes IP:..., anything else DNS:...): give the name or address
# the SuperNodes and the `flwr` CLI will use to reach the SuperLink.
# Writes OUT_DIR/{ca.crt,ca.key,server.pem,server.key}. Keep ca.key and server.key private; copy
# only ca.crt to the SuperNodes and to the machine that runs `flwr`. An existing CA is reused.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage="usage: deploy/make_certs.sh OUT_DIR [HOST ...]"
[[ $# -ge 1 && "$1" != -h && "$1" != --help ]] || { echo "$usage" >&2; exit 2; }
command -v openssl >/dev/null || die "openssl not found (apt-get install openssl)"
out="$1"; shift
mkdir -p "$out"
chmod 700 "$out"

san="IP:127.0.0.1,DNS:localhost"
for host in "$@"; do
  if [[ "$host" =~ ^[0-9.]+$ || "$host" == *:* ]]; then san="$san,IP:$host"; else san="$san,DNS:$host"; fi
done
cn="${1:-127.0.0.1}"

if [[ ! -f "$out/ca.key" ]]; then
  openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 365 -subj "/CN=hfz-deploy-ca" \
    -keyout "$out/ca.key" -out "$out/ca.crt" 2>/dev/null
fi
openssl req -newkey rsa:2048 -nodes -sha256 -subj "/CN=$cn" \
  -keyout "$out/server.key" -out "$out/server.csr" 2>/dev/null
printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
  "$san" > "$out/server.ext"
openssl x509 -req -sha256 -days 365 -in "$out/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" \
  -CAcreateserial -extfile "$out/server.ext" -out "$out/server.pem" 2>/dev/null
rm -f "$out/server.csr" "$out/server.ext"
chmod 600 "$out/ca.key" "$out/server.key"
openssl verify -CAfile "$out/ca.crt" "$out/server.pem" >/dev/null || die "server.pem does not verify against ca.crt"
echo "certificates in $out: ca.crt (give to SuperNodes and flwr), server.pem + server.key (SuperLink only); SAN $san"
