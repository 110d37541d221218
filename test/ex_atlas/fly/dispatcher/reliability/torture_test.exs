defmodule ExAtlas.Fly.Dispatcher.Reliability.TortureTest do
  # Item 2 of the reliability suite: concurrency torture. Several dispatching processes
  # and a churning population of subscribers (subscribe, unsubscribe, exit) over many
  # topics, then every delivery is checked against what the API promises.
  #
  # To make "dispatched while it was subscribed" decidable, every event takes a ticket
  # from one shared counter (`:atomics.add_get/3`, a total order): a dispatch takes `s`
  # before calling dispatch/2 and `e` after it returned; a subscriber takes `a0`/`a1`
  # around subscribe/1 and `b0`/`b1` around unsubscribe/1. For a message m and a window:
  #
  #   * a1 < s(m) and e(m) < b0: dispatched entirely inside the window: exactly once;
  #   * e(m) < a0 or s(m) > b1: dispatched entirely outside: never;
  #   * anything else overlaps a boundary: at most once.
  #
  # "At most once" and per-sender order are checked together: from each sender the
  # tickets a subscriber sees must strictly increase. Subscribers that exit during the run
  # report what they got before exiting; only "never" and order are checked for them, as
  # in-flight messages may still be on the way when they go.
  use ExUnit.Case, async: false

  import ExAtlas.Test.Reliability
  import ExAtlas.Test.FlyEnv, only: [restart_app: 1]

  alias ExAtlas.Fly.Dispatcher

  @moduletag timeout: :infinity

  @dispatchers 8
  @subscribers 2_000
  # Topics 0..7 are big (about 130 subscribers at a time, delivered through the lanes'
  # sender processes); 8..63 small (a handful, which the caller may send itself): every
  # dispatcher mixes both paths, and its order must hold across them.
  @topics 64
  @big_topics 8
  @short_ms 3_000
  @soak_ms 60_000

  test "#{@dispatchers} dispatchers, #{@subscribers} churning subscribers, #{@short_ms} ms" do
    torture(@short_ms)
  end

  @tag :soak
  test "#{@dispatchers} dispatchers, #{@subscribers} churning subscribers, #{@soak_ms} ms (soak)" do
    torture(@soak_ms)
  end

  # Both delivery paths (`config :ex_atlas, :fly, delivery:`): the default above, the
  # other one here.
  test "#{@dispatchers} dispatchers, #{@subscribers} churning subscribers, #{@short_ms} ms, the other delivery path" do
    restart_app(delivery: other_delivery())
    torture(@short_ms)
  end

  defp topic(index), do: "torture:#{index}"

  defp torture(duration) do
    tickets = :atomics.new(1, signed: false)
    parent = self()
    deadline = System.monotonic_time(:millisecond) + duration

    # Half the population lives to the end, so "exactly once" is checked in full for them;
    # the other half exits along the way and is replaced by newcomers that exit too.
    subscribers =
      MapSet.new(1..@subscribers, fn i -> spawn_subscriber(parent, tickets, rem(i, 2) == 0) end)

    for id <- 1..@dispatchers do
      spawn_link(fn -> dispatcher(id, parent, tickets, deadline) end)
    end

    {logs, reports, live} = run(subscribers, %{}, [], deadline)

    # Every dispatcher called sync/0 before handing in its log, so all that was
    # dispatched is in the mailboxes; :stop arrives behind it.
    for pid <- live, do: send(pid, :stop)
    reports = collect(live, reports)

    await_empty_registry()
    summary = verify(logs, reports)

    IO.puts(
      "\ntorture #{duration} ms (delivery #{inspect(ExAtlas.Fly.Dispatcher.Config.delivery())}): " <>
        "#{summary.dispatches} dispatches, " <>
        "#{summary.received} deliveries to #{summary.subscribers} subscribers " <>
        "(#{summary.exited} exited during the run), #{summary.windows} windows, " <>
        "#{summary.must} had to arrive, #{summary.boundary} boundary deliveries"
    )

    assert summary.violations == [],
           "#{length(summary.violations)} violations, first ones:\n" <>
             Enum.map_join(Enum.take(summary.violations, 20), "\n", &inspect/1)
  end

  # Keeps the population at @subscribers until the dispatchers are done.
  defp run(live, logs, reports, deadline) do
    if map_size(logs) == @dispatchers do
      {logs, reports, live}
    else
      receive do
        {:dispatched, id, log} ->
          run(live, Map.put(logs, id, log), reports, deadline)

        {:report, pid, report} ->
          live = MapSet.delete(live, pid)

          live =
            if System.monotonic_time(:millisecond) < deadline,
              do: MapSet.put(live, spawn_subscriber(self(), report.tickets, true)),
              else: live

          run(live, logs, [report | reports], deadline)
      after
        120_000 -> flunk("dispatchers did not finish")
      end
    end
  end

  defp collect(live, reports) do
    Enum.reduce(live, reports, fn pid, acc ->
      receive do
        {:report, ^pid, report} -> [report | acc]
      after
        60_000 -> flunk("subscriber #{inspect(pid)} never reported")
      end
    end)
  end

  # --- dispatchers -----------------------------------------------------------------

  defp dispatcher(id, parent, tickets, deadline) do
    log = dispatch_loop(id, tickets, deadline, 0, [])
    :ok = Dispatcher.sync()
    send(parent, {:dispatched, id, log})
  end

  defp dispatch_loop(id, tickets, deadline, n, log) do
    if System.monotonic_time(:millisecond) >= deadline do
      log
    else
      index = :rand.uniform(@topics) - 1
      s = :atomics.add_get(tickets, 1, 1)
      :ok = Dispatcher.dispatch(topic(index), {:torture, id, s, index})
      e = :atomics.add_get(tickets, 1, 1)
      # Bursts with short pauses: many dispatches race the churn, and the number of
      # deliveries stays within what two cores check in seconds.
      if rem(n, 4) == 3, do: Process.sleep(1)
      dispatch_loop(id, tickets, deadline, n + 1, [{s, id, index, e} | log])
    end
  end

  # --- subscribers -----------------------------------------------------------------

  defp spawn_subscriber(parent, tickets, mortal?) do
    spawn(fn ->
      state = %{
        parent: parent,
        tickets: tickets,
        open: %{},
        windows: [],
        received: [],
        last: %{},
        violations: [],
        mortal: mortal?
      }

      churn(state)
    end)
  end

  defp tick(state), do: :atomics.add_get(state.tickets, 1, 1)

  defp churn(state) do
    roll = :rand.uniform(100)

    cond do
      state.mortal and roll <= 2 ->
        finish(state, true)

      (roll <= 55 and map_size(state.open) < 2) or state.open == %{} ->
        range =
          if :rand.uniform(10) <= 7, do: 0..(@big_topics - 1), else: @big_topics..(@topics - 1)

        index = Enum.random(Enum.reject(range, &Map.has_key?(state.open, &1)))
        a0 = tick(state)
        result = Dispatcher.subscribe(topic(index))
        a1 = tick(state)
        state = check_ok(state, :subscribe, result)
        wait(%{state | open: Map.put(state.open, index, {a0, a1})})

      true ->
        {index, {a0, a1}} = Enum.random(state.open)
        b0 = tick(state)
        result = Dispatcher.unsubscribe(topic(index))
        b1 = tick(state)
        state = check_ok(state, :unsubscribe, result)

        wait(%{
          state
          | open: Map.delete(state.open, index),
            windows: [{index, a0, a1, b0, b1} | state.windows]
        })
    end
  end

  defp check_ok(state, _call, :ok), do: state

  defp check_ok(state, call, other),
    do: %{state | violations: [{call, :returned, other} | state.violations]}

  defp wait(state) do
    wait(state, System.monotonic_time(:millisecond) + :rand.uniform(6) - 1)
  end

  # Handles deliveries until `until`, then churns on even if more are queued: a steady
  # stream of deliveries must not starve the churn (what is queued waits for the next wait).
  defp wait(state, until) do
    timeout = until - System.monotonic_time(:millisecond)

    if timeout <= 0 do
      churn(state)
    else
      receive do
        {:torture, sender, s, index} -> wait(record(state, sender, s, index), until)
        :stop -> finish(state, false)
      after
        timeout -> churn(state)
      end
    end
  end

  defp record(state, sender, s, index) do
    violations =
      case state.last do
        %{^sender => last} when last >= s -> [{:order_or_duplicate, sender, last, s}]
        _ -> []
      end

    %{
      state
      | received: [{s, index} | state.received],
        last: Map.put(state.last, sender, s),
        violations: violations ++ state.violations
    }
  end

  defp finish(state, exited?) do
    open = for {index, {a0, a1}} <- state.open, do: {index, a0, a1, :open, :open}

    report = %{
      pid: self(),
      tickets: state.tickets,
      exited: exited?,
      windows: open ++ state.windows,
      received: state.received,
      violations: state.violations
    }

    send(state.parent, {:report, self(), report})
    # Some go with an exit signal rather than by returning; either way only the NIF's
    # monitor removes their subscriptions.
    if exited? and :rand.uniform(2) == 1, do: Process.exit(self(), :kill)
  end

  # --- verification ------------------------------------------------------------------

  defp verify(logs, reports) do
    dispatches = logs |> Map.values() |> List.flatten()
    by_ticket = Map.new(dispatches, fn {s, id, index, e} -> {s, {id, index, e}} end)

    # Per topic, the dispatches ordered by their first ticket, for range lookups.
    by_topic =
      dispatches
      |> Enum.group_by(fn {_, _, index, _} -> index end, fn {s, _, _, e} -> {s, e} end)
      |> Map.new(fn {index, list} -> {index, List.to_tuple(Enum.sort(list))} end)

    init = %{
      violations: [],
      received: 0,
      windows: 0,
      must: 0,
      boundary: 0,
      exited: 0,
      subscribers: length(reports),
      dispatches: length(dispatches)
    }

    Enum.reduce(reports, init, fn report, acc ->
      tagged = Enum.map(report.violations, &{report.pid, &1})
      acc = %{acc | violations: tagged ++ acc.violations}
      acc = %{acc | windows: acc.windows + length(report.windows)}
      acc = %{acc | received: acc.received + length(report.received)}
      acc = if report.exited, do: %{acc | exited: acc.exited + 1}, else: acc
      acc = check_received(report, by_ticket, acc)
      if report.exited, do: acc, else: check_complete(report, by_topic, acc)
    end)
  end

  # Nothing outside its windows; count the boundary ones.
  defp check_received(report, by_ticket, acc) do
    windows = Enum.group_by(report.windows, &elem(&1, 0))

    Enum.reduce(report.received, acc, fn {s, index}, acc ->
      case Map.fetch(by_ticket, s) do
        {:ok, {_id, ^index, e}} ->
          topic_windows = Map.get(windows, index, [])

          cond do
            Enum.any?(topic_windows, &inside?(&1, s, e)) ->
              acc

            Enum.any?(topic_windows, &(not outside?(&1, s, e))) ->
              %{acc | boundary: acc.boundary + 1}

            true ->
              violation = {:outside_windows, {s, e, index}, topic_windows}
              %{acc | violations: [{report.pid, violation} | acc.violations]}
          end

        other ->
          %{
            acc
            | violations: [{report.pid, {:unknown_message, s, index, other}} | acc.violations]
          }
      end
    end)
  end

  defp inside?({_, _a0, a1, b0, _b1}, s, e), do: a1 < s and e < b0

  defp outside?({_, a0, _a1, _b0, b1}, s, e), do: e < a0 or s > b1

  # Everything dispatched strictly inside a window arrived. Open windows have
  # b0 = :open, an atom, which compares greater than every ticket (integers sort first).
  defp check_complete(report, by_topic, acc) do
    got = MapSet.new(report.received, &elem(&1, 0))

    Enum.reduce(report.windows, acc, fn {index, _a0, a1, b0, _b1}, acc ->
      sorted = Map.get(by_topic, index, {})
      {must, missing} = inside(sorted, first_after(sorted, a1), b0, got, {0, []})
      acc = %{acc | must: acc.must + must}

      if missing == [],
        do: acc,
        else: %{acc | violations: [{report.pid, {:missing, index, missing}} | acc.violations]}
    end)
  end

  # Walks the dispatches with a1 < s < b0 (from index i on) and collects those with
  # e < b0 that did not arrive.
  defp inside(sorted, i, b0, got, {must, missing} = acc) do
    if i < tuple_size(sorted) and elem(elem(sorted, i), 0) < b0 do
      {s, e} = elem(sorted, i)

      acc =
        cond do
          e >= b0 -> acc
          MapSet.member?(got, s) -> {must + 1, missing}
          true -> {must + 1, [s | missing]}
        end

      inside(sorted, i + 1, b0, got, acc)
    else
      acc
    end
  end

  # Index of the first dispatch with s > ticket (binary search over the sorted tuple).
  defp first_after(sorted, ticket), do: first_after(sorted, ticket, 0, tuple_size(sorted))

  defp first_after(_sorted, _ticket, low, high) when low >= high, do: low

  defp first_after(sorted, ticket, low, high) do
    mid = div(low + high, 2)
    {s, _} = elem(sorted, mid)

    if s > ticket,
      do: first_after(sorted, ticket, low, mid),
      else: first_after(sorted, ticket, mid + 1, high)
  end

  defp other_delivery do
    if ExAtlas.Fly.Dispatcher.Config.delivery() == :dirty, do: :scheduler, else: :dirty
  end
end
