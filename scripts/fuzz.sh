#!/usr/bin/env bash
# fuzz.sh [SECONDS_PER_TARGET] - run the cargo-fuzz targets of kiln's disk-
# image readers (fuzz/fuzz_targets: iso9660 chunks xva vhd qcow2 part ext),
# each for SECONDS_PER_TARGET seconds (default 20), seeded with small valid
# images made now by fuzz/make-seeds.sh.  Exits non-zero, naming the input
# that did it, when any target crashes (panic, ASan report), hangs (more than
# FUZZ_TIMEOUT seconds on one input) or runs out of memory (FUZZ_RSS_MB).
#
# Environment (all optional):
#   FUZZ_TARGETS     space-separated subset of the targets (default: all)
#   FUZZ_RSS_MB      libFuzzer -rss_limit_mb, also the malloc limit (2048)
#   FUZZ_TIMEOUT     libFuzzer -timeout, seconds per input (30)
#   CARGO_TARGET_DIR the fuzz build goes to $CARGO_TARGET_DIR/fuzz
#                    (default fuzz/target)
#
# Needs a nightly toolchain (checked, never installed: `rustup toolchain
# list`); installs cargo-fuzz from crates.io when it is missing.  Corpora
# grow in fuzz/corpus/TARGET and crash inputs land in fuzz/artifacts/TARGET
# (both git-ignored).  Reproduce a crash with
#   cargo +nightly fuzz run TARGET fuzz/artifacts/TARGET/crash-...
set -euo pipefail
cd "$(dirname "$0")/.."
die() { echo "fuzz: $*" >&2; exit 1; }
log() { echo "fuzz: $*" >&2; }

secs=${1:-20}
[[ "$secs" =~ ^[1-9][0-9]*$ ]] || die "usage: $0 [SECONDS_PER_TARGET]"
all_targets="iso9660 chunks xva vhd qcow2 part ext"
read -r -a targets <<<"${FUZZ_TARGETS:-$all_targets}"
rss_mb=${FUZZ_RSS_MB:-2048}
timeout=${FUZZ_TIMEOUT:-30}
export PATH="$HOME/.cargo/bin:$PATH"

# Largest input libFuzzer makes per target: a little above the biggest seed.
max_len() {
    case "$1" in
        iso9660) echo 131072 ;;   # seeds: 74 KiB (16 system-area sectors + tree)
        ext)     echo 262144 ;;   # seeds: 64-128 KiB file systems
        part)    echo 131072 ;;   # seeds: 64 KiB disks
        vhd)     echo 131072 ;;   # seeds: up to 64.5 KiB (fixed)
        qcow2)   echo 65536 ;;    # seeds: up to 28 KiB
        xva)     echo 65536 ;;    # seeds: 20 KiB tar
        chunks)  echo 65536 ;;    # seeds: ~6 KiB gzip/zlib
        *) die "unknown target $1 (known: $all_targets)" ;;
    esac
}
for t in "${targets[@]}"; do max_len "$t" >/dev/null; done

# Nightly gives ASan. Without one (these machines promise only the stable
# toolchain, and none can be fetched), the stable compiler builds the same
# libFuzzer targets with RUSTC_BOOTSTRAP=1 and no sanitizer: panics, hangs,
# out-of-memory and Rust's own checks are still caught. FUZZ_TOOLCHAIN=stable
# forces that path.
tc=(+nightly)
san=()
if [ "${FUZZ_TOOLCHAIN:-}" = stable ] || ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    log "no nightly toolchain: fuzzing with the stable compiler, without ASan"
    export RUSTC_BOOTSTRAP=1
    tc=()
    san=(--sanitizer none)
fi
if ! cargo "${tc[@]}" fuzz --version >/dev/null 2>&1; then
    log "installing cargo-fuzz (cargo install --locked cargo-fuzz)"
    cargo install --locked cargo-fuzz
fi

target_dir=${CARGO_TARGET_DIR:+$CARGO_TARGET_DIR/fuzz}
target_dir=${target_dir:-fuzz/target}
# ASan, release with debug assertions and overflow checks: cargo-fuzz's
# defaults.  `run` below uses the same flags, so it does not rebuild.
fuzz_flags=(--target-dir "$target_dir" "${san[@]}")

log "building ${#targets[@]} target(s) into $target_dir"
start=$(date +%s)
for t in "${targets[@]}"; do
    cargo "${tc[@]}" fuzz build "${fuzz_flags[@]}" "$t"
done
log "build took $(( $(date +%s) - start ))s"

work=$(mktemp -d "${TMPDIR:-/tmp}/kiln-fuzz.XXXXXX")
trap 'rm -rf "$work"' EXIT
bash fuzz/make-seeds.sh "$work/seeds"

failed=()
for t in "${targets[@]}"; do
    corpus=fuzz/corpus/$t
    artifacts=fuzz/artifacts/$t
    mkdir -p "$corpus" "$artifacts"
    touch "$work/stamp"
    len=$(max_len "$t")
    log "== $t: ${secs}s, -max_len=$len, -rss_limit_mb=$rss_mb, -timeout=$timeout"
    rc=0
    cargo "${tc[@]}" fuzz run "${fuzz_flags[@]}" "$t" "$corpus" "$work/seeds/$t" -- \
        -max_total_time="$secs" -max_len="$len" -rss_limit_mb="$rss_mb" \
        -timeout="$timeout" -print_final_stats=1 >"$work/$t.log" 2>&1 || rc=$?
    grep -E '^stat::number_of_executed_units|^stat::peak_rss_mb|^#[0-9]+ +DONE' "$work/$t.log" \
        | tr '\n' ' ' | sed "s/^/fuzz: $t: /; s/\$/\\n/" >&2 || true
    if [ "$rc" -ne 0 ]; then
        tail -n 60 "$work/$t.log" >&2
        mapfile -t found < <(find "$artifacts" -type f -newer "$work/stamp")
        if [ "${#found[@]}" -gt 0 ]; then
            for f in "${found[@]}"; do log "$t: CRASH INPUT: $f"; done
            failed+=("$t: ${found[*]}")
        else
            failed+=("$t: exit $rc (no artifact; see the log above)")
        fi
    fi
done

if [ "${#failed[@]}" -gt 0 ]; then
    log "FAILED:"
    for f in "${failed[@]}"; do echo "  $f" >&2; done
    exit 1
fi
log "all ${#targets[@]} target(s) ran ${secs}s each without a crash"
