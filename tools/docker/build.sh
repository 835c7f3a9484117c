#!/usr/bin/env bash
# Prepares everything the raftkv container image and the compose cluster need, without pulling
# an image: the image is FROM scratch, so the binary must be static. This script
#   1. installs the musl target (rustup) and musl-gcc (apt: musl-tools) if they are missing
#      (the C parts, ring and mimalloc, are compiled with musl-gcc);
#   2. builds a statically linked `raftkv` with cargo on this host, in its own target dir
#      (target/docker) so it does not disturb the normal build, and checks it is static;
#   3. stages it in tools/docker/stage/ (with an empty, later user-owned /data), which is all
#      the Dockerfile copies besides tools/docker/rootfs/ (a minimal /etc/passwd and /etc/group);
#   4. generates the cluster's peer secret in tools/docker/secrets/peer-secret once (never
#      checked in), readable by the image's user (uid 10001) and nobody else it can help;
#   5. prints the command that builds the image and starts the cluster.
# Safe to run again: a warm run takes seconds and keeps the secret.
set -euo pipefail
cd "$(dirname "$0")/../.."

case "$(uname -m)" in
  x86_64) target=x86_64-unknown-linux-musl ;;
  aarch64 | arm64) target=aarch64-unknown-linux-musl ;;
  *) echo "build.sh: no musl target known for $(uname -m)" >&2; exit 2 ;;
esac
stage=tools/docker/stage
secrets=tools/docker/secrets
image_uid=10001

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null; then sudo "$@"
  else echo "build.sh: need root (or sudo) to run: $*" >&2; exit 1
  fi
}

if ! rustup target list --installed | grep -qx "$target"; then
  echo "==> rustup target add $target"
  rustup target add "$target"
fi
if ! command -v musl-gcc >/dev/null; then
  echo "==> apt-get install musl-tools (musl-gcc, for the C parts of ring and mimalloc)"
  as_root apt-get install -y musl-tools || { as_root apt-get update && as_root apt-get install -y musl-tools; }
fi

# Run from `cargo test` (tests/containers.rs), this script inherits the variables cargo sets
# for the calling package; ring's build script watches some of them (CARGO_PKG_NAME, ...), so
# they would rebuild it and everything above it on every switch between a shell and a test.
for var in $(compgen -e | grep -E '^(CARGO_PKG_|CARGO_MANIFEST_|CARGO_CRATE_|CARGO_BIN_|CARGO_PRIMARY_PACKAGE$|CARGO_TARGET_TMPDIR$|OUT_DIR$)'); do
  unset "$var"
done

echo "==> cargo build --release --target $target (static; target dir target/docker)"
started=$(date +%s)
# No debug info in the image's binary (the host's release profile keeps some for profiling).
CARGO_TARGET_DIR=target/docker CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=debuginfo \
  cargo build --release --locked --target "$target" --bin raftkv
bin=target/docker/$target/release/raftkv
echo "    built in $(( $(date +%s) - started )) s"

kind=$(file -b "$bin")
case "$kind" in
  *"statically linked"* | *"static-pie linked"*) ;;
  *) echo "build.sh: $bin is not static: $kind" >&2; exit 1 ;;
esac
if ldd "$bin" >/dev/null 2>&1 && ! ldd "$bin" 2>&1 | grep -q "statically linked"; then
  echo "build.sh: ldd finds shared libraries in $bin:" >&2; ldd "$bin" >&2; exit 1
fi

mkdir -p "$stage/data"
cp "$bin" "$stage/raftkv.tmp" && mv -f "$stage/raftkv.tmp" "$stage/raftkv"
echo "==> staged $stage/raftkv ($(du -h "$stage/raftkv" | cut -f1), $(file -b "$stage/raftkv" | cut -d, -f1-2))"

# The secret is bind-mounted into every node (compose `secrets:`) and must be readable by the
# image's user. The directory is private to whoever runs this; as root the file goes to the
# image's uid with mode 600, otherwise it must be world-readable inside that private directory
# (the nodes then log that it is readable by others).
mkdir -p "$secrets"
chmod 700 "$secrets"
if [ ! -s "$secrets/peer-secret" ]; then
  (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$secrets/peer-secret.tmp")
  mv "$secrets/peer-secret.tmp" "$secrets/peer-secret"
  echo "==> generated the cluster's peer secret in $secrets/peer-secret"
fi
if [ "$(id -u)" = 0 ]; then
  chown "$image_uid:$image_uid" "$secrets/peer-secret"
  chmod 600 "$secrets/peer-secret"
else
  chmod 644 "$secrets/peer-secret"
fi

if docker compose version >/dev/null 2>&1; then compose="docker compose"; else compose="docker-compose"; fi
echo "==> next: $compose up --build     (client ports 8001-8003 on 127.0.0.1; Ctrl-C stops)"
