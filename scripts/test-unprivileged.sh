#!/usr/bin/env bash
# Runs kiln's integration tests as unprivileged users (kiln is rootless first):
#   kiln-sub    has /etc/subuid and /etc/subgid ranges
#   kiln-nosub  has none
# Optional arguments name test binaries to build and run (e.g. `run unpack`);
# default all. Honours CARGO_TARGET_DIR.
# The toolchain lives under /root (mode 0700), so the test binaries and kiln
# are built here as root and copied to a world-readable temp dir first.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "test-unprivileged: run as root (it creates users)" >&2; exit 1; }
export PATH="$HOME/.cargo/bin:$PATH"

for u in kiln-sub kiln-nosub; do
  id -u "$u" >/dev/null 2>&1 || useradd --create-home --shell /bin/bash "$u"
done
for f in /etc/subuid /etc/subgid; do
  touch "$f"
  grep -q '^kiln-sub:' "$f" || echo 'kiln-sub:300000:65536' >>"$f"
  sed -i '/^kiln-nosub:/d' "$f"
done

dest=$(mktemp -d /tmp/kiln-unpriv.XXXXXX)
trap 'rm -rf "$dest"' EXIT
mkdir -p "$dest/bin" "$dest/repo"
cargo build --release --quiet
cp "${CARGO_TARGET_DIR:-target}/x86_64-unknown-linux-gnu/release/kiln" "$dest/bin/kiln"
# The example embedder (a program not named kiln) for tests/library.rs.
cargo build --release --quiet --example embedder
cp "${CARGO_TARGET_DIR:-target}/x86_64-unknown-linux-gnu/release/examples/embedder" "$dest/bin/embedder"
# Build only the named test binaries when some are named.
only=()
for want in "$@"; do only+=(--test "$want"); done
mapfile -t exes < <(cargo test --release --no-run --message-format=json ${only[@]+"${only[@]}"} 2>/dev/null \
  | jq -r 'select(.reason == "compiler-artifact" and .profile.test == true
                  and (.target.kind | index("test"))) | .executable')
[ "${#exes[@]}" -gt 0 ] || { echo "test-unprivileged: no integration test binaries found" >&2; exit 1; }
if [ $# -gt 0 ]; then
  keep=()
  for e in "${exes[@]}"; do
    for want in "$@"; do
      case "$(basename "$e")" in "$want"-*) keep+=("$e") ;; esac
    done
  done
  exes=("${keep[@]}")
fi
for e in "${exes[@]}"; do cp "$e" "$dest/bin/"; done
cp -r images scripts src ARCHITECTURE.md README.md "$dest/repo/"
mkdir -p "$dest/repo/tests"
cp -r tests/bad-images "$dest/repo/tests/"
chmod -R a+rX "$dest"

failed=()
for u in kiln-sub kiln-nosub; do
  home=$(getent passwd "$u" | cut -d: -f6)
  for e in "${exes[@]}"; do
    exe="$dest/bin/$(basename "$e")"
    echo "== $(basename "$e") as $u ($(grep -c "^$u:" /etc/subuid || true) subuid range(s))"
    if ! (cd "$dest" && runuser -u "$u" -- env -i \
        HOME="$home" USER="$u" LOGNAME="$u" PATH=/usr/local/bin:/usr/bin:/bin TMPDIR=/tmp \
        CI="${CI:-}" KILN_BIN="$dest/bin/kiln" KILN_EMBEDDER="$dest/bin/embedder" KILN_TEST_DATA="$dest/repo" \
        KILN_BUILDD_TAR="${KILN_BUILDD_TAR:-}" KILN_BUILDD_ISO="${KILN_BUILDD_ISO:-}" RUST_BACKTRACE=1 \
        "$exe" --test-threads=2); then
      failed+=("$(basename "$e") as $u")
    fi
  done
done
if [ "${#failed[@]}" -gt 0 ]; then
  echo "test-unprivileged: FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "test-unprivileged: all integration tests passed as kiln-sub and kiln-nosub"
