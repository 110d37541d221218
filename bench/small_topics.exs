# The common case: many small topics, many producers at once (issue 18). Ours beside
# `Registry.dispatch/3` (ExAtlas 0.5.0), on the same subscriber processes, in one run.
#
#     MIX_ENV=prod mix run bench/small_topics.exs [--quick] [--topics N] [--per-topic K]
#                                                 [--seconds S] [--replay R] [--out DIR]
#
# `--topics` topics of `--per-topic` subscribers each (3 000 of 3), the 20-line log batch;
# each producer dispatches round-robin over its own 10 topics. Deliveries count when they
# reach a subscriber inside the timed window. Scenarios, each run for Registry, then ours:
#
#   * saturated, 300 producers and 4 producers: deliveries per second;
#   * 300 producers paced at 80% of Registry's capacity (its 300-producer saturated
#     dispatch rate): p50 and p99 latency from dispatch to receipt;
#   * 1 producer, saturated: dispatches per second and median latency.
#
# `--replay R` runs ours with `replay: R` (every dispatch kept in the one history, whose
# lock all topics share): how much that lock and the copy cost the common case.

Code.require_file("support/bench.ex", __DIR__)

defmodule SmallTopicsBench do
  @moduledoc false
  alias ExAtlas.Fly.Dispatcher

  @registry SmallTopicsBench.Registry
  @own_topics 10

  def main(argv) do
    switches = [topics: :integer, per_topic: :integer, seconds: :float, replay: :integer]

    o =
      Bench.options(argv, "small_topics", switches, fn quick ->
        if quick,
          do: %{topics: 300, per_topic: 3, seconds: 0.5},
          else: %{topics: 3_000, per_topic: 3, seconds: 3.0}
      end)

    replay = Map.get(o, :replay) || 0
    if replay > 0, do: :ok = Bench.restart(replay: replay)
    machine = Bench.machine()
    command = Bench.command("small_topics.exs")

    title =
      "Many small topics: #{o.topics} topics of #{o.per_topic} subscribers, many producers" <>
        if(replay > 0, do: " (ours with replay: #{replay})", else: "")

    header = Bench.header(title, command, machine)
    IO.puts(header)

    # As ExAtlas 0.5.0 started it, and as the other benchmarks do.
    {:ok, _} = Registry.start_link(keys: :duplicate, name: @registry)

    topics = for t <- 1..o.topics, do: "ex_atlas_fly_logs:bench-#{t}"
    subscribers = start_subscribers(topics, o.per_topic)
    entries = Bench.entries()

    run = fn mode, producers, pace ->
      scenario(mode, producers, pace, topics, subscribers, entries, o)
    end

    producers_many = min(300, div(o.topics, @own_topics))
    reg_many = run.(:registry, producers_many, nil)
    ours_many = run.(:ours, producers_many, nil)
    reg_four = run.(:registry, 4, nil)
    ours_four = run.(:ours, 4, nil)
    # 80% of Registry's capacity with many producers, in dispatches per second.
    paced = 0.8 * reg_many.dispatches / reg_many.seconds
    reg_paced = run.(:registry, producers_many, paced)
    ours_paced = run.(:ours, producers_many, paced)
    reg_one = run.(:registry, 1, nil)
    ours_one = run.(:ours, 1, nil)

    rows = [
      row("#{producers_many} producers, saturated", reg_many, ours_many),
      row("4 producers, saturated", reg_four, ours_four),
      row(
        "#{producers_many} producers, paced at #{Bench.rate(paced)} dispatches/s",
        reg_paced,
        ours_paced
      ),
      row("1 producer, saturated", reg_one, ours_one)
    ]

    table =
      Bench.table(
        "Registry.dispatch/3 and ours, one run",
        "scenario|Registry deliveries/s|ours deliveries/s|ratio|Registry p50 / p99|ours p50 / p99",
        rows,
        note:
          "deliveries/s: reaching a subscriber inside the #{o.seconds} s window; " <>
            "latency: dispatch to receipt, over every delivery of the window"
      )

    ratio = fn ours, reg -> ours.delivered / max(reg.delivered, 1) end

    targets =
      Bench.targets("Targets (issue 18)", [
        {"#{producers_many} producers, saturated: deliveries/s >= 0.95x Registry's",
         Bench.sig(ratio.(ours_many, reg_many)) <> "x", ratio.(ours_many, reg_many) >= 0.95},
        {"4 producers, saturated: deliveries/s >= 0.95x Registry's",
         Bench.sig(ratio.(ours_four, reg_four)) <> "x", ratio.(ours_four, reg_four) >= 0.95},
        {"paced at 80% of Registry's capacity: p99 <= 1.5x Registry's",
         Bench.ratio(ours_paced.p99, reg_paced.p99), ours_paced.p99 <= 1.5 * reg_paced.p99},
        {"1 producer: median latency <= 2x Registry's", Bench.ratio(ours_one.p50, reg_one.p50),
         ours_one.p50 <= 2 * reg_one.p50}
      ])

    Bench.write(o.out, "small_topics.md", [header, table, targets])
  end

  defp row(label, reg, ours) do
    [
      label,
      Bench.rate(reg.delivered / reg.seconds),
      Bench.rate(ours.delivered / ours.seconds),
      Bench.ratio(ours.delivered, reg.delivered),
      "#{Bench.dur(reg.p50)} / #{Bench.dur(reg.p99)}",
      "#{Bench.dur(ours.p50)} / #{Bench.dur(ours.p99)}"
    ]
  end

  ## Subscribers

  defp start_subscribers(topics, per_topic) do
    parent = self()

    pids =
      for topic <- topics, _ <- 1..per_topic do
        spawn_link(fn ->
          :ok = Dispatcher.subscribe(topic)
          {:ok, _} = Registry.register(@registry, topic, nil)
          send(parent, {:subscribed, self()})
          subscriber(nil, 0, [])
        end)
      end

    for pid <- pids, do: receive(do: ({:subscribed, ^pid} -> :ok))
    pids
  end

  # Counts what arrives before `deadline` (native monotonic time), with its latency.
  defp subscriber(deadline, count, latencies) do
    receive do
      {:ex_atlas_fly_logs, {_app, sent}, _entries} ->
        now = System.monotonic_time()

        if deadline != nil and now <= deadline,
          do: subscriber(deadline, count + 1, [now - sent | latencies]),
          else: subscriber(deadline, count, latencies)

      {:window, from, ref, deadline} ->
        send(from, {ref, :ok})
        subscriber(deadline, 0, [])

      {:report, from, ref} ->
        send(from, {ref, count, latencies})
        subscriber(nil, 0, [])
    end
  end

  defp each_subscriber(subscribers, message) do
    ref = make_ref()
    for pid <- subscribers, do: send(pid, message.(ref))

    for _ <- subscribers do
      receive do
        {^ref, :ok} -> :ok
        {^ref, count, latencies} -> {count, latencies}
      end
    end
  end

  ## Scenarios

  defp scenario(mode, producers, pace, topics, subscribers, entries, o) do
    :erlang.garbage_collect()
    Process.sleep(200)
    window = System.convert_time_unit(round(o.seconds * 1_000), :millisecond, :native)
    # Producers start a little after the window is set everywhere.
    start = System.monotonic_time() + System.convert_time_unit(50, :millisecond, :native)
    deadline = start + window
    each_subscriber(subscribers, &{:window, self(), &1, deadline})

    groups = topics |> Enum.chunk_every(@own_topics) |> Enum.take(producers)
    per_producer = if pace, do: pace / producers

    parent = self()

    pids =
      for own <- groups do
        spawn_link(fn ->
          count = produce(mode, List.to_tuple(own), 0, start, deadline, per_producer, entries)
          if mode == :ours, do: :ok = Dispatcher.sync()
          send(parent, {:produced, self(), count})
        end)
      end

    dispatches = Enum.sum(for pid <- pids, do: receive(do: ({:produced, ^pid, n} -> n)))
    # Let every subscriber read its backlog: what arrives late is not counted anyway.
    reports = each_subscriber(subscribers, &{:report, self(), &1})
    delivered = Enum.sum(for {count, _} <- reports, do: count)
    latencies = reports |> Enum.flat_map(&elem(&1, 1)) |> Enum.sort()

    {p50, p99} =
      case latencies do
        [] -> {nil, nil}
        _ -> {to_ns(percentile(latencies, 0.5)), to_ns(percentile(latencies, 0.99))}
      end

    result = %{
      dispatches: dispatches,
      delivered: delivered,
      seconds: o.seconds,
      p50: p50,
      p99: p99
    }

    IO.puts(
      "#{mode}, #{producers} producers#{if pace, do: ", paced at #{Bench.rate(pace)}/s", else: ""}: " <>
        "#{dispatches} dispatches, #{Bench.rate(delivered / o.seconds)} deliveries/s, " <>
        "p50 #{Bench.dur(p50)}, p99 #{Bench.dur(p99)}"
    )

    result
  end

  defp produce(mode, own, i, start, deadline, per_second, entries) do
    now = System.monotonic_time()

    cond do
      now >= deadline ->
        i

      now < start ->
        Process.sleep(1)
        produce(mode, own, i, start, deadline, per_second, entries)

      true ->
        if per_second, do: wait_turn(start, i, per_second)
        topic = elem(own, rem(i, tuple_size(own)))
        message = {:ex_atlas_fly_logs, {topic, System.monotonic_time()}, entries}
        dispatch(mode, topic, message)
        produce(mode, own, i + 1, start, deadline, per_second, entries)
    end
  end

  # Dispatch `i` of a paced producer is due at `start + i / per_second`.
  defp wait_turn(start, i, per_second) do
    due =
      start + System.convert_time_unit(round(i * 1_000_000 / per_second), :microsecond, :native)

    ms = System.convert_time_unit(due - System.monotonic_time(), :native, :millisecond)
    if ms > 0, do: Process.sleep(ms)
  end

  defp dispatch(:ours, topic, message), do: Dispatcher.dispatch(topic, message)

  defp dispatch(:registry, topic, message),
    do: Bench.registry_dispatch(@registry, topic, message)

  defp percentile(sorted, q),
    do: Enum.at(sorted, min(length(sorted) - 1, floor(q * length(sorted))))

  defp to_ns(native), do: System.convert_time_unit(native, :native, :nanosecond)
end

SmallTopicsBench.main(System.argv())
