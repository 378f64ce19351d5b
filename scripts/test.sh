#!/usr/bin/env bash
# kiln's test suite, as CI runs it:
#   1. cargo fmt --check and clippy -D warnings;
#   2. the library built without the default `cli` feature; the unit and CLI tests in the debug profile (clap's and std's debug
#      assertions run only there), then unit, integration and doc tests in
#      release as the calling user;
#   3. when run as root: the integration tests again as two unprivileged users,
#      one with /etc/subuid ranges and one without (scripts/test-unprivileged.sh).
# The real-toolchain input (a Debian buildd rootfs tarball) is built once and
# cached in /var/cache/kiln-ci (override with KILN_BUILDD_TAR).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export KILN_BUILDD_TAR=${KILN_BUILDD_TAR:-/var/cache/kiln-ci/buildd.tar}
scripts/make-buildd-tar.sh "$KILN_BUILDD_TAR"
export KILN_BUILDD_ISO=${KILN_BUILDD_ISO:-/var/cache/kiln-ci/buildd-ddk.iso}
scripts/make-buildd-iso.sh "$KILN_BUILDD_ISO"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy -D warnings"
cargo clippy --release --all-targets --quiet -- -D warnings
echo "== the library alone (no cli feature: no clap, anyhow, indicatif, tracing-subscriber)"
cargo build --no-default-features --lib --quiet
if cargo tree --no-default-features -e normal --prefix none | grep -E '^(clap|anyhow|indicatif|tracing-subscriber) '; then
  echo "the library without the cli feature still pulls the crates above" >&2
  exit 1
fi
echo "== cargo doc (broken links are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --lib --quiet
echo "== debug profile: unit tests and the CLI tests"
cargo test --lib --bins --test cli
echo "== build"
cargo build --release --quiet
echo "== tests as $(id -un)"
cargo test --release
if [ "$(id -u)" = 0 ] && [ "${KILN_SKIP_UNPRIVILEGED:-0}" != 1 ]; then
  scripts/test-unprivileged.sh
fi
echo "== fuzz: every disk-image parser, ${KILN_FUZZ_SECONDS:-10}s each"
scripts/fuzz.sh "${KILN_FUZZ_SECONDS:-10}"
echo "== all tests passed"
