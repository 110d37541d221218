defmodule Mix.Tasks.Compile.CargoNifTest do
  # The pure parts of the NIF's Mix compiler (defined in mix.exs, so loaded in every
  # `mix test`): per-OS file names and the minimum Rust check. A Linux machine cannot
  # build for macOS, so the names are tested here; the build itself is tested on this
  # OS by path_dependency_test.exs.
  use ExUnit.Case, async: true

  alias Mix.Tasks.Compile.CargoNif

  @repo_root Path.expand("../../..", __DIR__)

  describe "library_files/1" do
    test "Linux: cargo's lib<crate>.so installed as <crate>.so" do
      assert CargoNif.library_files({:unix, :linux}) ==
               {"libex_atlas_dispatcher.so", "ex_atlas_dispatcher.so"}
    end

    test "macOS: cargo's .dylib installed under the .so name load_nif/2 appends there" do
      assert CargoNif.library_files({:unix, :darwin}) ==
               {"libex_atlas_dispatcher.dylib", "ex_atlas_dispatcher.so"}
    end

    test "FreeBSD and other Unixes: .so, like Linux" do
      for os <- [:freebsd, :openbsd, :netbsd, :sunos] do
        assert CargoNif.library_files({:unix, os}) ==
                 {"libex_atlas_dispatcher.so", "ex_atlas_dispatcher.so"}
      end
    end

    test "Windows is refused with a message that says so" do
      assert_raise Mix.Error, ~r/does not support Windows/, fn ->
        CargoNif.library_files({:win32, :nt})
      end
    end
  end

  describe "minimum Rust version" do
    test "is read from the crate's Cargo.toml" do
      toml = File.read!(Path.join(@repo_root, "native/ex_atlas_dispatcher/Cargo.toml"))
      assert CargoNif.rust_version(toml) =~ ~r/^1\.\d+(\.\d+)?$/
      assert CargoNif.rust_version("[package]\nname = \"x\"\n") == nil
    end

    test "a rustc at or above it passes, an older one is refused naming both versions" do
      assert CargoNif.check_rustc_version("rustc 1.91.0 (f8297e351 2025-10-28)\n", "1.91") == :ok
      assert CargoNif.check_rustc_version("rustc 1.95.0-nightly (abc 2026-01-01)", "1.91") == :ok
      assert CargoNif.check_rustc_version("rustc 2.0.0", "1.91.1") == :ok

      assert {:error, message} =
               CargoNif.check_rustc_version("rustc 1.90.0 (1159e78c4 2025-09-14)", "1.91")

      assert message =~ "needs Rust 1.91 or newer, but rustc is 1.90.0"
      assert message =~ "rustup update"
    end

    test "output it cannot read is left to cargo" do
      assert CargoNif.check_rustc_version("something else", "1.91") == :ok
    end

    test "scripts/setup.sh states no number of its own" do
      setup = File.read!(Path.join(@repo_root, "scripts/setup.sh"))
      refute setup =~ ~r/Rust \d+\.\d+/
      assert setup =~ "rust-version"
    end
  end
end
