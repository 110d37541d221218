# Fan-out benchmark: the ExAtlas NIF dispatcher beside Registry.dispatch/3 (the original),
# :pg and a plain send/2 loop, in one VM, on the same subscribers; one pass per `lanes`
# value. What it measures, the columns and the targets: bench/README.md.
#
#     EX_ATLAS_ALLOC_STATS=1 MIX_ENV=prod mix run bench/fanout.exs          # bench/results/fanout.{md,svg}
#     EX_ATLAS_ALLOC_STATS=1 MIX_ENV=prod mix run bench/fanout.exs --quick  # seconds; temp dir (CI)
#
# Options: --sizes 1,10,100  --reps N  --lanes 1,2  --delivery dirty|scheduler  --topics T
#          --out DIR  --chart svg|png.  EX_ATLAS_ALLOC_STATS=1 builds the NIF's allocation
# counter (bytes per subscription). Emulator flags go through ERL_FLAGS.

Code.require_file("support/bench.ex", __DIR__)

defmodule FanoutBench do
  @moduledoc false
  alias ExAtlas.Fly.Dispatcher

  @contenders [:nif, :registry, :pg, :plain]
  @labels %{nif: "ExAtlas NIF", registry: "Registry.dispatch", pg: ":pg + send loop"}
  @labels Map.put(@labels, :plain, "plain send loop")
  @registry FanoutBench.Registry
  @scope FanoutBench.PG
  @per_topic 10
  @classes [:schedulers, :dirty_cpu, :dirty_io, :other]
  @phases [:subscribe, :unsubscribe, :pairs]

  def main(argv) do
    switches = [sizes: :ints, reps: :integer, lanes: :ints, delivery: :string, topics: :integer]

    o =
      Bench.options(argv, "fanout", switches ++ [chart: :string], fn quick ->
        %{
          sizes:
            if(quick,
              do: [1, 10, 16, 100, 1_000],
              else: [1, 10, 16, 100, 1_000, 10_000, 100_000]
            ),
          reps: nil,
          lanes: Enum.uniq([1, 2, System.schedulers_online()]),
          delivery: nil,
          topics: if(quick, do: 100, else: 10_000),
          chart: "svg",
          many_reps: if(quick, do: {20, 200}, else: {200, 2_000}),
          burst_reps: if(quick, do: 3, else: 7),
          churn: if(quick, do: {1_000, 2, 3}, else: {1_000, 10, 9})
        }
      end)

    o.chart in ["svg", "png"] || Mix.raise("expected --chart svg or png")
    o.delivery in [nil, "dirty", "scheduler"] || Mix.raise("expected --delivery dirty|scheduler")

    Map.has_key?(Dispatcher.Backend.Registry.stats(), :allocated_bytes) ||
      Mix.raise("bench/fanout.exs measures the NIF's memory: run it with EX_ATLAS_ALLOC_STATS=1")

    Logger.configure(level: :warning)
    machine = Bench.machine()
    command = Bench.command("fanout.exs")
    IO.puts(Bench.header("ExAtlas fan-out benchmark", command, machine))

    # Topic layout: "fanout:N" holds the first N processes, "many:T" 10 processes each.
    many_count = o.topics * @per_topic
    counters = :atomics.new(4, signed: true)
    {:ok, _} = Registry.start_link(keys: :duplicate, name: @registry)
    {:ok, _} = :pg.start_link(@scope)
    parent = self()

    pids =
      for _ <- 1..max(Enum.max(o.sizes), many_count),
          do: spawn(fn -> subscriber(counters, parent) end)

    many =
      for {chunk, t} <- Enum.with_index(Enum.chunk_every(Enum.take(pids, many_count), 10)),
          into: %{},
          do: {"many:#{t}", chunk}

    lists = Map.merge(many, Map.new(o.sizes, &{"fanout:#{&1}", Enum.take(pids, &1)}))
    size_topics = fn i -> for n <- o.sizes, i < n, do: "fanout:#{n}" end
    many_topic = fn i -> if i < many_count, do: ["many:#{div(i, @per_topic)}"], else: [] end

    join = fn topics_for, subscribe ->
      Bench.run_in_each(pids, fn i ->
        if (topics = topics_for.(i)) != [], do: fn -> Enum.each(topics, subscribe) end
      end)
    end

    # Registry and :pg once for the whole run; their memory is measured around it.
    register = &({:ok, _} = Registry.register(@registry, &1, nil))
    pg_join = fn prefix -> for {t, ps} <- lists, t =~ prefix, do: :pg.join(@scope, t, ps) end
    m0 = peer_bytes()
    join.(size_topics, register) && pg_join.(~r/^fanout:/)
    m1 = peer_bytes()
    join.(many_topic, register) && pg_join.(~r/^many:/)
    m2 = peer_bytes()
    cpu = cpu_open()

    messages =
      Map.new(@contenders, &{&1, {:ex_atlas_fly_logs, "app#{index(&1)}", Bench.entries()}})

    ctx = %{
      counters: counters,
      lists: lists,
      cpu: cpu,
      overhead: cpu_overhead(cpu),
      messages: messages
    }

    passes =
      for lanes <- o.lanes do
        IO.puts("== pass: lanes = #{lanes} ==")
        delivery = if o.delivery, do: [delivery: String.to_atom(o.delivery)], else: []
        :ok = Bench.restart([lanes: lanes] ++ delivery)
        n0 = settled_nif_bytes()
        join.(size_topics, &Dispatcher.subscribe/1)
        n1 = nif_bytes()
        join.(many_topic, &Dispatcher.subscribe/1)
        n2 = nif_bytes()

        for n <- o.sizes, t = "fanout:#{n}" do
          counts = [Dispatcher.count(t), length(:pg.get_local_members(@scope, t))]
          counts = counts ++ [length(Registry.lookup(@registry, t))]
          counts == [n, n, n] || raise "#{t}: NIF, :pg, Registry have #{inspect(counts)}"
        end

        memory = %{
          nif: {n1 - n0, n2 - n1},
          registry: {elem(m1, 0) - elem(m0, 0), elem(m2, 0) - elem(m1, 0)},
          pg: {elem(m1, 1) - elem(m0, 1), elem(m2, 1) - elem(m1, 1)}
        }

        p = run_pass(ctx, o, Map.keys(many) |> Enum.sort(), lanes, memory)
        p = Map.put(p, :subs, {Enum.sum(o.sizes), many_count})
        Map.merge(p, %{targets: targets(p), tables: pass_tables(p)})
      end

    machine = machine ++ [load_average_at_end: Bench.load_average()]
    chart = chart(passes, o, machine)

    Bench.write(o.out, "fanout.md", [
      Bench.header("ExAtlas fan-out benchmark", command, machine),
      "Sizes #{Enum.join(o.sizes, ", ")}; lanes #{Enum.join(o.lanes, ", ")}; delivery " <>
        "#{o.delivery || Dispatcher.Config.delivery()}. Method and columns: " <>
        "[bench/README.md](../README.md). The machine may be shared: the load averages " <>
        "above and the run-queue wait in the CPU tables show how much.\n",
      "![caller-blocked and end-to-end time against N](fanout.#{o.chart})\n\n_Chart: " <>
        "medians of the pass with lanes = #{primary(passes).lanes}; dashed: the NIF in the " <>
        "other passes#{chart}._\n",
      "## Targets\n",
      Enum.map(passes, & &1.targets),
      "## Lanes\n",
      lanes_table(passes)
      | Enum.map(
          passes,
          &["## Pass: lanes = #{&1.lanes}\n\n" | Enum.intersperse(&1.tables, "\n")]
        )
    ])
  end

  defp reps_for(n) when n <= 100, do: 2_000
  defp reps_for(n), do: min(200, max(25, div(600_000, n)))

  defp index(c), do: Enum.find_index(@contenders, &(&1 == c)) + 1

  # One subscriber serves every contender: the message's "appN" names the contender's
  # :atomics slot, set to -expected before each round; whoever brings it to 0 tells the
  # waiting process, so nobody spins. It traps exits: closing the registry between passes
  # sends every subscriber {:shutdown, :ex_atlas_dispatcher_closed}.
  defp subscriber(counters, waiter) do
    Process.flag(:trap_exit, true)
    loop(counters, waiter)
  end

  defp loop(counters, waiter) do
    receive do
      {:EXIT, _, {:shutdown, :ex_atlas_dispatcher_closed}} ->
        :ok

      {:ex_atlas_fly_logs, <<"app", d>>, _} ->
        if :atomics.add_get(counters, d - ?0, 1) == 0, do: send(waiter, {:done, d - ?0})

      {:run, from, ref, fun} ->
        Bench.ran(from, ref, fun)
    end

    loop(counters, waiter)
  end

  defp dispatch(:nif, topic, message, _), do: Dispatcher.dispatch(topic, message)

  defp dispatch(:registry, topic, message, _),
    do: Bench.registry_dispatch(@registry, topic, message)

  defp dispatch(:pg, topic, message, _),
    do: for(p <- :pg.get_local_members(@scope, topic), do: send(p, message))

  defp dispatch(:plain, topic, message, lists), do: send_all(Map.fetch!(lists, topic), message)

  defp send_all([pid | rest], message), do: send(pid, message) && send_all(rest, message)
  defp send_all([], _message), do: :ok

  ## Memory

  defp nif_bytes, do: Dispatcher.Backend.Registry.stats().allocated_bytes

  # {bytes of the Registry's ETS tables, bytes of the :pg scope's}
  defp peer_bytes do
    sup = Process.whereis(@registry)
    owners = [sup | for({_, pid, _, _} <- Supervisor.which_children(sup), do: pid)]

    bytes = fn owners ->
      Enum.sum(for t <- :ets.all(), :ets.info(t, :owner) in owners, do: :ets.info(t, :memory))
    end

    word = :erlang.system_info(:wordsize)
    {bytes.(owners) * word, bytes.([Process.whereis(@scope)]) * word}
  end

  # The previous pass's registry is freed only when no process holds its resource any
  # more (subscribers keep a reference as garbage until they collect): collect everywhere,
  # then wait until the NIF's heap stops shrinking, so the delta is this pass's alone.
  defp settled_nif_bytes do
    Enum.each(Process.list(), &:erlang.garbage_collect/1)

    Enum.reduce_while(1..40, nif_bytes(), fn _, bytes ->
      Process.sleep(50)
      if nif_bytes() == bytes, do: {:halt, bytes}, else: {:cont, nif_bytes()}
    end)
  end

  ## Rounds

  defp run_pass(ctx, o, many, lanes, memory) do
    fanout =
      for n <- o.sizes, t = ["fanout:#{n}"] do
        cpu? = ctx.cpu != nil and n >= 1_000
        # Small topics take microseconds a repetition: many more of them steady the
        # medians that issue 9 compares within 10%.
        reps = o.reps || if(o.quick, do: 20, else: reps_for(n))

        {_, ns} =
          Bench.timed(fn -> sample(ctx, max(2, div(reps, 10)), fn _ -> t end, n, cpu?) end)

        {samples, ns2} = Bench.timed(fn -> sample(ctx, reps, fn _ -> t end, n, cpu?) end)
        IO.puts("N = #{n}: #{reps} reps x 4 contenders in #{Bench.dur(ns + ns2)}")
        rows(samples, n, %{n: n, reps: reps})
      end

    {warmup, reps} = o.many_reps
    {topics, count} = {List.to_tuple(many), length(many)}
    pick = fn offset -> fn rep -> [elem(topics, rem(rep + offset, count))] end end
    _ = sample(ctx, warmup, pick.(0), @per_topic, false)

    one =
      rows(sample(ctx, reps, pick.(warmup), @per_topic, false), @per_topic, %{
        reps: reps,
        dispatches: 1
      })

    total = count * @per_topic
    burst = sample(ctx, o.burst_reps, fn _ -> many end, total, ctx.cpu != nil)
    burst = rows(burst, total, %{reps: o.burst_reps, dispatches: count, n: "burst"})
    {k, cycles, churn_reps} = o.churn

    IO.puts(
      "many topics done; churn: #{k} topics per process, #{cycles} cycles x #{churn_reps} reps"
    )

    churn = for w <- [1, 2], row <- churn(w, k, cycles, churn_reps), do: row

    %{
      lanes: lanes,
      fanout: List.flatten(fanout),
      one: one,
      burst: burst,
      churn: churn,
      memory: memory
    }
  end

  # {caller ns, end-to-end ns, CPU delta or nil} per contender per repetition. Contenders
  # run round-robin inside a repetition, starting one further along each time, so drift,
  # GC and the machine's other load hit them alike. CPU snapshots are outside the timing.
  defp sample(ctx, reps, topics_for, expected, cpu?) do
    for rep <- 0..(reps - 1)//1, c <- rotate(rep), reduce: %{} do
      acc ->
        {i, message, topics} = {index(c), ctx.messages[c], topics_for.(rep)}
        :atomics.put(ctx.counters, i, -expected)
        cpu0 = if cpu?, do: cpu_snapshot(ctx.cpu)
        if cpu?, do: Bench.schedstat_settle()
        t0 = System.monotonic_time(:nanosecond)
        Enum.each(topics, &dispatch(c, &1, message, ctx.lists))
        t1 = System.monotonic_time(:nanosecond)

        receive do
          {:done, ^i} -> :ok
        after
          120_000 -> raise "#{@labels[c]}: #{-:atomics.get(ctx.counters, i)} deliveries missing"
        end

        t2 = System.monotonic_time(:nanosecond)
        cpu = if cpu?, do: cpu_delta(cpu0, cpu_snapshot(ctx.cpu), ctx.overhead)
        Map.update(acc, c, [{t1 - t0, t2 - t0, cpu}], &[{t1 - t0, t2 - t0, cpu} | &1])
    end
  end

  defp rotate(rep), do: Enum.drop(@contenders, rem(rep, 4)) ++ Enum.take(@contenders, rem(rep, 4))

  defp rows(samples, deliveries, extra) do
    for c <- @contenders, list = samples[c], e2e = Bench.summary(for {_, e, _} <- list, do: e) do
      cpus = for {_, _, cpu} <- list, cpu, do: cpu
      per = fn f -> Bench.median(for cpu <- cpus, do: f.(cpu) / deliveries) end

      cpu =
        if cpus != [] do
          classes = Map.new(@classes, fn class -> {class, per.(& &1[class])} end)
          total = per.(fn cpu -> Enum.sum(for class <- @classes, do: cpu[class]) end)
          Map.merge(classes, %{total: total, wait: Bench.median(for cpu <- cpus, do: cpu.wait)})
        end

      caller = Bench.summary(for {ns, _, _} <- list, do: ns)

      Map.merge(extra, %{
        contender: c,
        caller: caller,
        e2e: e2e,
        rate: deliveries / (e2e.median / 1.0e9),
        cpu: cpu
      })
    end
  end

  ## CPU time of the VM's threads by class, from Linux's /proc/self/task/*/schedstat (ns on
  ## CPU, ns waiting in the OS run queue): it moves much less than wall time with the
  ## machine's other load, and the split shows where work runs. The files stay open (raw,
  ## pread at 0), so a snapshot costs about 50 us; what is left (the median of 25
  ## back-to-back pairs) is subtracted.

  defp cpu_open do
    case Bench.schedstat_open() do
      [] ->
        nil

      threads ->
        for {comm, fd} <- threads do
          class =
            Enum.find(
              @classes,
              :other,
              &(comm =~ ~r/^\d+_#{&1 |> to_string() |> String.trim_trailing("s")}/)
            )

          {class, fd}
        end
    end
  end

  defp cpu_snapshot(handle) do
    for {class, fd} <- handle, {run, wait} <- [Bench.schedstat(fd)], reduce: %{} do
      acc -> Map.update(acc, class, {run, wait}, fn {r, w} -> {r + run, w + wait} end)
    end
  end

  defp cpu_delta(a, b, overhead) do
    for class <- @classes,
        {r0, w0} = a[class] || {0, 0},
        {r1, w1} = b[class] || {0, 0},
        reduce: %{wait: 0} do
      acc ->
        acc
        |> Map.put(class, r1 - r0 - Map.get(overhead, class, 0))
        |> Map.update!(:wait, &(&1 + w1 - w0))
    end
  end

  defp cpu_overhead(nil), do: %{}

  defp cpu_overhead(handle) do
    deltas = for _ <- 1..25, do: cpu_delta(cpu_snapshot(handle), cpu_snapshot(handle), %{})
    Map.new(@classes, fn class -> {class, Bench.median(for d <- deltas, do: d[class])} end)
  end

  ## Subscribe/unsubscribe churn, NIF vs Registry: each of `workers` processes owns `k`
  ## topics and times `cycles` runs of each phase: subscribe all k, unsubscribe all k,
  ## then subscribe + unsubscribe one topic at a time (pairs: a monitor set up and released
  ## each time). Rates are summed over the workers; contenders alternate; the first of
  ## `reps + 1` repetitions is a warm-up.

  defp churn(workers, k, cycles, reps) do
    parent = self()

    pids =
      for w <- 1..workers,
          do: spawn_link(fn -> churner(parent, for(i <- 1..k, do: "churn:#{w}:#{i}")) end)

    runs =
      for rep <- 0..reps,
          c <- if(rem(rep, 2) == 0, do: [:nif, :registry], else: [:registry, :nif]) do
        Enum.each(pids, &send(&1, {:churn, c, cycles}))

        rates =
          for _ <- pids,
              do:
                receive(
                  do: ({:churned, times} -> times),
                  after: (120_000 -> raise "churn timed out")
                )

        {rep, c,
         Map.new(@phases, fn p ->
           {p, Enum.sum(for t <- rates, do: k * cycles / (t[p] / 1.0e9))}
         end)}
      end

    Enum.each(pids, &send(&1, :stop))

    for c <- [:nif, :registry] do
      mine = for {rep, ^c, rates} <- runs, rep > 0, do: rates
      phases = Map.new(@phases, fn p -> {p, Bench.median(for r <- mine, do: r[p])} end)
      Map.merge(phases, %{contender: c, workers: workers, k: k, cycles: cycles, reps: reps})
    end
  end

  defp churner(parent, topics) do
    receive do
      {:churn, c, cycles} ->
        {sub, unsub} =
          if c == :nif,
            do: {&Dispatcher.subscribe/1, &Dispatcher.unsubscribe/1},
            else: {&Registry.register(@registry, &1, nil), &Registry.unregister(@registry, &1)}

        phases = %{
          subscribe: fn -> Enum.each(topics, sub) end,
          unsubscribe: fn -> Enum.each(topics, unsub) end,
          pairs: fn -> Enum.each(topics, &(sub.(&1) && unsub.(&1))) end
        }

        times =
          for _ <- 1..cycles, p <- @phases, {_, ns} = Bench.timed(phases[p]), reduce: %{} do
            acc -> Map.update(acc, p, ns, &(&1 + ns))
          end

        send(parent, {:churned, times})
        churner(parent, topics)

      :stop ->
        :ok
    end
  end

  ## Report

  defp find(rows, n, c), do: Enum.find(rows, &(&1[:n] == n and &1.contender == c))
  defp vs(rows, r, c, key \\ & &1.rate), do: Bench.ratio(key.(r), key.(find(rows, r[:n], c)))

  defp times(r),
    do:
      Enum.map([r.caller.median, r.caller.p99, r.e2e.median, r.e2e.p99], &Bench.dur/1) ++
        [Bench.rate(r.rate)]

  @timing "caller median|caller p99|e2e median|e2e p99|deliveries/s"

  defp pass_tables(p) do
    l = "(lanes = #{p.lanes})"
    {sizes, many_subs} = p.subs
    stores = [nif: "ExAtlas NIF (Rust heap)", registry: "Registry (ETS)", pg: ":pg (ETS)"]
    label = %{nif: "ExAtlas NIF subscribe/1", registry: "Registry.register/3"}

    [
      Bench.table(
        "Fan-out to N subscribers of one topic #{l}",
        "N|contender|reps|#{@timing}|vs plain loop",
        for(
          r <- p.fanout,
          do: [r.n, @labels[r.contender], r.reps | times(r)] ++ [vs(p.fanout, r, :plain)]
        ),
        left: 2
      ),
      Bench.table(
        "CPU time per delivery, by VM thread class #{l}",
        "N|contender|CPU/delivery|normal schedulers|dirty CPU|dirty I/O|other threads|vs plain loop|run-queue wait/round",
        for rows <- [p.fanout, p.burst], r <- rows, r.cpu do
          [r.n, @labels[r.contender] | Enum.map([:total | @classes], &Bench.dur(r.cpu[&1]))] ++
            [vs(rows, r, :plain, & &1.cpu.total), Bench.dur(r.cpu.wait)]
        end,
        left: 2,
        note: "burst: one dispatch to each of the many topics, back to back"
      ),
      Bench.table(
        "Many topics: #{div(many_subs, @per_topic)} topics x #{@per_topic} subscribers #{l}",
        "dispatches|contender|reps|#{@timing}|caller per dispatch|vs plain loop",
        for {name, rows} <- [{"one at a time", p.one}, {"burst", p.burst}], r <- rows do
          [name, @labels[r.contender], r.reps | times(r)] ++
            [Bench.dur(r.caller.median / r.dispatches), vs(rows, r, :plain)]
        end,
        left: 2
      ),
      Bench.table(
        "Subscribe / unsubscribe throughput #{l}",
        "contender|processes|topics each|subscribe/s|unsubscribe/s|sub+unsub pairs/s|" <>
          "subscribe vs Registry|unsubscribe vs Registry|pairs vs Registry",
        for r <- p.churn,
            reg = Enum.find(p.churn, &(&1.workers == r.workers and &1.contender == :registry)) do
          [label[r.contender], r.workers, r.k | Enum.map(@phases, &Bench.rate(r[&1]))] ++
            Enum.map(@phases, &Bench.ratio(r[&1], reg[&1]))
        end,
        note: "medians over #{hd(p.churn).reps} reps of #{hd(p.churn).cycles} cycles"
      ),
      Bench.table(
        "Memory per subscription #{l}",
        "layout|store|subscriptions|bytes|bytes/subscription|vs Registry",
        for {i, subs, name} <- [{0, sizes, "one topic per N"}, {1, many_subs, "many topics"}],
            {who, store} <- stores,
            bytes = elem(p.memory[who], i) do
          [name, store, subs, Bench.bytes(bytes), Bench.sig(bytes / subs)] ++
            [Bench.ratio(bytes, elem(p.memory.registry, i))]
        end,
        left: 2
      )
    ]
  end

  # A target whose sizes were not run (--quick has no 10k or 100k) is n/a.
  defp targets(p) do
    ns = Enum.map(p.fanout, & &1.n)
    at = fn n, c -> find(p.fanout, n, c) end
    sub = fn c, w -> Enum.find(p.churn, &(&1.contender == c and &1.workers == w)).subscribe end
    per = fn who, i -> elem(p.memory[who], i) / elem(p.subs, i) end
    caller = fn n, c -> at.(n, c).caller.median end
    rate = fn n, c -> at.(n, :nif).rate / at.(n, c).rate end

    rows =
      for {text, needs, cmp, required, ratio} <- [
            {"caller-blocked at 100k <= 1/500 of Registry.dispatch", [100_000], :ge, 500,
             fn -> caller.(100_000, :registry) / caller.(100_000, :nif) end},
            {"caller-blocked at 100k <= 5x ours at 10", [10, 100_000], :le, 5,
             fn -> caller.(100_000, :nif) / caller.(10, :nif) end},
            {"e2e deliveries/s at 10k >= 1.3x plain send loop", [10_000], :ge, 1.3,
             fn -> rate.(10_000, :plain) end},
            {"e2e deliveries/s at 100k >= 1.0x plain send loop", [100_000], :ge, 1.0,
             fn -> rate.(100_000, :plain) end},
            {"e2e deliveries/s at 10k >= 1.2x Registry.dispatch", [10_000], :ge, 1.2,
             fn -> rate.(10_000, :registry) end},
            {"e2e deliveries/s at 100k >= 1.2x Registry.dispatch", [100_000], :ge, 1.2,
             fn -> rate.(100_000, :registry) end},
            {"subscribe/s >= 1.0x Registry.register/3 (1 process)", [], :ge, 1.0,
             fn -> sub.(:nif, 1) / sub.(:registry, 1) end},
            {"subscribe/s >= 1.0x Registry.register/3 (2 processes)", [], :ge, 1.0,
             fn -> sub.(:nif, 2) / sub.(:registry, 2) end},
            {"bytes/subscription <= 0.5x Registry's (one topic per N)", [], :le, 0.5,
             fn -> per.(:nif, 0) / per.(:registry, 0) end},
            {"bytes/subscription <= 0.5x Registry's (many topics)", [], :le, 0.5,
             fn -> per.(:nif, 1) / per.(:registry, 1) end}
          ] do
        ratio = if Enum.all?(needs, &(&1 in ns)), do: ratio.()
        pass? = ratio && if(cmp == :ge, do: ratio >= required, else: ratio <= required)
        {text, if(ratio, do: Bench.sig(ratio) <> "x", else: "(size not run)"), pass?}
      end

    Bench.targets("Targets (lanes = #{p.lanes})", rows, note: "ratios of medians from this pass")
  end

  defp lanes_table(passes) do
    Bench.table(
      "ExAtlas NIF by lanes (each pass against its own contenders)",
      "N|lanes|#{@timing}|vs plain loop|vs Registry|CPU/delivery",
      for n <- Enum.uniq(for r <- hd(passes).fanout, do: r.n) ++ ["burst"],
          p <- passes,
          rows = if(n == "burst", do: p.burst, else: p.fanout),
          r = find(rows, n, :nif) do
        [n, p.lanes | times(r)] ++
          [
            vs(rows, r, :plain),
            vs(rows, r, :registry),
            if(r.cpu, do: Bench.dur(r.cpu.total), else: "-")
          ]
      end,
      left: 0
    )
  end

  ## Chart: caller-blocked and end-to-end medians against N, log-log, drawn by gnuplot.

  # The pass with the default lane count (schedulers online), else the last one.
  defp primary(passes),
    do: Enum.find(passes, List.last(passes), &(&1.lanes == System.schedulers_online()))

  defp chart(passes, o, machine) do
    {main, others} = {primary(passes), passes -- [primary(passes)]}
    image = Path.join(o.out, "fanout." <> o.chart)
    {data, script} = {image <> ".dat", image <> ".gp"}
    sizes = Enum.uniq(for r <- main.fanout, do: r.n)
    File.mkdir_p!(o.out)

    File.write!(
      data,
      for n <- sizes do
        cols =
          for part <- [:caller, :e2e], c <- @contenders, do: find(main.fanout, n, c)[part].median

        cols = cols ++ for(p <- others, do: find(p.fanout, n, :nif).e2e.median)

        Enum.map_join([n * 1000 | cols], " ", &:erlang.float_to_binary(&1 / 1_000, decimals: 3)) <>
          "\n"
      end
    )

    styles = [
      "lw 2 pt 7 lc rgb '#d62728'",
      "pt 5 lc rgb '#1f77b4'",
      "pt 9 lc rgb '#2ca02c'",
      "pt 13 lc rgb '#7f7f7f'"
    ]

    plot = fn col, style, title ->
      "'#{data}' using 1:#{col} with linespoints #{style} title '#{title}'"
    end

    lines = fn first ->
      for {c, i} <- Enum.with_index(@contenders),
          do: plot.(first + i, Enum.at(styles, i), @labels[c])
    end

    dashed =
      for {p, j} <- Enum.with_index(others),
          do: plot.(10 + j, "dt 2 pt 6 lc rgb '#ff7f0e'", "ExAtlas NIF, lanes=#{p.lanes}")

    terminal =
      if o.chart == "svg",
        do: "svg size 1200,520 dynamic noenhanced font 'sans,11' background rgb 'white'",
        else: "pngcairo size 1200,520 noenhanced font 'sans,10' background rgb 'white'"

    File.write!(script, """
    set terminal #{terminal}
    set output '#{image}'
    set multiplot layout 1,2 title "ExAtlas fan-out of a 20-map message, medians; #{machine[:date]}, #{machine[:machine]}; lanes=#{main.lanes}"
    set logscale xy
    set grid
    set key top left
    set xtics (#{Enum.map_join(sizes, ", ", &~s("#{&1}" #{&1}))})
    set xlabel 'subscribers of the topic (N)'
    set ylabel 'caller blocked per dispatch (us)'
    plot #{Enum.join(lines.(2), ", ")}
    set ylabel 'end to end until all N received it (us)'
    plot #{Enum.join(lines.(6) ++ dashed, ", ")}
    unset multiplot
    """)

    result =
      case System.find_executable("gnuplot") do
        nil -> {"gnuplot not found (Debian package gnuplot)", 1}
        gnuplot -> System.cmd(gnuplot, [script], stderr_to_stdout: true)
      end

    Enum.each([data, script], &File.rm/1)

    case result do
      {_, 0} ->
        IO.puts("wrote #{image}") && ""

      {output, _} ->
        IO.puts("chart skipped: #{output}") && " (chart not drawn: #{String.trim(output)})"
    end
  end
end

FanoutBench.main(System.argv())
