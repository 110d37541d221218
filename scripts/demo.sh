#!/usr/bin/env bash
# The main job: installs what is missing (scripts/setup.sh), then streams synthetic Fly log
# batches to thousands of subscriber processes through ExAtlas.Fly.Dispatcher and through
# Elixir's Registry (the original implementation), and prints what it measured.
# Runs for under a minute. Arguments go to the demo, e.g. `--subscribers 20000 --seconds 5`.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
# shellcheck source=scripts/env.sh
. scripts/env.sh

MIX_ENV=prod mix compile
MIX_ENV=prod mix run bench/demo.exs "$@"
