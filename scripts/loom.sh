#!/usr/bin/env bash
# Model-checks the lane state machines (native/ex_atlas_dispatcher/src/loom_tests.rs)
# with loom: every interleaving of the models' threads, up to a preemption bound. Built
# in its own target directory, since --cfg loom changes every crate's build.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck source=scripts/env.sh
. scripts/env.sh

RUSTFLAGS="--cfg loom ${RUSTFLAGS:-}" LOOM_MAX_PREEMPTIONS="${LOOM_MAX_PREEMPTIONS:-3}" \
  cargo test --locked --release --target-dir target/loom -p ex_atlas_dispatcher --lib \
  loom_tests -- --test-threads=2 "$@"
