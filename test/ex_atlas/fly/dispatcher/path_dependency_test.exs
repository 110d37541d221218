defmodule ExAtlas.Fly.Dispatcher.PathDependencyTest do
  # ExAtlas as a `path:` dependency of another Mix project. The host in
  # test/fixtures/host_app is copied to a temporary directory, its dependency path is
  # rewritten to an absolute one, and it is compiled and run by a separate `mix`
  # (MIX_ENV=dev, none of this run's MIX_* variables) that must dispatch through the NIF.
  #
  # EX_ATLAS_SKIP_NIF_BUILD is tested here too: same fixture, no cargo run.
  #
  # Runs in CI (about 10-60 s, most of it a cold cargo build); alone:
  # `mix test --only path_dependency`.
  use ExUnit.Case, async: false

  @moduletag :path_dependency
  @moduletag timeout: 600_000

  @repo_root Path.expand("../../../..", __DIR__)
  @fixture Path.join(@repo_root, "test/fixtures/host_app")

  # Variables of this test run that must not leak into the host's own build.
  @cleared ~w(MIX_BUILD_ROOT MIX_BUILD_PATH MIX_EXS MIX_DEPS_PATH MIX_LOCKFILE MIX_TARGET
              MIX_PROJECT MIX_NO_DEPS CARGO_TARGET_DIR)

  setup do
    dir = Path.join(System.tmp_dir!(), "ex_atlas_host_#{System.unique_integer([:positive])}")
    File.mkdir_p!(dir)
    on_exit(fn -> File.rm_rf!(dir) end)
    %{dir: dir}
  end

  test "a host app builds ExAtlas from this repository and dispatches through the NIF",
       %{dir: dir} do
    host = copy_host_app!(dir, @repo_root)

    compile_output = mix!(host, ["compile"])
    refute compile_output =~ "warning:", compile_output

    assert_round_trip(host, mix!(host, ["run", "-e", "HostApp.run()"]))
  end

  test "a host app builds the NIF of a pristine checkout (no priv/, no target/) itself",
       %{dir: dir} do
    dep = Path.join(dir, "ex_atlas")
    copy_sources!(dep)
    host = copy_host_app!(dir, dep)

    # The cargo build runs inside the host's `mix compile`, for the dependency.
    compile_output = mix!(host, ["compile"], [{"CARGO_TARGET_DIR", Path.join(dir, "target")}])
    assert compile_output =~ ~r/cargo build --release .*-p ex_atlas_dispatcher/, compile_output
    refute compile_output =~ "warning:", compile_output
    assert File.exists?(Path.join(dep, "priv/native/ex_atlas_dispatcher.so"))

    assert_round_trip(host, mix!(host, ["run", "-e", "HostApp.run()"]))

    # Up to date now: a second compile builds nothing.
    refute mix!(host, ["compile"]) =~ "cargo build"
  end

  describe "a library that is not the one these sources build" do
    # One cargo target directory for these tests, kept between runs (cargo's own cache).
    setup %{dir: dir} do
      dep = Path.join(dir, "ex_atlas")
      copy_sources!(dep)
      host = copy_host_app!(dir, dep)

      %{
        dep: dep,
        host: host,
        library: Path.join(dep, "priv/native/ex_atlas_dispatcher.so"),
        cargo_env: [{"CARGO_TARGET_DIR", Path.join(@repo_root, "target/host-tests")}]
      }
    end

    test "a broken prebuilt library is rebuilt, and so is one copied over a built one",
         %{dep: dep, host: host, library: library, cargo_env: cargo_env} do
      # What the issue found: a broken prebuilt library, newer than the sources, with
      # the features stamp of earlier versions saying it was built with these features.
      for file <-
            Path.wildcard(Path.join(dep, "Cargo.*")) ++
              Path.wildcard(Path.join(dep, "native/**/*")),
          do: File.touch!(file, {{2000, 1, 1}, {0, 0, 0}})

      File.mkdir_p!(Path.dirname(library))
      File.write!(library, "not a shared object")
      # (A dependency is built in its :prod env: no features.)
      File.write!(library <> ".features", "")

      output = mix!(host, ["compile"], cargo_env)
      assert output =~ "cargo build --release", output
      refute output =~ "could not load the NIF"
      assert_round_trip(host, mix!(host, ["run", "-e", "HostApp.run()"]))
      assert output =~ "building the dispatcher NIF: no build stamp beside the library"
      refute File.exists?(library <> ".features")

      # Built and stamped: nothing to do.
      refute mix!(host, ["compile"], cargo_env) =~ "cargo build"

      # Another file copied over the built one, stamp and all: rebuilt.
      File.write!(library, "still not a shared object")
      output = mix!(host, ["deps.compile", "ex_atlas", "--force"], cargo_env)
      assert output =~ "cargo build --release", output
      assert_round_trip(host, mix!(host, ["run", "-e", "HostApp.run()"]))
      assert output =~ "the library is not the file that was built"
    end

    test "a build of other sources is rebuilt (content, not times)",
         %{dep: dep, host: host, library: library, cargo_env: cargo_env} do
      mix!(host, ["compile"], cargo_env)
      stamp = File.read(library <> ".stamp")

      # A comment added to a source, its time set back before the library's.
      source = Path.join(dep, "native/ex_atlas_dispatcher/src/sync.rs")
      File.write!(source, File.read!(source) <> "\n// changed\n")
      File.touch!(source, {{2000, 1, 1}, {0, 0, 0}})

      output = mix!(host, ["compile"], cargo_env)
      assert output =~ "cargo build --release", output
      assert output =~ "building the dispatcher NIF: built from other sources"
      # Stamped with the new sources (the library itself may come out the same).
      assert {:ok, new_stamp} = File.read(library <> ".stamp")
      assert {:ok, new_stamp} != stamp
    end

    test "the library's own dev build and a host's prod build do not rebuild each other",
         %{dep: dep, host: host, cargo_env: cargo_env} do
      # The dependency's own dev build (alloc-stats), then the host's (a dependency is
      # built in :prod: no features, stripped), then each again.
      mix!(dep, ["compile"], cargo_env)
      mix!(host, ["compile"], cargo_env)

      again = mix!(dep, ["compile"], cargo_env)
      assert again =~ "building the dispatcher NIF: built from other features, strip", again
      refute again =~ "Compiling ex_atlas_dispatcher", again

      again = mix!(host, ["deps.compile", "ex_atlas", "--force"], cargo_env)
      assert again =~ "building the dispatcher NIF: built from other features, strip", again
      refute again =~ "Compiling ex_atlas_dispatcher", again
    end

    test "a build this VM cannot load fails the compile with the loader's message",
         %{dir: dir, host: host, library: library} do
      # A cargo that "builds" a file that is no shared object, where it was asked to.
      bin = Path.join(dir, "bin")
      File.mkdir_p!(bin)
      cargo = Path.join(bin, "cargo")

      File.write!(cargo, """
      #!/bin/sh
      while [ "$#" -gt 0 ]; do
        if [ "$1" = "--target-dir" ]; then dir="$2"; fi
        shift
      done
      mkdir -p "$dir/release" && echo "garbage" > "$dir/release/libex_atlas_dispatcher.so"
      """)

      File.chmod!(cargo, 0o755)
      fake_path = {"PATH", bin <> ":" <> System.get_env("PATH", "")}

      {output, status} = mix(host, ["compile"], [fake_path])
      assert status != 0, output
      assert output =~ "but this VM cannot load it as a NIF", output
      # The loader's own words.
      assert output =~ "Failed to load NIF library", output
      assert output =~ "file too short", output
      # Nothing was installed.
      refute File.exists?(library)
    end
  end

  describe "EX_ATLAS_SKIP_NIF_BUILD=1" do
    # A `cargo` first on PATH that only records that it was called and fails.
    setup %{dir: dir} do
      bin = Path.join(dir, "bin")
      File.mkdir_p!(bin)
      cargo = Path.join(bin, "cargo")
      File.write!(cargo, "#!/bin/sh\necho \"$*\" >> \"$0.called\"\nexit 1\n")
      File.chmod!(cargo, 0o755)

      %{
        fake_path: {"PATH", bin <> ":" <> System.get_env("PATH", "")},
        cargo_calls: cargo <> ".called"
      }
    end

    test "a host app uses the prebuilt library: no cargo run, and the NIF loads and works",
         %{dir: dir, fake_path: fake_path, cargo_calls: cargo_calls} do
      dep = Path.join(dir, "ex_atlas")
      copy_sources!(dep)
      host = copy_host_app!(dir, dep)

      # The library this test run loaded, as CI would have built it, older than the Rust
      # sources beside it and without a features stamp: a normal compile would rebuild.
      prebuilt = Path.join(dep, "priv/native/ex_atlas_dispatcher.so")
      File.mkdir_p!(Path.dirname(prebuilt))
      File.cp!(Path.join(:code.priv_dir(:ex_atlas), "native/ex_atlas_dispatcher.so"), prebuilt)
      File.touch!(prebuilt, {{2000, 1, 1}, {0, 0, 0}})

      # Control: without the variable, this setup does call cargo.
      {output, status} = mix(host, ["compile"], [fake_path])
      assert status != 0 and output =~ "cargo build failed", output
      assert File.exists?(cargo_calls)
      File.rm!(cargo_calls)

      skip = [fake_path, {"EX_ATLAS_SKIP_NIF_BUILD", "1"}]
      compile_output = mix!(host, ["compile"], skip)
      assert compile_output =~ "EX_ATLAS_SKIP_NIF_BUILD is set: using the prebuilt"
      refute compile_output =~ "cargo build"
      refute compile_output =~ "warning:", compile_output

      assert_round_trip(host, mix!(host, ["run", "-e", "HostApp.run()"], skip))
      if File.exists?(cargo_calls), do: flunk("cargo was called: #{File.read!(cargo_calls)}")
    end

    test "without a prebuilt library the compile fails and says where it looked",
         %{dir: dir, fake_path: fake_path, cargo_calls: cargo_calls} do
      dep = Path.join(dir, "ex_atlas")
      copy_sources!(dep)
      host = copy_host_app!(dir, dep)

      {output, status} = mix(host, ["compile"], [fake_path, {"EX_ATLAS_SKIP_NIF_BUILD", "1"}])

      assert status != 0
      assert output =~ "EX_ATLAS_SKIP_NIF_BUILD is set, so cargo does not run", output

      assert output =~
               "no prebuilt NIF library at #{dep}/priv/native/ex_atlas_dispatcher.so",
             output

      refute File.exists?(cargo_calls)
    end
  end

  defp assert_round_trip(host, output) do
    assert output =~ "registry mode: true"
    assert output =~ "count: 3"

    for n <- 1..3 do
      assert output =~ "viewer #{n} received: host-app hello from the host"
    end

    refute output =~ "missed"

    # Only the NIF keeps these figures.
    assert output =~ "nif subscriptions: 3 topics: 1"

    # The dependency was built into the host's own _build, which links the library's priv/.
    assert output =~ "nif library: #{host}/_build/dev/lib/ex_atlas/priv/native"

    assert File.exists?(
             Path.join(host, "_build/dev/lib/ex_atlas/priv/native/ex_atlas_dispatcher.so")
           )
  end

  defp copy_host_app!(dir, dep_path) do
    host = Path.join(dir, "host_app")

    for file <- ["mix.exs", "lib/host_app.ex"] do
      File.mkdir_p!(Path.dirname(Path.join(host, file)))
      File.cp!(Path.join(@fixture, file), Path.join(host, file))
    end

    mix_exs = Path.join(host, "mix.exs")
    original = File.read!(mix_exs)
    rewritten = String.replace(original, ~s(path: "../../.."), "path: #{inspect(dep_path)}")
    assert rewritten != original, "the fixture's path dependency was not found"
    File.write!(mix_exs, rewritten)
    host
  end

  # What a checkout of the library holds, without any build output.
  defp copy_sources!(dep) do
    File.mkdir_p!(dep)

    for file <- ["mix.exs", "Cargo.toml", "Cargo.lock", ".cargo/config.toml"] do
      File.mkdir_p!(Path.dirname(Path.join(dep, file)))
      File.cp!(Path.join(@repo_root, file), Path.join(dep, file))
    end

    File.cp_r!(Path.join(@repo_root, "lib"), Path.join(dep, "lib"))

    crate = "native/ex_atlas_dispatcher"
    File.mkdir_p!(Path.join(dep, crate))
    File.cp!(Path.join([@repo_root, crate, "Cargo.toml"]), Path.join([dep, crate, "Cargo.toml"]))
    File.cp_r!(Path.join([@repo_root, crate, "src"]), Path.join([dep, crate, "src"]))
    refute File.exists?(Path.join(dep, "priv"))
  end

  defp mix!(dir, args, extra_env \\ []) do
    {output, status} = mix(dir, args, extra_env)
    assert status == 0, "mix #{Enum.join(args, " ")} in #{dir} failed (#{status}):\n#{output}"
    output
  end

  defp mix(dir, args, extra_env) do
    env = [{"MIX_ENV", "dev"} | Enum.map(@cleared, &{&1, nil})] ++ extra_env
    mix = System.find_executable("mix") || flunk("mix is not on PATH")
    System.cmd(mix, args, cd: dir, env: env, stderr_to_stdout: true)
  end
end
