# Watchdog benchmark: what watching idle subscribers with subscribe_with_backpressure/2
# costs the schedulers at the default poll_ms, and the design comparison that chose one
# poller. Method and target (< 2% of one scheduler): bench/README.md.
#
#     MIX_ENV=prod mix run bench/watchdog.exs [--quick] [--subscribers N] [--seconds S]
#                                             [--rounds R] [--designs | --no-designs] [--out DIR]

Code.require_file("support/bench.ex", __DIR__)

defmodule WatchdogBench do
  @moduledoc false
  alias ExAtlas.Fly.Dispatcher
  alias ExAtlas.Fly.Dispatcher.Watchdog

  @topic "bench:watchdog"
  @target 2.0

  def main(argv) do
    switches = [subscribers: :integer, seconds: :float, rounds: :integer, designs: :boolean]

    o =
      Bench.options(argv, "watchdog", switches, fn quick ->
        if quick,
          do: %{subscribers: 1_000, seconds: 1.5, rounds: 1, designs: false},
          else: %{subscribers: 10_000, seconds: 10.0, rounds: 3, designs: true}
      end)

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

WatchdogBench.main(System.argv())
