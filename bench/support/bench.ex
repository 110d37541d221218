defmodule Bench do
  @moduledoc false
  # The harness every script in bench/ shares: options, the machine, statistics, number
  # formatting, Markdown tables (also what is printed), PASS/MISS targets, the results
  # file, subscriber set-up and restarting :ex_atlas with settings.
  #
  # A script loads it with `Code.require_file("support/bench.ex", __DIR__)`.

  ## Options

  # Parses `argv` with `switches` (plus `--quick` and `--out DIR`) into a map over
  # `defaults.(quick?)`. Integer lists (`"1,10,100"`) are given as `:ints` switches. The
  # output directory defaults to `bench/results`, or to a temporary one with `--quick`.
  def options(argv, name, switches, defaults) do
    types = for {k, t} <- switches, do: {k, if(t == :ints, do: :string, else: t)}

    {parsed, rest, invalid} =
      OptionParser.parse(argv, strict: [quick: :boolean, out: :string] ++ types)

    if rest != [] or invalid != [],
      do:
        Mix.raise(
          "unknown arguments #{inspect(rest ++ invalid)}: see the header of bench/#{name}.exs"
        )

    quick = Keyword.get(parsed, :quick, false)

    out =
      if quick,
        do: Path.join(System.tmp_dir!(), "ex_atlas_#{name}_quick"),
        else: Path.join(__DIR__, "../results")

    parsed =
      Map.new(parsed, fn {k, v} -> {k, if(switches[k] == :ints, do: ints!(k, v), else: v)} end)

    defaults.(quick)
    |> Map.merge(%{quick: quick, out: out})
    |> Map.merge(parsed)
    |> Map.update!(:out, &Path.expand/1)
  end

  defp ints!(key, text) do
    values = for item <- String.split(text, ",", trim: true), do: Integer.parse(String.trim(item))

    if values == [] or Enum.any?(values, &(not match?({n, ""} when n > 0, &1))),
      do: Mix.raise("expected --#{key} to be positive integers like 1,10,100, got: #{text}")

    values |> Enum.map(&elem(&1, 0)) |> Enum.uniq()
  end

  ## The machine

  # Date, machine, versions, VM flags, commit and load average, in order.
  def machine do
    cpu =
      with {:ok, t} <- File.read("/proc/cpuinfo"),
           [_, m] <- Regex.run(~r/^model name\s*:\s*(.+)$/m, t),
           do: String.trim(m),
           else: (_ -> "unknown CPU")

    mem =
      with {:ok, t} <- File.read("/proc/meminfo"),
           [_, kib] <- Regex.run(~r/^MemTotal:\s*(\d+) kB$/m, t),
           do: "#{Float.round(String.to_integer(kib) / 1_048_576, 1)} GiB",
           else: (_ -> "unknown")

    flags =
      for v <- ~w(ERL_FLAGS ERL_AFLAGS ERL_ZFLAGS),
          (x = System.get_env(v)) not in [nil, ""],
          do: "#{v}=#{inspect(x)}"

    [
      date: DateTime.utc_now() |> DateTime.truncate(:second) |> DateTime.to_iso8601(),
      machine: "#{:erlang.system_info(:logical_processors_available)} CPUs, #{cpu}, #{mem} RAM",
      schedulers: "#{:erlang.system_info(:schedulers_online)} online",
      otp: "Erlang/OTP #{System.otp_release()} (erts #{:erlang.system_info(:version)})",
      elixir: "Elixir #{System.version()}",
      vm_flags: if(flags == [], do: "none (ERL_FLAGS etc. unset)", else: Enum.join(flags, " ")),
      commit: commit(),
      load_average_at_start: load_average()
    ]
  end

  # The 1, 5 and 15 minute load averages.
  def load_average do
    case File.read("/proc/loadavg") do
      {:ok, text} -> text |> String.split() |> Enum.take(3) |> Enum.join(" ")
      {:error, _} -> "unknown"
    end
  end

  # Several engineers change lib/ and native/ in one tree: say when the code measured
  # differs from the commit.
  defp commit do
    with git when is_binary(git) <- System.find_executable("git"),
         {sha, 0} <- System.cmd(git, ~w(rev-parse --short HEAD), stderr_to_stdout: true),
         {status, 0} <- System.cmd(git, ~w(status --porcelain -- lib native)) do
      String.trim(sha) <>
        if(String.trim(status) == "", do: "", else: " (lib/ or native/ modified)")
    else
      _ -> "unknown"
    end
  end

  ## Statistics and formatting

  # Median, nearest-rank p99 (the maximum below 100 samples), min and max.
  def summary([_ | _] = samples) do
    sorted = Enum.sort(samples)
    n = length(sorted)
    at = &(Enum.at(sorted, &1) * 1.0)

    median =
      if rem(n, 2) == 1, do: at.(div(n, 2)), else: (at.(div(n, 2) - 1) + at.(div(n, 2))) / 2

    %{median: median, p99: at.(max(ceil(0.99 * n), 1) - 1), min: at.(0), max: at.(n - 1)}
  end

  # The median of a non-empty list.
  def median(samples), do: summary(samples).median

  # Nanoseconds as `850 ns`, `12.3 us`, `4.56 ms`, `1.23 s`; `-` for nil.
  def dur(nil), do: "-"
  def dur(ns) when ns < 1_000, do: "#{round(ns)} ns"
  def dur(ns) when ns < 1_000_000, do: sig(ns / 1_000) <> " us"
  def dur(ns) when ns < 1_000_000_000, do: sig(ns / 1_000_000) <> " ms"
  def dur(ns), do: sig(ns / 1_000_000_000) <> " s"

  # A rate as `812`, `45.3 k`, `2.41 M`.
  def rate(r) when r < 1_000, do: sig(r)
  def rate(r) when r < 1_000_000, do: sig(r / 1_000) <> " k"
  def rate(r), do: sig(r / 1_000_000) <> " M"

  # Bytes as `96 B`, `12.5 KiB`, `3.20 MiB`.
  def bytes(b) when b < 0, do: "-" <> bytes(-b)
  def bytes(b) when b < 1_024, do: "#{round(b)} B"
  def bytes(b) when b < 1_048_576, do: sig(b / 1_024) <> " KiB"
  def bytes(b), do: sig(b / 1_048_576) <> " MiB"

  # Three significant digits, no exponent.
  def sig(x) when abs(x) >= 100, do: Integer.to_string(round(x))
  def sig(x) when abs(x) >= 10, do: :erlang.float_to_binary(x * 1.0, decimals: 1)
  def sig(x), do: :erlang.float_to_binary(x * 1.0, decimals: 2)

  # `a / b` as `1.23x`, or `-` when either is missing or `b` is zero.
  def ratio(a, b) when is_number(a) and is_number(b) and b != 0, do: sig(a / b) <> "x"
  def ratio(_, _), do: "-"

  # A percentage with three decimals.
  def pct(x) when abs(x) < 0.0005, do: "0.000%"
  def pct(x), do: :erlang.float_to_binary(x * 1.0, decimals: 3) <> "%"

  ## Tables, targets and the results file

  # A Markdown table, its columns padded so that it reads as well on a terminal; printed,
  # and returned for the results file. The first `left` columns align left, the rest right.
  def table(title, headers, rows, opts \\ []) do
    headers = if is_binary(headers), do: String.split(headers, "|"), else: headers
    left = Keyword.get(opts, :left, 1)
    rows = Enum.map(rows, fn row -> Enum.map(row, &to_string/1) end)

    widths =
      Enum.zip_with([headers | rows], fn col ->
        col |> Enum.map(&String.length/1) |> Enum.max() |> max(4)
      end)

    pad = fn cells ->
      Enum.with_index(Enum.zip(cells, widths), fn {c, w}, i ->
        if i < left, do: String.pad_trailing(c, w), else: String.pad_leading(c, w)
      end)
    end

    line = fn cells -> "| " <> Enum.join(pad.(cells), " | ") <> " |" end

    rule =
      Enum.with_index(widths, fn w, i ->
        if i < left,
          do: ":" <> String.duplicate("-", w - 1),
          else: String.duplicate("-", w - 1) <> ":"
      end)

    note = if opts[:note], do: ["", "_#{opts[:note]}_"], else: []

    text =
      Enum.join(
        ["### " <> title, "", line.(headers), line.(rule) | Enum.map(rows, line)] ++ note,
        "\n"
      ) <> "\n"

    IO.puts("\n" <> text)
    text
  end

  # A targets table: rows of `{target, measured, pass?}`; pass? nil means not measured.
  def targets(title, rows, opts \\ []) do
    rows = for {target, measured, pass?} <- rows, do: [target, measured, verdict(pass?)]
    table(title, ["target", "measured", "verdict"], rows, Keyword.put(opts, :left, 1))
  end

  # PASS, MISS, or n/a for nil.
  def verdict(nil), do: "n/a"
  def verdict(true), do: "PASS"
  def verdict(false), do: "MISS"

  # The VM's threads as `{name, fd}`, each thread's /proc/self/task/<tid>/schedstat kept
  # open (raw, so a reading is one pread); [] without it (not Linux).
  def schedstat_open do
    with {:ok, tids} <- File.ls("/proc/self/task") do
      for tid <- tids,
          dir = "/proc/self/task/" <> tid,
          {:ok, comm} <- [File.read(dir <> "/comm")],
          {:ok, fd} <- [:file.open(dir <> "/schedstat", [:raw, :read, :binary])],
          do: {String.trim(comm), fd}
    else
      _ -> []
    end
  end

  # A thread's `{ns on a CPU, ns ready to run but waiting for one}`, or nil. The read runs
  # on a dirty I/O thread, which spins a while for more work afterwards: call
  # `schedstat_settle/0` before timing anything.
  def schedstat(fd) do
    with {:ok, stat} <- :file.pread(fd, 0, 128),
         [run, wait | _] <- String.split(stat),
         {run, ""} <- Integer.parse(run),
         {wait, ""} <- Integer.parse(wait),
         do: {run, wait},
         else: (_ -> nil)
  end

  # Lets the dirty I/O thread of the last `schedstat/1` reads go back to sleep. Started at
  # once, a round that keeps both cores busy would share them with its spinning (measured:
  # up to 100 ms of it waiting for a core in a 100 ms round, and slices taken from the
  # schedulers); 1 ms of idle lets it finish.
  def schedstat_settle, do: Process.sleep(1)

  # How this run was started, for the results file: the script with the arguments it got,
  # less `--out DIR` (where the file went says nothing about what was measured).
  def command(script),
    do: Enum.join(["MIX_ENV=prod mix run bench/#{script}" | without_out(System.argv())], " ")

  defp without_out(["--out", _dir | rest]), do: without_out(rest)
  defp without_out(["--out=" <> _ | rest]), do: without_out(rest)
  defp without_out([arg | rest]), do: [arg | without_out(rest)]
  defp without_out([]), do: []

  # The results file's header (not printed): title, command and the machine as a table.
  def header(title, command, machine) do
    rows =
      Enum.map_join(machine, "\n", fn {k, v} ->
        "| #{String.replace("#{k}", "_", " ")} | #{v} |"
      end)

    "# #{title}\n\n`#{command}`\n\n| | |\n|:---|:---|\n#{rows}\n"
  end

  # Writes `sections` to `file` in `dir` (created); returns the path.
  def write(dir, file, sections) do
    File.mkdir_p!(dir)
    path = Path.join(dir, file)
    File.write!(path, Enum.intersperse(sections, "\n"))
    IO.puts("wrote #{path}")
    path
  end

  ## Processes

  # `{result, nanoseconds}` of `fun`.
  def timed(fun) do
    t0 = System.monotonic_time(:nanosecond)
    result = fun.()
    {result, System.monotonic_time(:nanosecond) - t0}
  end

  # Runs `fun_for.(index)` in each of `pids` at once (no message when it returns nil) and
  # waits until all have run it: a subscriber loop answers `{:run, from, ref, fun}` with
  # `ran/3`. Each function must return `:ok`.
  def run_in_each(pids, fun_for) do
    ref = make_ref()

    sent =
      Enum.with_index(pids, fn pid, i ->
        if fun = fun_for.(i), do: send(pid, {:run, self(), ref, fun})
      end)

    for _ <- Enum.reject(sent, &is_nil/1) do
      receive do
        {:ran, ^ref, :ok} -> :ok
        {:ran, ^ref, other} -> raise "a subscriber's set-up returned #{inspect(other)}"
      after
        120_000 -> raise "subscribers did not finish their set-up"
      end
    end

    :ok
  end

  # The subscriber's side of `run_in_each/2`.
  def ran(from, ref, fun), do: send(from, {:ran, ref, fun.()})

  # Restarts the `:ex_atlas` application with `settings` merged into its `:fly` env.
  def restart(settings) do
    case Application.stop(:ex_atlas) do
      :ok -> :ok
      {:error, {:not_started, :ex_atlas}} -> :ok
    end

    Application.put_env(
      :ex_atlas,
      :fly,
      Keyword.merge(Application.get_env(:ex_atlas, :fly, []), settings)
    )

    {:ok, _} = Application.ensure_all_started(:ex_atlas)
    :ok
  end

  ## The workload

  # 20 small maps, like a batch of Fly log lines.
  def entries do
    for i <- 1..20 do
      %{
        "timestamp" => "2025-01-01T12:00:#{String.pad_leading("#{i}", 2, "0")}Z",
        "message" => "GET /healthz 200 in #{i}ms",
        "level" => "info",
        "instance" => "e784079b449483",
        "region" => "ams"
      }
    end
  end

  # The original ExAtlas 0.5.0 dispatch: `Registry.dispatch/3` with a send loop.
  def registry_dispatch(registry, topic, message) do
    Registry.dispatch(registry, topic, fn entries ->
      for {pid, _} <- entries, do: send(pid, message)
    end)
  end
end
