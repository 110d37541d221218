defmodule Mix.Tasks.Compile.CargoNif do
  @shortdoc "Builds the dispatcher NIF with cargo and places it under priv/native"
  @moduledoc """
  Builds `native/ex_atlas_dispatcher` with `cargo build --release` when its sources or
  its cargo features changed and installs the library as
  `priv/native/ex_atlas_dispatcher.so`, the name `:erlang.load_nif/2` looks for on every
  Unix, macOS included (it appends `.so` to the path it is given). Cargo names the file
  `libex_atlas_dispatcher.so` on Linux and the BSDs and `libex_atlas_dispatcher.dylib` on
  macOS. Windows is not supported.

  The Rust toolchain must be at least the `rust-version` of
  `native/ex_atlas_dispatcher/Cargo.toml`; an older `rustc` stops the build with a
  message that says so.

  Features: `alloc-stats` (the NIF counts the bytes it allocates, at the cost of one
  shared atomic add per allocation) is on outside `MIX_ENV=prod`, and in `:prod` too
  when `EX_ATLAS_ALLOC_STATS=1` is set (the benchmarks' memory figures need it). The
  features built are recorded in `priv/native/ex_atlas_dispatcher.so.features`.

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

    if stale?(target) do
      Mix.shell().info(
        "==> EX_ATLAS_SKIP_NIF_BUILD is set: using the prebuilt #{target}, " <>
          "older than the Rust sources beside it"
      )
    end

    :noop
  end

  defp build_if_stale!(target) do
    features = features()
    # priv/native is shared by every Mix env, so the features built are recorded beside
    # the library and a change of them rebuilds it.
    stamp = target <> ".features"

    if stale?(target) or File.read(stamp) != {:ok, Enum.join(features, ",")} do
      build!(target, features)
      File.write!(stamp, Enum.join(features, ","))
      :ok
    else
      :noop
    end
  end

  defp stale?(target) do
    sources =
      [Path.join(@root, "Cargo.toml"), Path.join(@root, "Cargo.lock")] ++
        Path.wildcard(Path.join(@root, "native/**/{*.rs,Cargo.toml}"))

    Mix.Utils.stale?(Enum.filter(sources, &File.exists?/1), [target])
  end

  defp features do
    if Mix.env() != :prod or System.get_env("EX_ATLAS_ALLOC_STATS") in ["1", "true"],
      do: ["alloc-stats"],
      else: []
  end

  defp feature_args([]), do: []
  defp feature_args(features), do: ["--features", Enum.join(features, ",")]

  defp build!(target, features) do
    required = @crate_manifest |> File.read!() |> rust_version()
    cargo = System.find_executable("cargo") || Mix.raise(missing_cargo(required))
    check_rustc!(required)

    args = ["build", "--release", "--locked", "-p", @crate] ++ feature_args(features)

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
    built = Path.join([cargo_target_dir(), "release", built_name])
    File.exists?(built) || Mix.raise("cargo build did not produce #{built}")

    File.mkdir_p!(Path.dirname(target))
    tmp = target <> ".tmp#{System.unique_integer([:positive])}"
    File.cp!(built, tmp)
    File.rename!(tmp, target)
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
