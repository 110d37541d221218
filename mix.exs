defmodule Mix.Tasks.Compile.CargoNif do
  @shortdoc "Builds the dispatcher NIF with cargo and places it under priv/native"
  @moduledoc """
  Builds `native/ex_atlas_dispatcher` with `cargo build --release` when its sources or
  its cargo features changed and installs the library as
  `priv/native/ex_atlas_dispatcher.so`.

  Features: `alloc-stats` (the NIF counts the bytes it allocates, at the cost of one
  shared atomic add per allocation) is on outside `MIX_ENV=prod`, and in `:prod` too
  when `EX_ATLAS_ALLOC_STATS=1` is set (the benchmarks' memory figures need it).

  hex.pm is out of reach, so this replaces the `rustler` Mix package. It runs from this
  project's own `mix.exs`, so it works both here and when `:ex_atlas` is a `path:`
  dependency of another Mix project.

  The library is installed through a temporary file and `File.rename!/2`: overwriting a
  shared object that the running VM has mapped would crash it.
  """
  use Mix.Task.Compiler

  @crate "ex_atlas_dispatcher"
  @root Path.dirname(__ENV__.file)

  @impl true
  def run(_args) do
    target = Path.join([@root, "priv", "native", @crate <> ".so"])
    features = features()
    # priv/native is shared by every Mix env, so the features built are recorded beside
    # the library and a change of them rebuilds it.
    stamp = target <> ".features"

    result =
      if stale?(target) or File.read(stamp) != {:ok, Enum.join(features, ",")} do
        build!(target, features)
        File.write!(stamp, Enum.join(features, ","))
        :ok
      else
        :noop
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
    cargo = System.find_executable("cargo") || Mix.raise(missing_cargo())

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

    built = Path.join([cargo_target_dir(), "release", "lib" <> @crate <> ".so"])
    File.exists?(built) || Mix.raise("cargo build did not produce #{built}")

    File.mkdir_p!(Path.dirname(target))
    tmp = target <> ".tmp#{System.unique_integer([:positive])}"
    File.cp!(built, tmp)
    File.rename!(tmp, target)
  end

  defp cargo_target_dir do
    case System.get_env("CARGO_TARGET_DIR") do
      nil -> Path.join(@root, "target")
      "" -> Path.join(@root, "target")
      dir -> Path.expand(dir, @root)
    end
  end

  defp missing_cargo do
    "cargo was not found on PATH: the ExAtlas dispatcher NIF needs a Rust toolchain " <>
      "(https://rustup.rs) to build"
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
