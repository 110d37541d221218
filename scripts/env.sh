# Sourced by the other scripts: the environment every build and test step runs in.
# shellcheck shell=bash

# erl and mix need HOME; a bare CI environment may not set it.
if [ -z "${HOME:-}" ]; then
  HOME="$(getent passwd "$(id -u)" | cut -d: -f6)"
  export HOME="${HOME:-/root}"
fi

# cargo from rustup lives here; a non-login shell (CI) may not have it on PATH.
cargo_bin="${CARGO_HOME:-$HOME/.cargo}/bin"
if [ -d "$cargo_bin" ]; then
  case ":$PATH:" in
    *":$cargo_bin:"*) ;;
    *) export PATH="$cargo_bin:$PATH" ;;
  esac
fi
unset cargo_bin

# Nothing may prompt: no terminal in CI, and hex.pm is out of reach (we use no hex package).
export DEBIAN_FRONTEND=noninteractive
export HEX_OFFLINE=1
# The Erlang VM warns about a latin1 file name encoding under the POSIX locale.
case "${LANG:-C}" in
  C | POSIX) export LANG=C.UTF-8 ;;
esac
