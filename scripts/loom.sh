#!/usr/bin/env bash
# Model-checks the lane state machines (native/ex_atlas_dispatcher/src/loom_tests.rs)
# with loom: every interleaving of the models' threads, up to a preemption bound. Built
# in its own target directory, since --cfg loom changes every crate's build.
#
#   bash scripts/loom.sh [test filter and libtest options]   runs the models
#   bash scripts/loom.sh --seeds [seed ...]                  builds each seeded bug
#       (--cfg loom_seed="name") and runs the model it belongs to, which must fail;
#       exits non-zero if a seeded model passes (the model could not see that bug)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck source=scripts/env.sh
. scripts/env.sh

# Each model sets its own preemption bound; LOOM_MAX_PREEMPTIONS, when set, overrides it.
export RUSTFLAGS="--cfg loom ${RUSTFLAGS:-}"
target=target/loom

if [ "${1:-}" != "--seeds" ]; then
  exec cargo test --locked --release --target-dir "$target" -p ex_atlas_dispatcher --lib \
    loom_tests -- --test-threads=2 "$@"
fi
shift

# Each seed (also listed in Cargo.toml's check-cfg) and the model that must catch it.
declare -A model=(
  [put_back_checks_queue_early]=credits_are_neither_lost_nor_doubled_and_every_waiter_is_woken
  [try_reserve_ignores_queue]=waiters_are_served_first_come_first_served
  [shared_producer_key]=two_producers_last_batches_are_never_mixed_up
  [credit_back_on_park]=a_producers_order_holds_across_a_sender_replacement
  [reclaim_takes_sending]=a_producers_order_holds_across_a_sender_replacement
  [take_parked_opens_early]=a_producers_order_holds_across_a_sender_replacement
  [hand_finds_any_record]=two_producers_hand_over_across_a_sender_kill
  [release_at_first_slice]=a_batch_in_two_slices_keeps_order_and_counts_exactly
  [lost_ignores_cursor]=a_batch_in_two_slices_keeps_order_and_counts_exactly
  [dirty_counts_failed_sends]=a_reclaim_part_way_through_a_dirty_delivery
  [unpark_ignores_inflight]=a_parked_subscriber_catches_up_in_order_while_a_dispatch_is_out
)
seeds=("$@")
if [ ${#seeds[@]} -eq 0 ]; then
  seeds=(put_back_checks_queue_early try_reserve_ignores_queue shared_producer_key
    hand_finds_any_record credit_back_on_park reclaim_takes_sending take_parked_opens_early
    release_at_first_slice lost_ignores_cursor dirty_counts_failed_sends
    unpark_ignores_inflight)
fi

# `cargo rustc` passes the seed's --cfg to our crate alone, so each seed rebuilds one
# crate (and keeps its own binary: a second run is fresh). `--profile bench` builds the
# library's tests as `cargo test` does, optimised; without LTO and incrementally, so a
# seed builds in seconds rather than half a minute (the dependencies, built once for
# this profile, are kept apart from the plain run's).
export CARGO_PROFILE_BENCH_LTO=off CARGO_PROFILE_BENCH_INCREMENTAL=true
export CARGO_PROFILE_BENCH_CODEGEN_UNITS=16
escaped=()
for seed in "${seeds[@]}"; do
  test="${model[$seed]:-}"
  if [ -z "$test" ]; then
    echo "unknown seed: $seed (known: ${!model[*]})" >&2
    exit 2
  fi
  echo "== seed $seed: loom_tests::$test must fail"
  exe="$(cargo rustc --locked --profile bench --target-dir "$target" -p ex_atlas_dispatcher \
    --lib --message-format=json-render-diagnostics -- --cfg "loom_seed=\"$seed\"" |
    sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1)"
  if [ -z "$exe" ]; then
    echo "seed $seed: no test binary built" >&2
    exit 2
  fi
  log="$(mktemp)"
  if "$exe" --exact "loom_tests::$test" --test-threads=1 >"$log" 2>&1; then
    echo "   PASSED: the model does not catch this seed"
    escaped+=("$seed")
  elif grep -q "1 failed" "$log"; then
    echo "   failed, as it must: $(grep -m 1 -A 1 "panicked at" "$log" | tail -n 1)"
  else
    cat "$log" >&2
    echo "seed $seed: the model did not run" >&2
    exit 2
  fi
  rm -f "$log"
done
if [ ${#escaped[@]} -gt 0 ]; then
  echo "seeded bugs the models let through: ${escaped[*]}" >&2
  exit 1
fi
echo "every seeded bug was caught (${#seeds[@]} seeds)"
