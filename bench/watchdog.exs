# Watchdog benchmark of issue 4: what watching idle subscribers with
# subscribe_with_backpressure/2 costs the schedulers, at the default poll_ms (1 000 ms).
#
#     mix run bench/watchdog.exs           # 10 000 subscribers, 3 rounds of 10 s windows,
#                                          # plus the design comparison; writes
#                                          # bench/results/watchdog.md
#     mix run bench/watchdog.exs --quick   # 1 000 subscribers, 1.5 s windows, a few seconds;
#                                          # writes to a temporary directory (CI)
#
# Options: --subscribers N  --seconds S  --rounds R  --designs / --no-designs  --out DIR
#
# Method. The same N subscriber processes (idle, blocked in `receive`) are subscribed to
# one topic throughout. Each round measures a window with plain subscribe/1 subscriptions
# (baseline) and a window with the same subscriptions made by subscribe_with_backpressure/2
# (watched). The cost is the busy time of the normal schedulers, from
# `:erlang.statistics(:scheduler_wall_time)` (each scheduler's active and total wall time),
# summed over schedulers and divided by the window's wall time: "% of one scheduler".
# The watchdog's cost is watched minus baseline (medians over rounds); the target is < 2%.
#
# The design comparison runs two throwaway pollers on the same subscribers (no eviction,
# nothing but the poll): one process polling all of them, and one process per subscriber.
# It is how the watchdog's design (one poller) was chosen.

defmodule WatchdogBench do
  @moduledoc false

  alias ExAtlas.Fly.Dispatcher
  alias ExAtlas.Fly.Dispatcher.Watchdog

  @topic "bench:watchdog"
  @target_pct 2.0

  def main(argv) do
    opts = parse(argv)
    :erlang.system_flag(:scheduler_wall_time, true)
    machine = machine()

    IO.puts(
      "watchdog benchmark: #{opts.subscribers} subscribers, poll_ms 1000 (default), " <>
        "#{opts.rounds} round(s) of #{opts.seconds} s windows#{if opts.quick, do: " (quick)", else: ""}"
    )

    IO.puts("machine: #{machine[:machine]}, #{machine[:otp]}, load #{machine[:load]}\n")

    subscribers = spawn_subscribers(opts.subscribers)
    {plain_us, _} = :timer.tc(fn -> each(subscribers, &plain/0) end)

    {rounds, subscribe_us} =
      Enum.map_reduce(1..opts.rounds, nil, fn round, _ ->
        settle()
        baseline = window(opts.seconds)
        {watch_us, _} = :timer.tc(fn -> each(subscribers, &watched/0) end)
        %{watches: watches} = Watchdog.stats()
        true = watches >= opts.subscribers
        # Let the first poll of the new watches pass before measuring the steady state.
        settle(1_200)
        polls_before = polls(hd(subscribers))
        watched = window(opts.seconds)
        watched = Map.put(watched, :polls, polls(hd(subscribers)) - polls_before)
        each(subscribers, &plain/0)

        IO.puts(
          "round #{round}: baseline #{pct(baseline.normal)}, watched #{pct(watched.normal)} " <>
            "(#{watched.polls} polls)"
        )

        {%{baseline: baseline, watched: watched}, watch_us}
      end)

    designs = if opts.designs, do: compare_designs(subscribers, opts), else: []

    # Every watch ends with its subscriber.
    each(subscribers, &watched/0)
    Enum.each(subscribers, &send(&1, :stop))
    left = wait_empty(5_000)

    result = %{
      opts: opts,
      machine: machine,
      rounds: rounds,
      designs: designs,
      plain_us: plain_us,
      subscribe_us: subscribe_us,
      left: left
    }

    report = report(result)
    IO.puts("\n" <> report)
    File.mkdir_p!(opts.out)
    path = Path.join(opts.out, "watchdog.md")
    File.write!(path, report)
    IO.puts("wrote #{path}")
  end

  ## Options

  defp parse(argv) do
    {parsed, _rest, invalid} =
      OptionParser.parse(argv,
        strict: [
          quick: :boolean,
          subscribers: :integer,
          seconds: :float,
          rounds: :integer,
          designs: :boolean,
          out: :string
        ]
      )

    if invalid != [], do: raise(ArgumentError, "unknown options: #{inspect(invalid)}")
    quick = Keyword.get(parsed, :quick, false)

    %{
      quick: quick,
      subscribers: Keyword.get(parsed, :subscribers, if(quick, do: 1_000, else: 10_000)),
      seconds: Keyword.get(parsed, :seconds, if(quick, do: 1.5, else: 10.0)),
      rounds: Keyword.get(parsed, :rounds, if(quick, do: 1, else: 3)),
      designs: Keyword.get(parsed, :designs, not quick),
      out:
        Keyword.get_lazy(parsed, :out, fn ->
          if quick,
            do: Path.join(System.tmp_dir!(), "ex_atlas_watchdog_bench"),
            else: Path.join(__DIR__, "results")
        end)
    }
  end

  ## Subscribers

  defp spawn_subscribers(n) do
    for _ <- 1..n, do: spawn(&subscriber_loop/0)
  end

  defp subscriber_loop do
    receive do
      {:run, fun, from} ->
        send(from, {:ran, self(), fun.()})
        subscriber_loop()

      :stop ->
        :ok
    end
  end

  # Runs `fun` in every subscriber, all at once, and waits for all of them.
  defp each(subscribers, fun) do
    Enum.each(subscribers, &send(&1, {:run, fun, self()}))

    # Replies in any order: a receive per pid would scan the mailbox for each.
    Enum.each(subscribers, fn _ ->
      receive do
        {:ran, _pid, :ok} -> :ok
      end
    end)
  end

  defp plain do
    :ok = Dispatcher.unsubscribe(@topic)
    Dispatcher.subscribe(@topic)
  end

  defp watched do
    :ok = Dispatcher.unsubscribe(@topic)
    Dispatcher.subscribe_with_backpressure(@topic)
  end

  defp polls(pid), do: Watchdog.watch_info(pid, @topic).polls

  defp settle(ms \\ 500) do
    :erlang.garbage_collect()
    Process.sleep(ms)
  end

  defp wait_empty(timeout) do
    deadline = System.monotonic_time(:millisecond) + timeout

    Stream.repeatedly(fn ->
      Process.sleep(20)
      Watchdog.stats()
    end)
    |> Enum.find(fn stats ->
      stats.watches == 0 or System.monotonic_time(:millisecond) > deadline
    end)
  end

  ## Measurement

  # Busy time of the normal and dirty CPU schedulers over `seconds`, in % of one scheduler.
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
    {normal, dirty} = busy(s0, s1)
    cpu = (cpu1 - cpu0) * 1_000 / (t1 - t0) * 100
    %{normal: normal, dirty: dirty, cpu: cpu, reductions: (r1 - r0) / seconds}
  end

  defp busy(s0, s1) do
    normal_count = :erlang.system_info(:schedulers)
    before = Map.new(s0, fn {id, active, total} -> {id, {active, total}} end)

    deltas =
      for {id, active, total} <- s1, Map.has_key?(before, id) do
        {a0, t0} = before[id]
        {id, active - a0, total - t0}
      end

    wall = deltas |> Enum.map(fn {_, _, t} -> t end) |> Enum.max()

    sum = fn ids ->
      deltas
      |> Enum.filter(fn {id, _, _} -> id in ids end)
      |> Enum.map(&elem(&1, 1))
      |> Enum.sum()
    end

    normal = sum.(1..normal_count) / wall * 100

    dirty =
      sum.((normal_count + 1)..(normal_count + :erlang.system_info(:dirty_cpu_schedulers))) / wall *
        100

    {normal, dirty}
  end

  ## Design comparison: two throwaway pollers doing only the poll

  defp compare_designs(subscribers, opts) do
    IO.puts("\ndesign comparison (same #{length(subscribers)} subscribers, no eviction):")

    designs = [
      {"none (baseline)", fn -> [] end},
      {"one poller, all subscribers in a map, one timer", fn -> [one_poller(subscribers)] end},
      {"one process per subscriber, receive ... after",
       fn -> per_process(subscribers, :after) end},
      {"one process per subscriber, send_after timer", fn -> per_process(subscribers, :timer) end}
    ]

    Enum.map(designs, fn {name, start} ->
      settle()
      mem0 = :erlang.memory(:processes)
      pollers = start.()
      settle(1_200)
      mem = :erlang.memory(:processes) - mem0
      %{normal: normal, cpu: cpu} = window(opts.seconds)
      Enum.each(pollers, &send(&1, :stop))
      Process.sleep(200)
      IO.puts("  #{String.pad_trailing(name, 50)} #{pct(normal)}  cpu #{pct(cpu)}  +#{mib(mem)}")
      %{name: name, normal: normal, cpu: cpu, memory: mem}
    end)
  end

  defp one_poller(subscribers) do
    spawn(fn ->
      watches = Map.new(subscribers, &{&1, %{threshold: 10_000, above_since: nil}})
      Process.send_after(self(), :poll, 1_000)
      one_poller_loop(watches)
    end)
  end

  defp one_poller_loop(watches) do
    receive do
      :poll ->
        :maps.foreach(
          fn pid, watch ->
            case Process.info(pid, :message_queue_len) do
              {:message_queue_len, len} when len > watch.threshold -> :slow
              _ -> :ok
            end
          end,
          watches
        )

        Process.send_after(self(), :poll, 1_000)
        one_poller_loop(watches)

      :stop ->
        :ok
    end
  end

  defp per_process(subscribers, how) do
    for pid <- subscribers do
      spawn(fn ->
        ref = Process.monitor(pid)
        # Spread the first polls over the interval, as independent subscriptions would be.
        if how == :timer, do: Process.send_after(self(), :poll, :rand.uniform(1_000))
        per_process_loop(pid, ref, how)
      end)
    end
  end

  defp per_process_loop(pid, ref, how) do
    receive do
      :poll ->
        _ = Process.info(pid, :message_queue_len)
        Process.send_after(self(), :poll, 1_000)
        per_process_loop(pid, ref, how)

      {:DOWN, ^ref, _, _, _} ->
        :ok

      :stop ->
        :ok
    after
      poll_timeout(how) ->
        _ = Process.info(pid, :message_queue_len)
        per_process_loop(pid, ref, how)
    end
  end

  defp poll_timeout(:after), do: 1_000
  defp poll_timeout(:timer), do: :infinity

  ## Report

  defp report(r) do
    baseline = median(Enum.map(r.rounds, & &1.baseline.normal))
    watched = median(Enum.map(r.rounds, & &1.watched.normal))
    cost = watched - baseline

    cpu_cost =
      median(Enum.map(r.rounds, & &1.watched.cpu)) - median(Enum.map(r.rounds, & &1.baseline.cpu))

    verdict = if cost < @target_pct, do: "PASS", else: "MISS"
    n = r.opts.subscribers

    round_rows =
      r.rounds
      |> Enum.with_index(1)
      |> Enum.flat_map(fn {round, i} ->
        [
          "| #{i} | plain subscribe/1 (baseline) | #{pct(round.baseline.normal)} | #{pct(round.baseline.dirty)} | #{pct(round.baseline.cpu)} | #{int(round.baseline.reductions)} | |",
          "| #{i} | subscribe_with_backpressure/2 | #{pct(round.watched.normal)} | #{pct(round.watched.dirty)} | #{pct(round.watched.cpu)} | #{int(round.watched.reductions)} | #{round.watched.polls} |"
        ]
      end)

    design_rows =
      Enum.map(r.designs, fn d ->
        "| #{d.name} | #{pct(d.normal)} | #{pct(d.cpu)} | #{mib(d.memory)} |"
      end)

    designs =
      if r.designs == [] do
        ""
      else
        """

        ## Design comparison (what chose one poller)

        Throwaway pollers doing only the poll (`Process.info(pid, :message_queue_len)` every
        1 000 ms) over the same #{n} idle subscribers, one #{r.opts.seconds} s window each;
        memory is the growth of `:erlang.memory(:processes)` once they run.

        | design | normal schedulers, % of one | VM CPU time, % of one core | process memory |
        |---|---:|---:|---:|
        #{Enum.join(design_rows, "\n")}
        """
      end

    """
    # Watchdog cost: #{n} watched subscribers at the default poll_ms

    `mix run bench/watchdog.exs#{if r.opts.quick, do: " --quick", else: ""}` · #{r.machine[:date]} ·
    #{r.machine[:machine]} · #{r.machine[:otp]} · #{r.machine[:elixir]} · load average at
    start #{r.machine[:load]}

    ## Result

    | | % of one scheduler |
    |---|---:|
    | baseline (median of #{length(r.rounds)}) | #{pct(baseline)} |
    | watched (median of #{length(r.rounds)}) | #{pct(watched)} |
    | **watchdog cost** | **#{pct(cost)}** (target < #{@target_pct}%: #{verdict}) |

    The same windows in CPU time of the whole VM (`:erlang.statistics(:runtime)`, user +
    system, scheduler spinning included): watchdog cost #{pct(cpu_cost)} of one core.
    Busy wall time counts a scheduler as busy while the OS has it preempted, so on a loaded
    machine it reads higher than CPU time; the load average is above.

    What was measured: #{n} idle subscriber processes stay subscribed to one topic. In
    each round, one #{r.opts.seconds} s window with plain `subscribe/1` subscriptions and one
    with the same subscriptions made by `subscribe_with_backpressure/2` (defaults:
    threshold 10 000, poll_ms 1 000, cooldown 0). The figure is the busy wall time of the
    normal schedulers (`:erlang.statistics(:scheduler_wall_time)`, enabled with
    `:erlang.system_flag(:scheduler_wall_time, true)`), summed over the
    #{:erlang.system_info(:schedulers)} schedulers and divided by the window: 100% is one
    scheduler busy all the time. The watchdog's cost is watched minus baseline; the
    benchmark process itself sleeps through each window.

    | round | subscriptions | normal schedulers, % of one | dirty CPU schedulers, % of one | VM CPU time, % of one core | watchdog reductions/s | polls in window |
    |---:|---|---:|---:|---:|---:|---:|
    #{Enum.join(round_rows, "\n")}

    Subscribing all #{n} at once (each subscriber calls, concurrently): plain
    `subscribe/1` #{ms(r.plain_us)}, `subscribe_with_backpressure/2` #{ms(r.subscribe_us)}
    (both include an `unsubscribe/1` each). After the subscribers exited, the watchdog
    held #{r.left.watches} watches, #{r.left.subscribers} monitors and #{r.left.timers} timers.
    #{designs}
    """
  end

  defp median(list) do
    sorted = Enum.sort(list)
    len = length(sorted)

    if rem(len, 2) == 1,
      do: Enum.at(sorted, div(len, 2)),
      else: (Enum.at(sorted, div(len, 2) - 1) + Enum.at(sorted, div(len, 2))) / 2
  end

  defp pct(value) when abs(value) < 0.0005, do: "0.000%"
  defp pct(value), do: :erlang.float_to_binary(value * 1.0, decimals: 3) <> "%"
  defp int(value), do: Integer.to_string(round(value))
  defp ms(us), do: :erlang.float_to_binary(us / 1_000, decimals: 1) <> " ms"
  defp mib(bytes), do: :erlang.float_to_binary(bytes / 1_048_576, decimals: 1) <> " MiB"

  defp machine do
    cpu =
      with {:ok, text} <- File.read("/proc/cpuinfo"),
           [_, model] <- Regex.run(~r/^model name\s*:\s*(.+)$/m, text) do
        String.trim(model)
      else
        _ -> "unknown CPU"
      end

    load =
      case File.read("/proc/loadavg") do
        {:ok, text} -> text |> String.split() |> Enum.take(3) |> Enum.join(" ")
        _ -> "unknown"
      end

    [
      date: DateTime.utc_now() |> DateTime.truncate(:second) |> DateTime.to_iso8601(),
      machine: "#{:erlang.system_info(:logical_processors_available)} CPUs, #{cpu}",
      otp:
        "Erlang/OTP #{:erlang.system_info(:otp_release)} (erts #{:erlang.system_info(:version)})",
      elixir: "Elixir #{System.version()}",
      load: load
    ]
  end
end

WatchdogBench.main(System.argv())
