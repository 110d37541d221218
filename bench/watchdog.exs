# Watchdog benchmark: what watching idle subscribers with subscribe_with_backpressure/2
# costs the schedulers at the default poll_ms, and the design comparison that chose one
# poller; a subscriber that stalls in a flood with on_slow: :skip beside :evict; and the
# dispatch cost while nobody is skipped. Method and targets: bench/README.md.
#
#     MIX_ENV=prod mix run bench/watchdog.exs [--quick] [--subscribers N] [--seconds S]
#                                             [--rounds R] [--designs | --no-designs] [--out DIR]
#                                             [--part all | idle | slow | cost]
#                                             [--skipping-elsewhere] (with --part cost)
#
# `--part cost` uses only API that predates on_slow, so the same file can be run from a
# checkout of an older commit (`mix run /path/to/this/bench/watchdog.exs --part cost`)
# to compare dispatch costs.

Code.require_file("support/bench.ex", __DIR__)

defmodule WatchdogBench do
  @moduledoc false
  alias ExAtlas.Fly.Dispatcher
  alias ExAtlas.Fly.Dispatcher.Watchdog

  @topic "bench:watchdog"
  @target 2.0

  def main(argv) do
    switches = [
      subscribers: :integer,
      seconds: :float,
      rounds: :integer,
      designs: :boolean,
      part: :string,
      skipping_elsewhere: :boolean
    ]

    o =
      Bench.options(argv, "watchdog", switches, fn quick ->
        if quick,
          do: %{
            subscribers: 1_000,
            seconds: 1.5,
            rounds: 1,
            designs: false,
            part: "all",
            skipping_elsewhere: false
          },
          else: %{
            subscribers: 10_000,
            seconds: 10.0,
            rounds: 3,
            designs: true,
            part: "all",
            skipping_elsewhere: false
          }
      end)

    case o.part do
      "all" ->
        idle(o)
        SlowBench.slow(o)

      "idle" ->
        idle(o)

      "slow" ->
        SlowBench.slow(o)

      "cost" ->
        SlowBench.cost(o)

      other ->
        Mix.raise("expected --part to be all, idle, slow or cost, got: #{other}")
    end
  end

  defp idle(o) do
    :erlang.system_flag(:scheduler_wall_time, true)
    machine = Bench.machine()
    command = Bench.command("watchdog.exs")
    header = Bench.header("Watchdog cost: #{o.subscribers} watched subscribers", command, machine)
    IO.puts(header)
    subs = for _ <- 1..o.subscribers, do: spawn(&subscriber/0)
    {_, plain_ns} = Bench.timed(fn -> each(subs, &plain/0) end)

    {rounds, watch_ns} =
      Enum.map_reduce(1..o.rounds, nil, fn i, _ ->
        settle(500)
        baseline = window(o.seconds)
        {_, ns} = Bench.timed(fn -> each(subs, &watched/0) end)
        true = Watchdog.stats().watches >= o.subscribers
        # Let the first poll of the new watches pass before measuring the steady state.
        settle(1_200)
        polls = polls(hd(subs))
        watched = window(o.seconds)
        watched = Map.put(watched, :polls, polls(hd(subs)) - polls)
        each(subs, &plain/0)

        IO.puts(
          "round #{i}: baseline #{Bench.pct(baseline.normal)}, watched #{Bench.pct(watched.normal)}"
        )

        {{i, baseline, watched}, ns}
      end)

    designs = if o.designs, do: designs(subs, o.seconds), else: []
    # Every watch ends with its subscriber.
    each(subs, &watched/0)
    Enum.each(subs, &send(&1, :stop))
    left = wait_empty(System.monotonic_time(:millisecond) + 5_000)

    med = fn key, f ->
      Bench.median(for {_, b, w} <- rounds, do: f.(if key == :b, do: b, else: w))
    end

    cost = med.(:w, & &1.normal) - med.(:b, & &1.normal)
    cpu_cost = med.(:w, & &1.cpu) - med.(:b, & &1.cpu)
    ms = &"#{Bench.sig(&1 / 1.0e6)} ms"

    tables = [
      Bench.targets("Result (medians of #{o.rounds} rounds of #{o.seconds} s)", [
        {"watchdog cost < #{@target}% of one scheduler (watched #{Bench.pct(med.(:w, & &1.normal))} " <>
           "- baseline #{Bench.pct(med.(:b, & &1.normal))})", Bench.pct(cost), cost < @target},
        {"the same in VM CPU time (:erlang.statistics(:runtime)), % of one core",
         Bench.pct(cpu_cost), nil}
      ]),
      Bench.table(
        "Rounds",
        "round|subscriptions|normal schedulers, % of one|dirty CPU, % of one|" <>
          "VM CPU time, % of one core|watchdog reductions/s|polls in window",
        for {i, b, w} <- rounds,
            {name, x} <- [
              {"plain subscribe/1 (baseline)", b},
              {"subscribe_with_backpressure/2", w}
            ] do
          [i, name, Bench.pct(x.normal), Bench.pct(x.dirty), Bench.pct(x.cpu)] ++
            [round(x.reductions), Map.get(x, :polls, "")]
        end,
        left: 2,
        note:
          "subscribing all #{o.subscribers} at once (concurrently, each with an unsubscribe/1): " <>
            "plain #{ms.(plain_ns)}, with backpressure #{ms.(watch_ns)}; after the subscribers " <>
            "exited the watchdog held #{left.watches} watches, #{left.subscribers} monitors and " <>
            "#{left.timers} timers"
      )
    ]

    designs =
      if designs != [] do
        Bench.table(
          "Design comparison (what chose one poller)",
          "design|normal schedulers, % of one|VM CPU time, % of one core|process memory",
          designs,
          note:
            "throwaway pollers doing only the poll every 1 000 ms; memory: growth of " <>
              ":erlang.memory(:processes)"
        )
      end

    Bench.write(o.out, "watchdog.md", [header | tables] ++ List.wrap(designs))
  end

  defp subscriber do
    receive do
      {:run, from, ref, fun} -> Bench.ran(from, ref, fun) && subscriber()
      :stop -> :ok
    end
  end

  defp each(subs, fun), do: Bench.run_in_each(subs, fn _ -> fun end)

  defp plain do
    :ok = Dispatcher.unsubscribe(@topic)
    Dispatcher.subscribe(@topic)
  end

  defp watched do
    :ok = Dispatcher.unsubscribe(@topic)
    Dispatcher.subscribe_with_backpressure(@topic)
  end

  defp polls(pid), do: Watchdog.watch_info(pid, @topic).polls

  defp settle(ms) do
    :erlang.garbage_collect()
    Process.sleep(ms)
  end

  defp wait_empty(deadline) do
    stats = Watchdog.stats()

    if stats.watches == 0 or System.monotonic_time(:millisecond) > deadline,
      do: stats,
      else: Process.sleep(20) && wait_empty(deadline)
  end

  # Busy time of the normal and dirty CPU schedulers over `seconds`, in % of one scheduler,
  # the VM's CPU time in % of one core, and the watchdog's reductions per second.
  defp window(seconds) do
    dog = Process.whereis(Watchdog)
    {:reductions, r0} = Process.info(dog, :reductions)
    {cpu0, _} = :erlang.statistics(:runtime)
    t0 = System.monotonic_time(:microsecond)
    s0 = :erlang.statistics(:scheduler_wall_time)
    Process.sleep(round(seconds * 1_000))
    s1 = :erlang.statistics(:scheduler_wall_time)
    t1 = System.monotonic_time(:microsecond)
    {cpu1, _} = :erlang.statistics(:runtime)
    {:reductions, r1} = Process.info(dog, :reductions)
    before = Map.new(s0, fn {id, active, total} -> {id, {active, total}} end)
    deltas = for {id, a, t} <- s1, {a0, w0} <- [before[id]], do: {id, a - a0, t - w0}
    wall = deltas |> Enum.map(&elem(&1, 2)) |> Enum.max()
    normal = :erlang.system_info(:schedulers)
    dirty = normal + :erlang.system_info(:dirty_cpu_schedulers)
    busy = fn ids -> Enum.sum(for {id, a, _} <- deltas, id in ids, do: a) / wall * 100 end

    %{
      normal: busy.(1..normal),
      dirty: busy.((normal + 1)..dirty),
      cpu: (cpu1 - cpu0) * 1_000 / (t1 - t0) * 100,
      reductions: (r1 - r0) / seconds
    }
  end

  ## Design comparison: throwaway pollers doing only the poll

  defp designs(subs, seconds) do
    designs = [
      {"none (baseline)", fn -> [] end},
      {"one poller, all subscribers in a map, one timer", fn -> [one_poller(subs)] end},
      {"one process per subscriber, receive ... after", fn -> per_process(subs, :after) end},
      {"one process per subscriber, send_after timer", fn -> per_process(subs, :timer) end}
    ]

    for {name, start} <- designs do
      settle(500)
      mem0 = :erlang.memory(:processes)
      pollers = start.()
      settle(1_200)
      mem = :erlang.memory(:processes) - mem0
      w = window(seconds)
      Enum.each(pollers, &send(&1, :stop))
      Process.sleep(200)
      [name, Bench.pct(w.normal), Bench.pct(w.cpu), Bench.bytes(max(mem, 0))]
    end
  end

  defp one_poller(subs) do
    spawn(fn ->
      watches = Map.new(subs, &{&1, %{threshold: 10_000, above_since: nil}})
      Process.send_after(self(), :poll, 1_000)
      one_poller_loop(watches)
    end)
  end

  defp one_poller_loop(watches) do
    receive do
      :poll ->
        for {pid, w} <- watches,
            match?(
              {:message_queue_len, n} when n > w.threshold,
              Process.info(pid, :message_queue_len)
            ),
            do: :slow

        Process.send_after(self(), :poll, 1_000)
        one_poller_loop(watches)

      :stop ->
        :ok
    end
  end

  defp per_process(subs, how) do
    for pid <- subs do
      spawn(fn ->
        ref = Process.monitor(pid)
        # Spread the first polls over the interval, as independent subscriptions would be.
        if how == :timer, do: Process.send_after(self(), :poll, :rand.uniform(1_000))
        per_process_loop(pid, ref, if(how == :after, do: 1_000, else: :infinity))
      end)
    end
  end

  defp per_process_loop(pid, ref, timeout) do
    receive do
      :poll ->
        _ = Process.info(pid, :message_queue_len)
        Process.send_after(self(), :poll, 1_000)
        per_process_loop(pid, ref, timeout)

      {:DOWN, ^ref, _, _, _} ->
        :ok

      :stop ->
        :ok
    after
      timeout ->
        _ = Process.info(pid, :message_queue_len)
        per_process_loop(pid, ref, timeout)
    end
  end
end

defmodule SlowBench do
  @moduledoc false
  # A subscriber that stalls (suspended) for 2 s in a flood, then recovers, with each
  # on_slow policy; and the dispatch cost at 10 and 10 000 subscribers, nobody skipped.
  alias ExAtlas.Fly.Dispatcher

  @rate 100_000
  @flood_ms 3_000
  @stall_at_ms 500
  @threshold 2_000
  @stall_ms 2_000
  @policies [:skip, :evict, :none, :catch_up, :catch_up_max]
  # catch_up/2's :max in the :catch_up_max rounds.
  @catch_up_max 1_000
  @replay 1_000_000
  @replay_memory 256 * 1024 * 1024

  def slow(o) do
    machine = Bench.machine()

    header =
      Bench.header("A stalled subscriber in a flood", Bench.command("watchdog.exs"), machine)

    IO.puts(header)
    rounds = if o.quick, do: 1, else: 3

    runs =
      for round <- 1..rounds, policy <- @policies do
        r = with_replay(policy, fn -> stall(policy) end)
        IO.puts("round #{round} #{policy}: #{inspect(r)}")
        {policy, r}
      end

    rows =
      for policy <- @policies do
        rs = for {^policy, r} <- runs, do: r
        med = fn key -> Bench.median(for r <- rs, do: Map.fetch!(r, key)) end
        keys = Map.keys(hd(rs)) -- [:evicted]
        r = Map.new(keys, &{&1, med.(&1)})
        r = Map.put(r, :evicted, Enum.all?(rs, & &1.evicted))

        [
          policy_name(policy),
          Bench.dur(r.producer_ns),
          Bench.dur(r.producer_ns / r.dispatched),
          Bench.bytes(r.rss_peak),
          round(r.mailbox_peak),
          round(r.dispatched),
          round(r.received),
          round(r.missed),
          r.evicted
        ]
      end

    table =
      Bench.table(
        "A subscriber stalled #{@stall_ms} ms in a #{@flood_ms} ms flood (medians of #{rounds} rounds)",
        "policy|producer time in dispatch|per dispatch|VmRSS peak over start|" <>
          "stalled mailbox peak|dispatched|received by it|missed (gap notices)|evicted",
        rows,
        left: 1,
        note:
          "one producer dispatching 256-byte binaries at up to #{@rate} a second for " <>
            "#{@flood_ms} ms to a topic with one fast and one stalled subscriber (threshold " <>
            "#{@threshold}, poll_ms 50; suspended with :erlang.suspend_process/1 at " <>
            "#{@stall_at_ms} ms, resumed #{@stall_ms} ms later); producer time is the time " <>
            "spent in dispatch/2 and sync/0; VmRSS and the mailbox sampled every 10 ms. " <>
            ":catch_up runs with `replay: #{@replay}, replay_memory: #{@replay_memory}` (its " <>
            "history is part of its VmRSS, and its producer time includes keeping every " <>
            "dispatch), the others with replay off; its received include what catch_up/1 " <>
            "brought, its missed what the history no longer held for it"
      )

    Bench.write(o.out, "watchdog_slow.md", [header, table])
  end

  # :catch_up needs a history: the registry is restarted with one for its rounds only.
  defp with_replay(policy, fun) when policy in [:catch_up, :catch_up_max] do
    restart(replay: @replay, replay_memory: @replay_memory)

    try do
      fun.()
    after
      restart(replay: 0)
    end
  end

  defp with_replay(_policy, fun), do: fun.()

  defp restart(settings) do
    :ok = Application.stop(:ex_atlas)
    fly = Keyword.merge(Application.get_env(:ex_atlas, :fly, []), settings)
    :ok = Application.put_env(:ex_atlas, :fly, fly)
    {:ok, _} = Application.ensure_all_started(:ex_atlas)
  end

  defp policy_name(:none), do: "plain subscribe/1 (no watch)"
  defp policy_name(:catch_up_max), do: "on_slow: :catch_up, catch_up(t, max: #{@catch_up_max})"
  defp policy_name(policy), do: "on_slow: #{inspect(policy)}"

  defp stall(policy) do
    topic = "bench:stall:#{policy}:#{System.unique_integer([:positive])}"
    parent = self()
    fast = spawn(fn -> sink(topic, parent, &Dispatcher.subscribe/1, :infinity) end)
    on_slow = if policy == :catch_up_max, do: :catch_up, else: policy
    opts = [on_slow: on_slow, threshold: @threshold, poll_ms: 50]
    max = if policy == :catch_up_max, do: @catch_up_max, else: :infinity

    subscribe =
      if policy == :none,
        do: &Dispatcher.subscribe/1,
        else: &Dispatcher.subscribe_with_backpressure(&1, opts)

    slow = spawn(fn -> sink(topic, parent, subscribe, max) end)
    for pid <- [fast, slow], do: receive(do: ({:ready, ^pid} -> :ok))
    :erlang.garbage_collect()
    rss0 = rss()
    {sampler, peak} = sample(slow)
    payload = :binary.copy("x", 256)

    start = System.monotonic_time(:millisecond)
    # Only the process that suspended it may resume it: a helper does both.
    spawn(fn ->
      Process.sleep(@stall_at_ms)
      suspend_for(slow)
    end)

    {dispatched, ns} = flood(topic, payload, start, 0, 0)
    # Once the stall is over, one more message brings the notice, then the counts.
    Process.sleep(
      max(0, start + @stall_at_ms + @stall_ms + 500 - System.monotonic_time(:millisecond))
    )

    :ok = Dispatcher.dispatch(topic, {:line, dispatched + 1, payload})
    :ok = Dispatcher.sync()

    for pid <- [fast, slow], do: send(pid, {:report, self()})
    {received, missed, evicted} = receive(do: ({:counts, ^slow, r, m, e} -> {r, m, e}))
    receive(do: ({:counts, ^fast, _, _, _} -> :ok))
    send(sampler, {:stop, self()})
    {rss_peak, mailbox_peak} = receive(do: ({^peak, r, m} -> {r, m}))
    Dispatcher.unsubscribe(topic)
    for pid <- [fast, slow], do: Process.exit(pid, :kill)

    %{
      dispatched: dispatched + 1,
      producer_ns: ns,
      rss_peak: rss_peak - rss0,
      mailbox_peak: mailbox_peak,
      received: received,
      missed: missed,
      evicted: evicted
    }
  end

  # Dispatches in steps of 100 at up to @rate a second until @flood_ms have passed;
  # returns how many and the time spent dispatching (sleeps excluded).
  defp flood(topic, payload, start, n, ns) do
    elapsed = System.monotonic_time(:millisecond) - start

    cond do
      elapsed >= @flood_ms ->
        {n, ns}

      n > elapsed * div(@rate, 1_000) ->
        Process.sleep(1)
        flood(topic, payload, start, n, ns)

      true ->
        {_, step} =
          Bench.timed(fn ->
            for i <- (n + 1)..(n + 100), do: :ok = Dispatcher.dispatch(topic, {:line, i, payload})
            :ok = Dispatcher.sync()
          end)

        flood(topic, payload, start, n + 100, ns + step)
    end
  end

  defp suspend_for(pid) do
    true = :erlang.suspend_process(pid)
    Process.sleep(@stall_ms)
    true = :erlang.resume_process(pid)
  end

  defp sink(topic, parent, subscribe, max) do
    :ok = subscribe.(topic)
    Process.put(:topic, topic)
    Process.put(:max, max)
    send(parent, {:ready, self()})
    sink_loop(0, 0, false)
  end

  defp sink_loop(received, missed, evicted) do
    receive do
      {:line, _, _} ->
        sink_loop(received + 1, missed, evicted)

      {:ex_atlas_fly_gap, _, n} ->
        sink_loop(received, missed + n, evicted)

      {:ex_atlas_fly_backpressure_evict, _} ->
        sink_loop(received, missed, true)

      {:ex_atlas_fly_behind, topic} ->
        :ok = Dispatcher.catch_up(topic, max: Process.get(:max))
        sink_loop(received, missed, evicted)

      {:report, to} ->
        # Still parked (:catch_up): what waits for it comes now, and is counted.
        :ok = Dispatcher.catch_up(Process.get(:topic))
        send(self(), {:final, to})
        sink_loop(received, missed, evicted)

      {:final, to} ->
        send(to, {:counts, self(), received, missed, evicted})
    end
  end

  # Samples VmRSS and `pid`'s mailbox every 10 ms until told to stop.
  defp sample(pid) do
    ref = make_ref()
    sampler = spawn(fn -> sample_loop(pid, ref, 0, 0) end)
    {sampler, ref}
  end

  defp sample_loop(pid, ref, rss, mailbox) do
    receive do
      {:stop, to} -> send(to, {ref, rss, mailbox})
    after
      10 ->
        len =
          case Process.info(pid, :message_queue_len) do
            {:message_queue_len, len} -> len
            nil -> 0
          end

        sample_loop(pid, ref, max(rss, rss()), max(mailbox, len))
    end
  end

  defp rss do
    "/proc/self/status"
    |> File.read!()
    |> String.split("\n")
    |> Enum.find_value(fn
      "VmRSS:" <> rest ->
        rest |> String.trim() |> String.trim_trailing(" kB") |> String.to_integer()

      _ ->
        nil
    end)
    |> Kernel.*(1_024)
  end

  ## Dispatch cost while nobody is skipped

  # Per size: `reps` repetitions of `batch` dispatches; caller time is the dispatch calls,
  # end to end adds Dispatcher.sync/0 (everything in the subscribers' mailboxes).
  def cost(o) do
    reps = if o.quick, do: 5, else: 21
    # --skipping-elsewhere: one subscriber of another topic is being skipped meanwhile
    # (on_slow: :skip; so this needs a checkout that has it).
    if o.skipping_elsewhere, do: skip_elsewhere()

    for {n, batch} <- [{10, 2_000}, {10_000, 20}] do
      topic = "bench:cost:#{n}"
      parent = self()

      subs =
        for _ <- 1..n do
          spawn(fn ->
            :ok = Dispatcher.subscribe(topic)
            send(parent, :ready)
            drop()
          end)
        end

      for _ <- subs, do: receive(do: (:ready -> :ok))
      _ = run(topic, batch)

      samples = for _ <- 1..reps, do: run(topic, batch)
      caller = Bench.median(for {c, _} <- samples, do: c) / batch
      e2e = Bench.median(for {_, e} <- samples, do: e) / batch
      IO.puts("cost #{n} caller_ns=#{Float.round(caller, 1)} e2e_ns=#{Float.round(e2e, 1)}")
      Enum.each(subs, &Process.exit(&1, :kill))
    end
  end

  defp skip_elsewhere do
    parent = self()
    topic = "bench:cost:elsewhere"

    pid =
      spawn(fn ->
        :ok = Dispatcher.subscribe(topic)
        send(parent, :ready)
        drop()
      end)

    receive(do: (:ready -> :ok))
    ExAtlas.Fly.Dispatcher.Backend.Registry.skip(:start, topic, pid)
  end

  defp run(topic, batch) do
    t0 = System.monotonic_time()
    for _ <- 1..batch, do: :ok = Dispatcher.dispatch(topic, :tick)
    t1 = System.monotonic_time()
    :ok = Dispatcher.sync()
    t2 = System.monotonic_time()
    ns = &System.convert_time_unit(&1, :native, :nanosecond)
    {ns.(t1 - t0), ns.(t2 - t0)}
  end

  defp drop do
    receive do
      _ -> drop()
    end
  end
end

WatchdogBench.main(System.argv())
