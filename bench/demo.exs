# The main job of `bash scripts/demo.sh`: stream synthetic Fly log batches,
# `{:ex_atlas_fly_logs, app, entries}`, to thousands of LiveView-like subscriber processes,
# once through ExAtlas.Fly.Dispatcher (the Rust NIF registry) and once through Elixir's
# `Registry.dispatch/3` with a send loop (the original ExAtlas 0.5.0 implementation), in
# the same run, on the same subscribers; print what was measured and check that every
# subscriber got every batch of its app, once and in order.
#
#     MIX_ENV=prod mix run bench/demo.exs [--subscribers 10000] [--apps 4] [--seconds 4]
#                                         [--interval-ms 100] [--burst 50] [--entries 20]
#
# Two scenarios per implementation:
#   * steady: each app's log producer dispatches one batch every --interval-ms, for
#     --seconds;
#   * burst: each producer dispatches --burst batches back to back, as fast as its dispatch
#     calls return: throughput, and what a full queue does to the producer.
# "blocked" is how long each dispatch call kept its caller (the log producer) busy; "wall"
# runs from the first dispatch until every batch is in every subscriber's mailbox.

defmodule ExAtlas.Demo.Viewer do
  @moduledoc false
  # A stand-in for a LiveView showing one app's logs: it counts the batches and lines it
  # receives and checks that the batches of its app arrive once each, in order.
  use GenServer

  def start_link(args), do: GenServer.start_link(__MODULE__, args)

  @impl true
  def init({app, topic, original}) do
    :ok = ExAtlas.Fly.Dispatcher.subscribe(topic)
    {:ok, _} = Registry.register(original, topic, nil)
    {:ok, fresh(app)}
  end

  @impl true
  def handle_info({:ex_atlas_fly_logs, app, [%{"seq" => seq} | _] = entries}, state)
      when app == state.app do
    errors = if seq == state.next, do: state.errors, else: state.errors + 1

    {:noreply,
     %{
       state
       | next: seq + 1,
         batches: state.batches + 1,
         lines: state.lines + length(entries),
         errors: errors
     }}
  end

  def handle_info(_other, state), do: {:noreply, %{state | errors: state.errors + 1}}

  # Handled after every message already in the mailbox: the counts of the phase so far.
  @impl true
  def handle_call(:take, _from, state) do
    {:reply, Map.take(state, [:batches, :lines, :errors]), fresh(state.app)}
  end

  defp fresh(app), do: %{app: app, next: 1, batches: 0, lines: 0, errors: 0}
end

defmodule ExAtlas.Demo do
  @moduledoc false

  alias ExAtlas.Fly.Dispatcher

  @original ExAtlas.Demo.OriginalRegistry

  def main(argv) do
    {opts, _, invalid} =
      OptionParser.parse(argv,
        strict: [
          subscribers: :integer,
          apps: :integer,
          seconds: :float,
          burst: :integer,
          interval_ms: :integer,
          entries: :integer
        ]
      )

    invalid == [] || raise ArgumentError, "unknown options: #{inspect(invalid)}"

    config = %{
      subscribers: Keyword.get(opts, :subscribers, 10_000),
      apps: Keyword.get(opts, :apps, 4),
      seconds: Keyword.get(opts, :seconds, 4.0),
      burst: Keyword.get(opts, :burst, 50),
      interval_ms: Keyword.get(opts, :interval_ms, 100),
      entries: Keyword.get(opts, :entries, 20)
    }

    {:ok, _} = Registry.start_link(keys: :duplicate, name: @original)
    apps = for n <- 1..config.apps, do: "demo-app-#{n}"
    viewers = start_viewers(apps, config.subscribers)
    stats = ExAtlas.Fly.Dispatcher.Backend.Registry.stats()

    IO.puts("""
    ExAtlas.Fly.Dispatcher demo: Fly log batches to LiveView-like subscribers
      #{config.subscribers} subscribers over #{config.apps} apps \
    (#{div(config.subscribers, config.apps)} per app topic), \
    #{config.entries} log lines per batch
      machine: #{System.schedulers_online()} schedulers, \
    Elixir #{System.version()}, OTP #{System.otp_release()}; \
    NIF: #{stats[:lanes]} senders, #{stats[:queue_capacity]} dispatches in flight each
    """)

    implementations = [
      {"ExAtlas NIF registry", &Dispatcher.dispatch/2, &Dispatcher.sync/0},
      {"Registry.dispatch/3 (original)", &original_dispatch/2, fn -> :ok end}
    ]

    scenarios = [
      {"steady #{config.seconds} s, 1 batch/#{config.interval_ms} ms/app",
       %{interval: config.interval_ms, seconds: config.seconds, batches: :infinity}},
      {"burst of #{config.burst} batches/app",
       %{interval: 0, seconds: 600, batches: config.burst}}
    ]

    rows =
      for {scenario, pace} <- scenarios, {name, dispatch, sync} <- implementations do
        IO.write("  measuring #{name}, #{scenario} ... ")
        row = run_phase(apps, viewers, config.entries, pace, dispatch, sync)
        IO.puts("done")
        Map.merge(row, %{scenario: scenario, name: name})
      end

    print_table(rows)

    failures = Enum.reject(rows, & &1.complete?)

    if failures == [] do
      IO.puts("\nEvery subscriber received every batch of its app, once and in order.")
    else
      IO.puts("\nINCOMPLETE deliveries in: #{Enum.map_join(failures, ", ", & &1.name)}")
      System.halt(1)
    end
  end

  defp original_dispatch(topic, message) do
    Registry.dispatch(@original, topic, fn entries ->
      for {pid, _} <- entries, do: send(pid, message)
    end)
  end

  defp topic(app), do: "ex_atlas_fly_logs:" <> app

  defp start_viewers(apps, count) do
    apps
    |> Stream.cycle()
    |> Enum.take(count)
    |> Enum.map(fn app ->
      {:ok, pid} = ExAtlas.Demo.Viewer.start_link({app, topic(app), @original})
      {app, pid}
    end)
  end

  defp run_phase(apps, viewers, lines, pace, dispatch, sync) do
    duration_ms = round(pace.seconds * 1000)
    parent = self()
    started = System.monotonic_time()

    producers =
      for app <- apps do
        spawn_link(fn ->
          deadline = System.monotonic_time(:millisecond) + duration_ms
          result = produce(app, lines, Map.put(pace, :deadline, deadline), dispatch)
          :ok = sync.()
          send(parent, {:produced, self(), app, result})
        end)
      end

    results =
      for pid <- producers do
        receive do
          {:produced, ^pid, app, result} -> {app, result}
        end
      end

    # Every producer has synced: all batches are in the viewers' mailboxes.
    elapsed_s =
      System.convert_time_unit(System.monotonic_time() - started, :native, :microsecond) / 1.0e6

    sent = Map.new(results, fn {app, {batches, _}} -> {app, batches} end)
    blocked = results |> Enum.flat_map(fn {_, {_, durations}} -> durations end) |> Enum.sort()

    counts = for {app, pid} <- viewers, do: {app, GenServer.call(pid, :take, :infinity)}

    complete? =
      Enum.all?(counts, fn {app, count} ->
        count.errors == 0 and count.batches == sent[app] and
          count.lines == sent[app] * lines
      end)

    deliveries = Enum.reduce(counts, 0, fn {_, count}, acc -> acc + count.batches end)

    %{
      batches: Enum.sum(Map.values(sent)),
      deliveries: deliveries,
      per_second: deliveries / elapsed_s,
      wall: elapsed_s,
      median: percentile(blocked, 0.5),
      p99: percentile(blocked, 0.99),
      complete?: complete?
    }
  end

  # Dispatches batch after batch until the deadline or the batch limit; returns
  # {batches, [blocked_ns]}.
  defp produce(app, lines, %{interval: interval, deadline: deadline, batches: limit}, dispatch) do
    topic = topic(app)
    template = for line <- 1..lines, do: log_line(app, line)
    first_at = System.monotonic_time(:millisecond)

    run = %{
      topic: topic,
      app: app,
      template: template,
      interval: interval,
      first_at: first_at,
      deadline: deadline,
      limit: limit,
      dispatch: dispatch
    }

    produce(run, 1, [])
  end

  defp produce(run, seq, blocked) do
    %{topic: topic, app: app, template: template, interval: interval} = run

    # (An integer is never greater than the atom :infinity.)
    if seq > run.limit or System.monotonic_time(:millisecond) >= run.deadline do
      {seq - 1, blocked}
    else
      # The producer's own work (building the batch) is not part of the dispatch cost.
      entries = Enum.map(template, &Map.put(&1, "seq", seq))
      message = {:ex_atlas_fly_logs, app, entries}
      before = System.monotonic_time()
      :ok = run.dispatch.(topic, message)
      took = System.monotonic_time() - before
      blocked = [System.convert_time_unit(took, :native, :nanosecond) | blocked]

      if interval > 0 do
        next_at = run.first_at + seq * interval
        wait = min(next_at, run.deadline) - System.monotonic_time(:millisecond)
        if wait > 0, do: Process.sleep(wait)
      end

      produce(run, seq + 1, blocked)
    end
  end

  defp log_line(app, line) do
    %{
      "timestamp" => "2026-01-01T00:00:#{String.pad_leading("#{rem(line, 60)}", 2, "0")}.000Z",
      "message" => "GET /api/items/#{line} 200 in #{line * 3}ms",
      "level" => "info",
      "instance" => "148e#{line}d9f#{line}",
      "region" => "iad",
      "app" => app
    }
  end

  defp percentile([], _), do: 0

  defp percentile(sorted, q) do
    index = min(length(sorted) - 1, max(0, ceil(q * length(sorted)) - 1))
    Enum.at(sorted, index)
  end

  defp print_table(rows) do
    header = [
      "scenario",
      "implementation",
      "batches",
      "deliveries",
      "wall",
      "deliveries/s",
      "blocked median",
      "blocked p99",
      "all delivered"
    ]

    lines =
      for row <- rows do
        [
          row.scenario,
          row.name,
          Integer.to_string(row.batches),
          Integer.to_string(row.deliveries),
          "#{:erlang.float_to_binary(row.wall, decimals: 1)} s",
          Integer.to_string(round(row.per_second)),
          duration(row.median),
          duration(row.p99),
          if(row.complete?, do: "yes", else: "NO")
        ]
      end

    widths =
      [header | lines]
      |> Enum.zip_with(& &1)
      |> Enum.map(fn column -> column |> Enum.map(&String.length/1) |> Enum.max() end)

    format = fn cells ->
      cells
      |> Enum.zip(widths)
      |> Enum.with_index()
      |> Enum.map_join("  ", fn {{cell, width}, index} ->
        if index < 2, do: String.pad_trailing(cell, width), else: String.pad_leading(cell, width)
      end)
    end

    IO.puts("")
    IO.puts(format.(header))
    IO.puts(Enum.map_join(widths, "  ", &String.duplicate("-", &1)))
    Enum.each(lines, &IO.puts(format.(&1)))
  end

  defp duration(ns) when ns < 1_000, do: "#{ns} ns"
  defp duration(ns) when ns < 1_000_000, do: "#{Float.round(ns / 1_000, 1)} us"
  defp duration(ns), do: "#{Float.round(ns / 1_000_000, 2)} ms"
end

ExAtlas.Demo.main(System.argv())
