#!/usr/bin/env bash
# Installs what ExAtlas needs on a Debian machine, and nothing when it is all there:
# Elixir and Erlang (with erlang-dev) from Debian, PropEr for property tests, Dialyzer,
# gnuplot for benchmark plots; checks for a Rust toolchain (cargo, rustfmt, clippy).
# Safe to run again and again. Runs as root, or through sudo when not root.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/env.sh
. "$here/env.sh"

packages=(elixir erlang-dev erlang-proper erlang-dialyzer gnuplot)

installed() {
  [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = "installed" ]
}

missing=()
for package in "${packages[@]}"; do
  installed "$package" || missing+=("$package")
done

if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  if [ "$(id -u)" -eq 0 ]; then
    sudo=()
  elif command -v sudo >/dev/null 2>&1; then
    sudo=(sudo -n)
  else
    echo "setup: ${missing[*]} missing, and we are neither root nor have sudo" >&2
    exit 1
  fi
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  echo "setup: ${packages[*]} already installed"
fi

for tool in elixir mix erl; do
  command -v "$tool" >/dev/null 2>&1 || {
    echo "setup: $tool is still not on PATH after installing Elixir" >&2
    exit 1
  }
done

# The minimum Rust is stated once, as rust-version in the crate's Cargo.toml; the Mix
# compiler (mix.exs) checks the same number.
rust_min="$(sed -n 's/^rust-version *= *"\([^"]*\)".*/\1/p' "$here/../native/ex_atlas_dispatcher/Cargo.toml")"
rust_min="${rust_min:?setup: no rust-version in native/ex_atlas_dispatcher/Cargo.toml}"

if ! command -v cargo >/dev/null 2>&1; then
  cat >&2 <<MSG
setup: cargo was not found. ExAtlas builds a Rust NIF and needs a Rust toolchain
(cargo, rustfmt and clippy, Rust $rust_min or newer). Install it with rustup
(https://rustup.rs), make sure ~/.cargo/bin is on PATH, and run this again.
MSG
  exit 1
fi

rustc_found="$(rustc --version 2>/dev/null | sed -n 's/^rustc \([0-9][0-9.]*\).*/\1/p')"
if [ -n "$rustc_found" ] &&
  [ "$(printf '%s\n%s\n' "$rust_min" "$rustc_found" | sort -V | head -n 1)" != "$rust_min" ]; then
  cat >&2 <<MSG
setup: ExAtlas needs Rust $rust_min or newer, but rustc is $rustc_found.
Update it with \`rustup update stable\` (https://rustup.rs) and run this again.
MSG
  exit 1
fi

# rustfmt and clippy are rustup components; add them when rustup is there and they are not.
for component in rustfmt clippy; do
  subcommand=${component/rustfmt/fmt}
  if ! cargo "$subcommand" --version >/dev/null 2>&1; then
    if command -v rustup >/dev/null 2>&1; then
      echo "setup: adding the rustup component $component"
      rustup component add "$component"
    else
      echo "setup: cargo $subcommand ($component) is missing and rustup is not there to add it" >&2
      exit 1
    fi
  fi
done

echo "setup: $(elixir --short-version 2>/dev/null || echo elixir) on OTP $(erl -noshell -eval 'io:put_chars(erlang:system_info(otp_release)), halt().'), $(cargo --version)"
