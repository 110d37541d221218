#!/usr/bin/env bash
# Dialyzer over ExAtlas's own modules (lib/, as MIX_ENV=prod compiles them), with OTP's
# own dialyzer (Debian's erlang-dialyzer; no hex package). Fails on any warning.
#
# The PLT of OTP and Elixir takes minutes to build, so it is cached outside the checkout
# (EX_ATLAS_CACHE, default ~/.cache/ex_atlas), one per OTP and Elixir version, and built
# only when missing. A fresh machine builds it once.
#
# Phoenix.PubSub and :telemetry are optional dependencies, absent here: dialyzer lists
# the calls to them under "Unknown functions", which is not a warning.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/env.sh
. scripts/env.sh

command -v dialyzer >/dev/null 2>&1 || {
  echo "dialyzer: not found; scripts/setup.sh installs it (Debian's erlang-dialyzer)" >&2
  exit 1
}

elixir_lib="$(elixir -e 'IO.write(Path.dirname(:code.lib_dir(:elixir)))')"
otp="$(erl -noshell -eval 'io:format("~s", [erlang:system_info(otp_release)]), halt().')"
elixir_version="$(elixir -e 'IO.write(System.version())')"
cache="${EX_ATLAS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ex_atlas}"
plt="$cache/dialyzer-otp$otp-elixir$elixir_version.plt"
# Elixir's beams keep their debug info in Elixir's own format: dialyzer reads it through
# elixir_erl, so Elixir's ebin must be on its code path.
code_path=(-pa "$elixir_lib/elixir/ebin")

if [ ! -f "$plt" ]; then
  echo "dialyzer: building the PLT of OTP and Elixir (once; a few minutes): $plt"
  mkdir -p "$cache"
  tmp="$plt.$$.tmp"
  # Built under another name and moved in whole, so an interrupted build leaves no PLT
  # that looks complete. Exit status 2 means warnings in OTP's own code: not ours.
  status=0
  dialyzer "${code_path[@]}" --build_plt --output_plt "$tmp" \
    --apps erts kernel stdlib crypto compiler \
    "$elixir_lib/elixir/ebin" "$elixir_lib/logger/ebin" || status=$?
  if [ "$status" -ne 0 ] && [ "$status" -ne 2 ]; then
    rm -f "$tmp"
    echo "dialyzer: building the PLT failed (exit status $status)" >&2
    exit 1
  fi
  mv "$tmp" "$plt"
fi

MIX_ENV=prod mix compile
ebin="_build/prod/lib/ex_atlas/ebin"

echo "dialyzer: checking $ebin"
dialyzer "${code_path[@]}" --plt "$plt" --no_check_plt \
  -Wunmatched_returns -Werror_handling \
  "$ebin"
