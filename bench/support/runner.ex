defmodule FanoutBench.Runner do
  @moduledoc false
  # Orchestrates one benchmark run: parses the options, spawns the subscribers once,
  # subscribes them everywhere, then runs one pass per lane count (restarting the
  # :ex_atlas application in between) and hands the results to `FanoutBench.Report`.

  alias FanoutBench.{Churn, Contenders, CpuTime, Machine, Report, Rounds, Stats, Subscriber}

  require Logger

  @full_sizes [1, 10, 100, 1_000, 10_000, 100_000]
  @quick_sizes [1, 10, 100, 1_000]
  @per_topic 10

  @switches [
    quick: :boolean,
    sizes: :string,
    reps: :integer,
    lanes: :string,
    topics: :integer,
    out: :string,
    chart: :string,
    delivery: :string
  ]

  @doc "Runs the benchmark with command-line `argv`; `bench_dir` is where fanout.exs lives."
  @spec main([String.t()], Path.t()) :: :ok
  def main(argv, bench_dir) do
    opts = parse!(argv, bench_dir)

    # Bytes per subscription come from the NIF's allocation counter, which production
    # builds leave out (cargo feature alloc-stats).
    unless Map.has_key?(ExAtlas.Fly.Dispatcher.Backend.Registry.stats(), :allocated_bytes) do
      Mix.raise(
        "bench/fanout.exs measures the NIF's memory: run it with EX_ATLAS_ALLOC_STATS=1 " <>
          "(MIX_ENV=prod builds leave the allocation counter out otherwise)"
      )
    end

    Logger.configure(level: :warning)
    machine = Machine.info()
    print_header(opts, machine)

    counters = :atomics.new(4, signed: true)
    procs = max(Enum.max(opts.sizes), opts.topics * @per_topic)
    :ok = Contenders.start_peers()
    {pids, spawn_ns} = timed(fn -> Subscriber.spawn_many(procs, counters, self()) end)
    IO.puts("spawned #{procs} subscriber processes in #{Stats.duration(spawn_ns)}")

    size_topics = fn index -> for n <- opts.sizes, index < n, do: size_topic(n) end
    many_topic = fn index -> "many:#{div(index, @per_topic)}" end
    many_count = opts.topics * @per_topic

    # The VM's threads (schedulers, dirty schedulers, ...) all exist from boot.
    cpu = CpuTime.open()
    plain_lists = plain_lists(pids, opts)
    peer_memory = subscribe_peers(pids, size_topics, many_topic, many_count, plain_lists)

    ctx = %{
      counters: counters,
      messages: Map.new(Contenders.all(), &{&1, Contenders.message(&1, Contenders.entries())}),
      plain_lists: plain_lists,
      cpu: cpu,
      cpu_from: opts.cpu_from,
      cpu_overhead: if(cpu, do: CpuTime.overhead(cpu), else: %{})
    }

    many_topics = List.to_tuple(for t <- 0..(opts.topics - 1), do: "many:#{t}")

    passes =
      for lanes <- opts.lanes do
        IO.puts("\n== pass: lanes = #{lanes} ==")
        restart_with_lanes(lanes, opts.delivery)
        nif_memory = subscribe_nif(pids, size_topics, many_topic, many_count)
        check_counts!(opts)
        pass = run_pass(ctx, opts, lanes, many_topics, nif_memory, peer_memory)
        Report.print_pass(pass)
        pass
      end

    machine = machine ++ [load_average_at_end: Machine.load_average()]
    Report.finish(passes, opts, machine)
  end

  defp run_pass(ctx, opts, lanes, many_topics, nif_memory, peer_memory) do
    fanout = for n <- opts.sizes, row <- run_size(ctx, opts, n), do: row

    IO.puts("many topics: #{opts.topics} x #{@per_topic}")
    {warmup, reps} = opts.many_reps

    many = Rounds.many_topics(ctx, many_topics, @per_topic, warmup, reps)
    burst = Rounds.burst(ctx, many_topics, @per_topic, opts.burst_reps)

    IO.puts(
      "subscribe/unsubscribe churn: #{opts.churn_k} topics per process, " <>
        "#{opts.churn_cycles} cycles x #{opts.churn_reps} reps"
    )

    churn = Churn.run([1, 2], opts.churn_k, opts.churn_cycles, opts.churn_reps)

    %{
      lanes: lanes,
      fanout: fanout,
      many: many,
      burst: burst,
      topics: opts.topics,
      per_topic: @per_topic,
      churn: churn,
      memory: Map.merge(peer_memory, nif_memory)
    }
  end

  defp run_size(ctx, opts, n) do
    {warmup, reps} = opts.reps_for.(n)
    {rows, ns} = timed(fn -> Rounds.fanout(ctx, size_topic(n), n, warmup, reps) end)
    IO.puts("N = #{n}: #{warmup} warm-up + #{reps} reps x 4 contenders in #{Stats.duration(ns)}")
    rows
  end

  defp size_topic(n), do: "fanout:#{n}"

  defp plain_lists(pids, opts) do
    sizes = Map.new(opts.sizes, &{size_topic(&1), Enum.take(pids, &1)})

    many =
      pids
      |> Enum.take(opts.topics * @per_topic)
      |> Enum.chunk_every(@per_topic)
      |> Enum.with_index(fn chunk, t -> {"many:#{t}", chunk} end)
      |> Map.new()

    Map.merge(sizes, many)
  end

  # Registry and :pg: once for the whole run; their memory is measured around it. The
  # plain lists say which pids belong to which topic.
  defp subscribe_peers(pids, size_topics, many_topic, many_count, plain_lists) do
    {many_lists, size_lists} =
      Enum.split_with(plain_lists, fn {t, _} -> String.starts_with?(t, "many:") end)

    r0 = Contenders.registry_ets_bytes()
    p0 = Contenders.pg_ets_bytes()
    {_, ns} = timed(fn -> Subscriber.run_in_each(pids, &registry_join(size_topics.(&1))) end)
    Enum.each(size_lists, fn {topic, members} -> Contenders.join_pg(topic, members) end)
    r1 = Contenders.registry_ets_bytes()
    p1 = Contenders.pg_ets_bytes()

    many = fn index -> if index < many_count, do: registry_join([many_topic.(index)]) end
    Subscriber.run_in_each(pids, many)
    Enum.each(many_lists, fn {topic, members} -> Contenders.join_pg(topic, members) end)
    r2 = Contenders.registry_ets_bytes()
    p2 = Contenders.pg_ets_bytes()
    IO.puts("registered in the Registry in #{Stats.duration(ns)} (one topic per N)")

    %{
      registry: %{fanout: r1 - r0, many: r2 - r1},
      pg: %{fanout: p1 - p0, many: p2 - p1}
    }
  end

  defp registry_join([]), do: nil
  defp registry_join(topics), do: fn -> Contenders.join_registry(topics) end

  # The NIF registry is new after every restart: subscribe everyone again.
  defp subscribe_nif(pids, size_topics, many_topic, many_count) do
    n0 = settled_nif_bytes()
    {_, ns} = timed(fn -> Subscriber.run_in_each(pids, &nif_join(size_topics.(&1))) end)
    n1 = Contenders.nif_bytes()
    many = fn index -> if index < many_count, do: nif_join([many_topic.(index)]) end
    Subscriber.run_in_each(pids, many)
    n2 = Contenders.nif_bytes()
    IO.puts("subscribed in the NIF registry in #{Stats.duration(ns)} (one topic per N)")
    %{nif: %{fanout: n1 - n0, many: n2 - n1}}
  end

  # The previous pass's registry is freed only when no process holds its resource any
  # more (subscribers keep a reference as garbage until they collect): collect everywhere,
  # then wait until the NIF's heap stops shrinking, so the delta is this pass's alone.
  defp settled_nif_bytes do
    Enum.each(Process.list(), &:erlang.garbage_collect/1)
    settle_nif_bytes(Contenders.nif_bytes(), 40)
  end

  defp settle_nif_bytes(bytes, 0), do: bytes

  defp settle_nif_bytes(bytes, tries) do
    Process.sleep(50)

    case Contenders.nif_bytes() do
      ^bytes -> bytes
      now -> settle_nif_bytes(now, tries - 1)
    end
  end

  defp nif_join([]), do: nil
  defp nif_join(topics), do: fn -> Contenders.join_nif(topics) end

  defp check_counts!(opts) do
    for n <- opts.sizes do
      nif = ExAtlas.Fly.Dispatcher.count(size_topic(n))
      pg = length(:pg.get_local_members(FanoutBench.PG, size_topic(n)))
      registry = length(Registry.lookup(FanoutBench.Registry, size_topic(n)))

      if {nif, pg, registry} != {n, n, n} do
        raise "topic #{size_topic(n)}: expected #{n} subscribers everywhere, got " <>
                "NIF #{nif}, :pg #{pg}, Registry #{registry}"
      end
    end

    :ok
  end

  defp restart_with_lanes(lanes, delivery) do
    case Application.stop(:ex_atlas) do
      :ok -> :ok
      {:error, {:not_started, :ex_atlas}} -> :ok
    end

    fly = Application.get_env(:ex_atlas, :fly, [])
    fly = Keyword.put(fly, :lanes, lanes)
    fly = if delivery, do: Keyword.put(fly, :delivery, delivery), else: fly
    Application.put_env(:ex_atlas, :fly, fly)
    {:ok, _} = Application.ensure_all_started(:ex_atlas)
    %{lanes: ^lanes} = ExAtlas.Fly.Dispatcher.Backend.Registry.stats()
    :ok
  end

  defp timed(fun) do
    t0 = System.monotonic_time()
    result = fun.()
    {result, System.convert_time_unit(System.monotonic_time() - t0, :native, :nanosecond)}
  end

  defp print_header(opts, machine) do
    IO.puts("ExAtlas fan-out benchmark#{if opts.quick, do: " (--quick)", else: ""}")
    Enum.each(machine, fn {key, value} -> IO.puts("  #{key}: #{value}") end)

    IO.puts(
      "  sizes: #{Enum.join(opts.sizes, ", ")}; lanes passes: " <>
        "#{Enum.join(opts.lanes, ", ")}; delivery: " <>
        "#{opts.delivery || ExAtlas.Fly.Dispatcher.Config.delivery()}; output: #{opts.out}"
    )
  end

  ## Options

  defp parse!(argv, bench_dir) do
    {parsed, rest, invalid} = OptionParser.parse(argv, strict: @switches)

    if rest != [] or invalid != [] do
      Mix.raise(
        "unknown arguments #{inspect(rest ++ Enum.map(invalid, &elem(&1, 0)))}; usage: " <>
          "mix run bench/fanout.exs [--quick] [--sizes 1,10,100] [--reps N] " <>
          "[--lanes 1,2] [--delivery dirty|scheduler] [--topics T] [--out DIR] " <>
          "[--chart svg|png]"
      )
    end

    quick = Keyword.get(parsed, :quick, false)
    sizes = parsed |> Keyword.get(:sizes) |> int_list!(:sizes) || default_sizes(quick)
    lanes = parsed |> Keyword.get(:lanes) |> int_list!(:lanes) || default_lanes()
    reps = Keyword.get(parsed, :reps)
    if reps != nil and reps < 1, do: Mix.raise("expected --reps to be >= 1, got: #{reps}")
    topics = Keyword.get(parsed, :topics, if(quick, do: 100, else: 10_000))
    if topics < 1, do: Mix.raise("expected --topics to be >= 1, got: #{topics}")

    chart = Keyword.get(parsed, :chart, "svg")

    delivery =
      case Keyword.get(parsed, :delivery) do
        nil -> nil
        "dirty" -> :dirty
        "scheduler" -> :scheduler
        other -> Mix.raise("expected --delivery to be dirty or scheduler, got: #{inspect(other)}")
      end

    if chart not in ["svg", "png"],
      do: Mix.raise("expected --chart to be svg or png, got: #{inspect(chart)}")

    default_out =
      if quick,
        do: Path.join(System.tmp_dir!(), "ex_atlas_fanout_quick"),
        else: Path.join(bench_dir, "results")

    %{
      quick: quick,
      sizes: sizes,
      lanes: lanes,
      delivery: delivery,
      topics: topics,
      out: Path.expand(Keyword.get(parsed, :out, default_out)),
      chart: chart,
      reps_for: reps_for(quick, reps),
      # CPU time is sampled per round (two /proc snapshots outside the timed span, about
      # 0.1 ms) only where a round takes a millisecond or more.
      cpu_from: 1_000,
      many_reps: if(quick, do: {20, 200}, else: {200, 2_000}),
      burst_reps: if(quick, do: 3, else: 7),
      churn_k: 1_000,
      churn_cycles: if(quick, do: 2, else: 10),
      churn_reps: if(quick, do: 3, else: 9)
    }
  end

  defp default_sizes(true), do: @quick_sizes
  defp default_sizes(false), do: @full_sizes

  defp default_lanes, do: Enum.uniq([1, 2, :erlang.system_info(:schedulers_online)])

  # Warm-up and recorded repetitions for N subscribers: many for small N (cheap rounds,
  # noisy), fewer for large N where one round takes 100 ms or more.
  defp reps_for(quick, reps) do
    fn n ->
      reps =
        cond do
          reps != nil -> reps
          quick -> 20
          true -> min(200, max(25, div(600_000, n)))
        end

      {max(2, div(reps, 10)), reps}
    end
  end

  defp int_list!(nil, _name), do: nil

  defp int_list!(text, name) do
    values =
      text
      |> String.split(",", trim: true)
      |> Enum.map(fn item ->
        case Integer.parse(String.trim(item)) do
          {value, ""} when value > 0 -> value
          _ -> Mix.raise("expected --#{name} to be positive integers like 1,10,100, got: #{text}")
        end
      end)

    if values == [], do: Mix.raise("expected --#{name} to list at least one value, got: #{text}")
    Enum.uniq(values)
  end
end
