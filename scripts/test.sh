#!/usr/bin/env bash
# Runs every test: installs what is missing (scripts/setup.sh), then the Rust core's
# `cargo test` and the Elixir suite's `mix test` (MIX_ENV=test). Arguments go to mix test,
# e.g. `bash scripts/test.sh --only path_dependency` or `bash scripts/test.sh --include soak`.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
# shellcheck source=scripts/env.sh
. scripts/env.sh

logs="$(mktemp -d)"
trap 'rm -rf "$logs"' EXIT

echo "==> cargo test"
cargo_status=0
cargo test --locked 2>&1 | tee "$logs/cargo.log" || cargo_status=$?

echo "==> mix test"
mix_status=0
MIX_ENV=test mix test "$@" 2>&1 | tee "$logs/mix.log" || mix_status=$?

echo
echo "==> summary"
echo "cargo test: $(grep -E '^test result:' "$logs/cargo.log" | wc -l) test binaries, exit status $cargo_status"
grep -E '^test result:' "$logs/cargo.log" || echo "cargo test: no result line"
echo "mix test: exit status $mix_status"
grep -E '^[0-9]+ (doctests?|tests?|propert(y|ies))(, [0-9]+ (doctests?|tests?|propert(y|ies)))*, [0-9]+ failures?' "$logs/mix.log" ||
  echo "mix test: no result line"
# The failures' headings and first lines, so that a CI log cut to its tail still names them.
if grep -qE '^ +[0-9]+\) (test|doctest|property)' "$logs/mix.log"; then
  echo "mix test failures:"
  grep -A12 -E '^ +[0-9]+\) (test|doctest|property)' "$logs/mix.log" | cut -c1-200
fi

if [ "$cargo_status" -ne 0 ] || [ "$mix_status" -ne 0 ]; then
  echo "FAILED"
  exit 1
fi
echo "all tests passed"
