defmodule Mix.Tasks.Compile.CargoNif do
  @shortdoc "Builds the dispatcher NIF with cargo and places it under priv/native"
  @moduledoc """
  Builds `native/ex_atlas_dispatcher` with `cargo build --release` when the installed
  library is missing, was built from other sources, features or for another VM, or is
  not the file that was built (see `stamp_text/2`), and installs the library as
  `priv/native/ex_atlas_dispatcher.so`, the name `:erlang.load_nif/2` looks for on every
  Unix, macOS included (it appends `.so` to the path it is given). Cargo names the file
  `libex_atlas_dispatcher.so` on Linux and the BSDs and `libex_atlas_dispatcher.dylib` on
  macOS. Windows is not supported.

  The Rust toolchain must be at least the `rust-version` of
  `native/ex_atlas_dispatcher/Cargo.toml`; an older `rustc` stops the build with a
  message that says so.

  Features: `alloc-stats` (the NIF counts the bytes it allocates, at the cost of one
  shared atomic add per allocation) is on outside `MIX_ENV=prod`, and in `:prod` too
  when `EX_ATLAS_ALLOC_STATS=1` is set (the benchmarks' memory figures need it). Under
  `MIX_ENV=prod` debug info is stripped. What was built is recorded in
  `priv/native/ex_atlas_dispatcher.so.stamp`. A built library that this VM cannot load
  fails the compile with the loader's message, and is not installed.

  `EX_ATLAS_SKIP_NIF_BUILD=1` (or `true`) skips cargo altogether and uses the library
  already at `priv/native/ex_atlas_dispatcher.so` of this project (for a dependency:
  the dependency's own directory, e.g. `deps/ex_atlas/priv/native/`), for example one
  built by CI and copied into a Docker image that has no Rust toolchain. The build
  fails with a clear message when that file is missing. The library is used as it is,
  whatever its features and however old it is next to the Rust sources.

  hex.pm is out of reach, so this replaces the `rustler` Mix package. It runs from this
  project's own `mix.exs`, so it works both here and when `:ex_atlas` is a `path:`
  dependency of another Mix project. Cargo runs in this project's root, so it reads the
  `.cargo/config.toml` there (the macOS link flags) in both cases.

  The library is installed through a temporary file and `File.rename!/2`: overwriting a
  shared object that the running VM has mapped would crash it.
  """
  use Mix.Task.Compiler

  @crate "ex_atlas_dispatcher"
  @root Path.dirname(__ENV__.file)
  # The single statement of the minimum Rust version; setup.sh reads it too.
  @crate_manifest Path.join(@root, "native/ex_atlas_dispatcher/Cargo.toml")

  @impl true
  def run(_args) do
    {_built, installed} = library_files(:os.type())
    target = Path.join([@root, "priv", "native", installed])

    result =
      if skip_build?() do
        use_prebuilt!(target)
      else
        build_if_stale!(target)
      end

    # Mix links priv/ into _build only if it existed when the build structure was made;
    # on a clean checkout we have just created it.
    Mix.Project.build_structure()
    {result, []}
  end

  @impl true
  def clean do
    File.rm_rf!(Path.join([@root, "priv", "native"]))
    :ok
  end

  @doc """
  The library file cargo builds for the `cdylib` on the OS `os_type` (as `:os.type/0`
  returns it), and the name it is installed under in `priv/native/`.

  `:erlang.load_nif/2` appends `.so` on every Unix, macOS included, so the installed
  name is the same everywhere. Raises `Mix.Error` on Windows, which is not supported.
  """
  @spec library_files({atom(), atom()}) :: {built :: String.t(), installed :: String.t()}
  def library_files({:unix, :darwin}), do: {"lib#{@crate}.dylib", "#{@crate}.so"}
  def library_files({:unix, _}), do: {"lib#{@crate}.so", "#{@crate}.so"}

  def library_files({:win32, _}) do
    Mix.raise(
      "ExAtlas's dispatcher NIF does not support Windows: it is built and loaded as a " <>
        "Unix shared library. Build and run on Linux or macOS (WSL counts as Linux)"
    )
  end

  @doc """
  The `rust-version` stated in the crate manifest `cargo_toml` (its text), or `nil`.
  """
  @spec rust_version(String.t()) :: String.t() | nil
  def rust_version(cargo_toml) do
    case Regex.run(~r/^rust-version\s*=\s*"([^"]+)"/m, cargo_toml) do
      [_, version] -> version
      nil -> nil
    end
  end

  @doc """
  Checks the output of `rustc --version` against the minimum `required` (`"1.91"` or
  `"1.91.0"`). Output it cannot read passes: cargo itself refuses a too old compiler.
  """
  @spec check_rustc_version(String.t(), String.t()) :: :ok | {:error, String.t()}
  def check_rustc_version(rustc_output, required) do
    with [_, found] <- Regex.run(~r/^rustc (\d+\.\d+\.\d+)/, rustc_output),
         :lt <- Version.compare(found, full_version(required)) do
      {:error,
       "the ExAtlas dispatcher NIF needs Rust #{required} or newer, but rustc is #{found} " <>
         "(#{String.trim(rustc_output)}). Update it with `rustup update stable` " <>
         "(https://rustup.rs)"}
    else
      _ -> :ok
    end
  end

  defp full_version(version) do
    case String.split(version, ".") do
      [major, minor] -> "#{major}.#{minor}.0"
      _ -> version
    end
  end

  defp skip_build?, do: System.get_env("EX_ATLAS_SKIP_NIF_BUILD") in ["1", "true"]

  defp use_prebuilt!(target) do
    if not File.regular?(target) do
      Mix.raise(
        "EX_ATLAS_SKIP_NIF_BUILD is set, so cargo does not run, but there is no prebuilt " <>
          "NIF library at #{target}. Copy there a library built for the same OS, CPU " <>
          "architecture and C library (by CI, or by `mix compile` without the variable), " <>
          "or unset EX_ATLAS_SKIP_NIF_BUILD to build it with cargo"
      )
    end

    if why = staleness(target, stamp_file(target), variant()) do
      Mix.shell().info(
        "==> EX_ATLAS_SKIP_NIF_BUILD is set: using the prebuilt #{target} as it is " <>
          "(a build would replace it: #{why})"
      )
    end

    with {:error, message} <- load_check(Path.rootname(target)) do
      Mix.raise(
        "EX_ATLAS_SKIP_NIF_BUILD is set, but this VM cannot load the prebuilt NIF " <>
          "library #{target}: #{message}. It must be built for the same OS, CPU " <>
          "architecture and C library (and a NIF version this OTP accepts)"
      )
    end

    :noop
  end

  defp build_if_stale!(target) do
    variant = variant()
    stamp = stamp_file(target)

    case staleness(target, stamp, variant) do
      nil ->
        :noop

      why ->
        Mix.shell().info("==> building the dispatcher NIF: #{why}")
        build!(target, variant)
        File.write!(stamp, stamp_text(variant, target))
        # The stamp of earlier versions, which recorded only the features.
        File.rm(target <> ".features")
        :ok
    end
  end

  # Why the installed library must be built again, or nil when it is the one these
  # sources, features and VM make: it is missing, was built from other sources or
  # features or for another VM (its stamp says), or is not the file that was built (a
  # library copied over it: its content no longer matches the stamp).
  defp staleness(target, stamp, variant) do
    cond do
      not File.regular?(target) -> "no library at #{target}"
      not File.regular?(stamp) -> "no build stamp beside the library"
      File.read!(stamp) != stamp_text(variant, target) -> stamp_difference(stamp, variant)
      true -> nil
    end
  end

  defp stamp_difference(stamp, variant) do
    old = stamp |> File.read!() |> String.split("\n", trim: true)
    new = variant |> stamp_lines(nil) |> Enum.map(fn {key, value} -> "#{key}: #{value}" end)

    case new -- old do
      [] -> "the library is not the file that was built (replaced since)"
      changed -> "built from other " <> Enum.map_join(changed, ", ", &hd(String.split(&1, ":")))
    end
  end

  @doc """
  The text of the build stamp written beside the library: a hash of every file the
  crate is built from (its sources, the Cargo manifests, `Cargo.lock`, the cargo
  configuration), the cargo features, whether debug info is stripped, the VM it is
  checked against, and a hash of the library installed.
  """
  @spec stamp_text(map(), Path.t()) :: String.t()
  def stamp_text(variant, target) do
    variant
    |> stamp_lines(target)
    |> Enum.map_join("", fn {key, value} -> "#{key}: #{value}\n" end)
  end

  defp stamp_lines(variant, target) do
    lines = [
      {"sources", source_hash()},
      {"features", Enum.join(variant.features, ",")},
      {"strip", variant.strip},
      {"erts", "#{:erlang.system_info(:version)} #{:erlang.system_info(:system_architecture)}"}
    ]

    if target, do: lines ++ [{"library", file_hash(target)}], else: lines
  end

  defp stamp_file(target), do: target <> ".stamp"

  defp source_hash do
    files =
      [
        "Cargo.toml",
        "Cargo.lock",
        ".cargo/config.toml",
        "native/ex_atlas_dispatcher/Cargo.toml"
      ] ++
        Enum.map(
          Path.wildcard(Path.join(@root, "native/ex_atlas_dispatcher/src/**/*")),
          &Path.relative_to(&1, @root)
        )

    files
    |> Enum.uniq()
    |> Enum.sort()
    |> Enum.filter(&File.regular?(Path.join(@root, &1)))
    |> Enum.reduce(:crypto.hash_init(:sha256), fn file, acc ->
      acc
      |> :crypto.hash_update(file <> <<0>>)
      |> :crypto.hash_update(File.read!(Path.join(@root, file)) <> <<0>>)
    end)
    |> :crypto.hash_final()
    |> Base.encode16(case: :lower)
  end

  defp file_hash(path) do
    if File.regular?(path),
      do: :crypto.hash(:sha256, File.read!(path)) |> Base.encode16(case: :lower),
      else: "none"
  end

  # What is built: the features (see the moduledoc) and, under MIX_ENV=prod, without
  # debug info (the release profile keeps line tables for backtraces and profilers in
  # development: about 6 MB of a library of under 1 MB). Each variant has its own cargo
  # target directory, so switching between them (the library's own dev build and a
  # host's prod build of the same path dependency) only copies the library again.
  defp variant do
    strip = if Mix.env() == :prod, do: "debuginfo", else: "none"
    %{features: features(), strip: strip}
  end

  defp variant_dir(%{features: features, strip: strip}) do
    Enum.join(["nif" | features] ++ if(strip == "none", do: [], else: ["stripped"]), "-")
  end

  defp features do
    if Mix.env() != :prod or System.get_env("EX_ATLAS_ALLOC_STATS") in ["1", "true"],
      do: ["alloc-stats"],
      else: []
  end

  defp feature_args([]), do: []
  defp feature_args(features), do: ["--features", Enum.join(features, ",")]

  defp build!(target, variant) do
    required = @crate_manifest |> File.read!() |> rust_version()
    cargo = System.find_executable("cargo") || Mix.raise(missing_cargo(required))
    check_rustc!(required)

    target_dir = Path.join(cargo_target_dir(), variant_dir(variant))

    args =
      ["build", "--release", "--locked", "-p", @crate, "--target-dir", target_dir] ++
        feature_args(variant.features) ++ strip_args(variant.strip)

    Mix.shell().info("==> cargo " <> Enum.join(args, " "))

    {_, status} =
      System.cmd(cargo, args,
        cd: @root,
        env: [{"RUSTLER_PRIMARY_NIF_INIT", "1"}],
        into: IO.stream(:stdio, :line),
        stderr_to_stdout: true
      )

    if status != 0, do: Mix.raise("cargo build failed with exit status #{status}")

    {built_name, _} = library_files(:os.type())
    built = Path.join([target_dir, "release", built_name])
    File.exists?(built) || Mix.raise("cargo build did not produce #{built}")

    # Checked under a temporary name that ends in .so (load_nif/2 appends it), then
    # moved into place: a library this VM cannot load never replaces the installed one.
    File.mkdir_p!(Path.dirname(target))
    tmp = Path.rootname(target) <> ".tmp#{System.unique_integer([:positive])}.so"
    File.cp!(built, tmp)

    case load_check(Path.rootname(tmp)) do
      :ok ->
        File.rename!(tmp, target)

      {:error, message} ->
        File.rm(tmp)

        Mix.raise(
          "cargo built #{built}, but this VM cannot load it as a NIF: #{message}. " <>
            "Check that cargo builds for the OS, CPU architecture and C library this VM " <>
            "runs on (CARGO_BUILD_TARGET, a cross linker in .cargo/config.toml)"
        )
    end
  end

  defp strip_args("none"), do: []
  defp strip_args(strip), do: ["--config", ~s(profile.release.strip="#{strip}")]

  @doc """
  Loads the NIF library at `path` (without its `.so`) into a fresh VM under a module of
  the name it was built for, with none of its functions defined: `:erlang.load_nif/2`
  gets as far as looking for them only once the library is open, its init function
  found, its NIF version accepted and its module name matched. Anything short of that
  is the loader's message. A separate VM, since the build's own VM may run the real
  module (`mix test`).
  """
  @spec load_check(Path.t()) :: :ok | {:error, String.t()}
  def load_check(path) do
    case System.find_executable("elixir") do
      nil ->
        :ok

      elixir ->
        script = """
        defmodule ExAtlas.Fly.Dispatcher.Native do
          def check(path), do: :erlang.load_nif(String.to_charlist(path), 0)
        end

        case ExAtlas.Fly.Dispatcher.Native.check(hd(System.argv())) do
          {:error, {:bad_lib, 'Function not found' ++ _}} -> IO.write("loadable")
          other -> IO.write(inspect(other))
        end
        """

        case System.cmd(elixir, ["-e", script, path], stderr_to_stdout: true) do
          {"loadable", 0} -> :ok
          {output, _} -> {:error, String.trim(output)}
        end
    end
  end

  # cargo compiles with the rustc that $RUSTC names, else the one on PATH (with rustup,
  # both resolve the toolchain for the directory cargo runs in, hence `cd:`).
  defp check_rustc!(nil), do: :ok

  defp check_rustc!(required) do
    rustc =
      case System.get_env("RUSTC") do
        nil -> "rustc"
        "" -> "rustc"
        rustc -> rustc
      end

    result =
      case System.find_executable(rustc) do
        nil -> :ok
        path -> System.cmd(path, ["--version"], cd: @root, stderr_to_stdout: true)
      end

    case result do
      {output, 0} ->
        with {:error, message} <- check_rustc_version(output, required), do: Mix.raise(message)

      _ ->
        :ok
    end
  end

  defp cargo_target_dir do
    case System.get_env("CARGO_TARGET_DIR") do
      nil -> Path.join(@root, "target")
      "" -> Path.join(@root, "target")
      dir -> Path.expand(dir, @root)
    end
  end

  defp missing_cargo(required) do
    "cargo was not found on PATH: the ExAtlas dispatcher NIF needs a Rust toolchain " <>
      "(Rust #{required || "stable"} or newer, https://rustup.rs) to build, or a " <>
      "prebuilt library with EX_ATLAS_SKIP_NIF_BUILD=1"
  end
end

defmodule ExAtlas.MixProject do
  use Mix.Project

  def project do
    [
      app: :ex_atlas,
      version: "0.6.0",
      elixir: "~> 1.14",
      start_permanent: Mix.env() == :prod,
      compilers: [:cargo_nif] ++ Mix.compilers(),
      elixirc_paths: elixirc_paths(Mix.env()),
      deps: [],
      description: "Fly.io log and deploy event dispatcher on a Rust NIF registry"
    ]
  end

  def application do
    [
      extra_applications: [:logger],
      mod: {ExAtlas.Application, []}
    ]
  end

  defp elixirc_paths(:test), do: ["lib", "test/support"]
  defp elixirc_paths(_), do: ["lib"]
end
