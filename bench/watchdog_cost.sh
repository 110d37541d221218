#!/usr/bin/env bash
# The dispatch cost with nobody skipped (`bench/watchdog.exs --part cost`), this checkout
# against an older one, in fresh VMs, alternating, so that a noisy machine hits both
# sides alike. Prints each run's lines and, last, the medians and their ratios.
#
#   git worktree add /tmp/before f613d48   # main before on_slow
#   bash bench/watchdog_cost.sh /tmp/before 10
#   bash bench/watchdog_cost.sh /tmp/other 10 --skipping-elsewhere   # more arguments go to the bench
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
before="$(cd "${1:?usage: bench/watchdog_cost.sh BEFORE_CHECKOUT [PAIRS]}" && pwd)"
pairs="${2:-10}"
extra=("${@:3}")
# shellcheck source=../scripts/env.sh
. "$here/scripts/env.sh"
out="$(mktemp)"
trap 'rm -f "$out"' EXIT

for dir in "$before" "$here"; do (cd "$dir" && MIX_ENV=prod mix compile >/dev/null); done
for i in $(seq 1 "$pairs"); do
  for side in before after; do
    if [ "$side" = before ]; then dir="$before"; else dir="$here"; fi
    echo "## $side $i" | tee -a "$out"
    (cd "$dir" && MIX_ENV=prod mix run "$here/bench/watchdog.exs" --part cost "${extra[@]}" | grep '^cost') |
      tee -a "$out"
  done
done

# Medians per size and measure, and after / before.
awk '
  /^## / { side = $2; next }
  /^cost / {
    split($3, c, "="); split($4, e, "=")
    n = $2; k = side "," n
    caller[k] = caller[k] " " c[2]; e2e[k] = e2e[k] " " e[2]; sizes[n] = 1
  }
  function median(list,    a, m, i, j, t) {
    m = split(list, a, " ")
    for (i = 1; i <= m; i++) for (j = i + 1; j <= m; j++) if (a[j] + 0 < a[i] + 0) { t = a[i]; a[i] = a[j]; a[j] = t }
    return (m % 2) ? a[(m + 1) / 2] : (a[m / 2] + a[m / 2 + 1]) / 2
  }
  END {
    for (n in sizes) {
      cb = median(caller["before," n]); ca = median(caller["after," n])
      eb = median(e2e["before," n]); ea = median(e2e["after," n])
      printf "medians at %s subscribers: caller %.1f -> %.1f ns (%.3fx), end to end %.1f -> %.1f ns (%.3fx)\n", n, cb, ca, ca / cb, eb, ea, ea / eb
    }
  }' "$out"
