#!/usr/bin/env bash
# Runs the Rust core's unit tests (registry, fan-out lanes and the concurrency stress tests
# in native/ex_atlas_dispatcher/src/stress_tests.rs) under valgrind's memcheck: invalid
# reads and writes, use of uninitialised memory, bad frees and definite or indirect leaks
# fail the run. Miri and the sanitizers need a nightly toolchain; valgrind works with the
# stable one. The stress tests run at EX_ATLAS_STRESS_PERCENT (default here 10) of their
# usual size, as valgrind slows them about fifty times.
#
#   bash scripts/valgrind.sh                 # every unit test of the crate
#   bash scripts/valgrind.sh stress_tests    # only tests whose name contains the filter
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck source=scripts/env.sh
. scripts/env.sh

command -v valgrind >/dev/null || {
  echo "valgrind is not installed (apt-get install valgrind)" >&2
  exit 2
}

echo "==> cargo test --no-run (debug build: no optimisation hides an access)"
binary="$(
  cargo test --locked -p ex_atlas_dispatcher --lib --no-run --message-format=json 2>/dev/null |
    sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1
)"
[ -x "$binary" ] || {
  echo "could not find the test binary" >&2
  exit 2
}

echo "==> valgrind memcheck $binary $*"
EX_ATLAS_STRESS_PERCENT="${EX_ATLAS_STRESS_PERCENT:-10}" \
  valgrind --error-exitcode=1 --leak-check=full \
  --errors-for-leak-kinds=definite,indirect --show-leak-kinds=definite,indirect \
  "$binary" --test-threads=2 "$@"
