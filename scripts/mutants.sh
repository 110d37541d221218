#!/usr/bin/env bash
# Mutation testing of the Rust core with cargo-mutants: each mutant is a small change to
# the code (a function returning a constant, an operator swapped, a `!` deleted), and the
# crate's tests must fail for it. A mutant they let through ("missed") is either a gap in
# the tests or a change that cannot be observed; docs/testing.md lists each one with its
# reason, and the figures of the last full run.
#
#   bash scripts/mutants.sh          every plain-Rust module: route.rs, handoff.rs,
#                                    history.rs (and history/), registry/, fanout.rs,
#                                    skip.rs;
#                                    about 25 min on 2 cores; reports, never fails on a miss
#   bash scripts/mutants.sh --quick  route.rs and handoff.rs against their own unit tests
#                                    (CI, about 2 min); fails on any missed mutant that
#                                    scripts/mutants-accepted.txt does not list
#   bash scripts/mutants.sh --with-stress ...   also runs src/stress_tests.rs for each
#                                    mutant (about 7 s more each)
#
# Further arguments go to cargo mutants (for example `--re give_back` to run only the
# mutants of functions whose name matches). Plain `cargo test`, never loom (scripts/loom.sh model-checks the lane state
# machines). The mutants are built in a copy of the tree (the work tree is never touched),
# with a target directory of their own (target/mutants/build, reused between runs), and
# the results go to target/mutants/full/mutants.out (target/mutants/quick/... for
# --quick): caught.txt, missed.txt, timeout.txt, unviable.txt.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck source=scripts/env.sh
. scripts/env.sh

# Pinned: a fresh machine installs this one (about 4 min on 2 cores), and the mutants it
# generates, which the accepted list names, do not change under us.
version=27.1.0
if [ "$(cargo mutants --version 2>/dev/null || true)" != "cargo-mutants $version" ]; then
  echo "mutants: installing cargo-mutants $version"
  cargo install cargo-mutants --locked --version "$version"
fi

src=native/ex_atlas_dispatcher/src
accepted="$root/scripts/mutants-accepted.txt"
quick=false
stress=false
args=()
for arg in "$@"; do
  case "$arg" in
    --quick) quick=true ;;
    --with-stress) stress=true ;;
    *) args+=("$arg") ;;
  esac
done

mode=full
$quick && mode=quick
out="$root/target/mutants/$mode"
mkdir -p "$out"
# Builds without debug info link faster; a target directory of their own leaves the
# usual one's builds alone.
export CARGO_TARGET_DIR="$root/target/mutants/build"
export CARGO_PROFILE_TEST_DEBUG=0 CARGO_PROFILE_DEV_DEBUG=0

if $quick; then
  files=("$src/route.rs" "$src/handoff.rs")
  # The modules' own tests: each must answer for its module (route's use the registry).
  filter=(route:: handoff::)
  # Their tests take milliseconds: a mutant still running after this long hangs.
  timeout=20
else
  files=("$src/route.rs" "$src/handoff.rs" "$src/history.rs" "$src/history/*.rs"
    "$src/registry/*.rs" "$src/fanout.rs" "$src/skip.rs")
  filter=()
  # Their tests take 2-4 s; a mutant still running after this long hangs.
  timeout=20
fi
# etf.rs and memory.rs use none of these modules: their tests cannot catch a mutant here.
skip=(--skip etf:: --skip memory::)
$stress || skip+=(--skip stress_tests::)

file_args=()
for f in "${files[@]}"; do file_args+=(-f "$f"); done

status=0
# Test code (`mod tests`, whose cfg cargo-mutants does not recognise) and the invariant
# checks that only tests call are not mutated.
cargo mutants --no-shuffle --jobs 1 --timeout "$timeout" --build-timeout 300 \
  --exclude-re 'tests::' --exclude-re 'check_invariants' \
  --output "$out" "${file_args[@]}" "${args[@]}" \
  -- --locked --lib -- "${filter[@]}" "${skip[@]}" || status=$?

results="$out/mutants.out"
count() { if [ -f "$results/$1.txt" ]; then wc -l <"$results/$1.txt"; else echo 0; fi; }
echo
echo "mutants: caught $(count caught), missed $(count missed), timed out $(count timeout)," \
  "unviable $(count unviable)"

# cargo-mutants exits 0 (all caught), 2 (some missed), 3 (some timed out: the mutant
# made the tests hang, which is a failure they show, if not a clean one); anything else
# (the baseline failed, bad usage) is an error here in every mode.
case "$status" in
  0 | 2 | 3) ;;
  *)
    echo "mutants: cargo mutants failed (exit status $status)" >&2
    exit "$status"
    ;;
esac
$quick || exit 0

# Quick mode: every missed mutant must be in the accepted list, matched by file and
# description (line numbers move as the code does).
unexpected=0
while IFS= read -r line; do
  [ -n "$line" ] || continue
  key="$(sed -E 's|^([^:]*):[0-9]+:[0-9]+: |\1: |' <<<"$line")"
  if ! grep -vE '^\s*(#|$)' "$accepted" | sed -E 's/[[:space:]]+#.*$//' | grep -qxF "$key"; then
    echo "mutants: MISSED and not accepted: $line" >&2
    unexpected=$((unexpected + 1))
  fi
done < <(cat "$results/missed.txt" 2>/dev/null || true)

if [ "$unexpected" -gt 0 ]; then
  echo "mutants: $unexpected missed mutant(s): add a test that catches each, or list it with" \
    "its reason in scripts/mutants-accepted.txt and docs/testing.md" >&2
  exit 1
fi
echo "mutants: quick mode passed (every missed mutant is accepted)"
