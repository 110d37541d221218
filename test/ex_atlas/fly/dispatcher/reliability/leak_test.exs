defmodule ExAtlas.Fly.Dispatcher.Reliability.LeakTest do
  # Item 3 of the reliability suite: subscribe-then-exit cycles must leave nothing behind,
  # neither in the registry nor in the NIF's heap, the BEAM or the OS process.
  use ExUnit.Case, async: false

  import ExAtlas.Test.Reliability

  alias ExAtlas.Fly.Dispatcher
  alias ExAtlas.Fly.Dispatcher.Backend.Registry, as: RegistryBackend

  @moduletag timeout: :infinity

  @topics for i <- 0..3, do: "leak:#{i}"
  # Processes alive at once; batches overlap, so monitors fire while others subscribe.
  @batch 1_000

  @short 50_000
  @soak 1_000_000

  test "#{@short} subscribe-then-exit cycles leave nothing behind" do
    soak(@short)
  end

  @tag :soak
  test "#{@soak} subscribe-then-exit cycles leave nothing behind (soak)" do
    soak(@soak)
  end

  defp soak(cycles) do
    # The warm-up brings every allocator (the NIF's hash maps, the BEAM's carriers, malloc's
    # arenas) to the size this load needs, so the comparison afterwards sees growth only.
    # Overlapping batches have at most three batches subscribed at once (one subscribing,
    # one exiting, one whose monitors have not all fired), so three at once reach the
    # NIF's hash-map capacity peak up front.
    peak = spawn_batch(3 * @batch)
    Enum.each(peak, &finish/1)
    await_gone(peak)
    run_cycles(max(div(cycles, 10), 5_000))
    before = measure()

    {churner, churned} = start_churner(div(cycles, 10))
    run_cycles(cycles)
    assert_receive {:churned, ^churner}, 600_000
    # A process that subscribed and unsubscribed many times is not monitored any more:
    # every NIF monitor was released (ERTS lists resources among the monitors). Monitors
    # and demonitors are signals the target handles later, hence the polling.
    eventually("the churner is no longer monitored by the NIF", fn ->
      {:monitored_by, by} = Process.info(churner, :monitored_by)
      by -- [self()] == []
    end)

    stats = await_empty_registry()
    after_run = measure()

    for topic <- @topics, do: assert(Dispatcher.count(topic) == 0)
    assert %{subscriptions: 0, subscribers: 0, monitors: 0, topics: 0} = stats
    kill_all([churner])

    growth = Map.new(after_run, fn {key, value} -> {key, value - before[key]} end)

    IO.puts(
      "\nleak #{cycles} cycles (+#{churned} subscribe/unsubscribe rounds): " <>
        "BEAM #{kb(before.beam)} -> #{kb(after_run.beam)}, " <>
        "RSS #{kb(before.rss)} -> #{kb(after_run.rss)}, " <>
        "NIF heap #{kb(before.nif)} -> #{kb(after_run.nif)} (bytes: #{growth.nif})"
    )

    # Tolerances, and why (a leak is per cycle, so it scales with `cycles`):
    # * NIF heap: exact byte count of the library's Rust allocations. What stays after the
    #   warm-up is hash-map capacity, which never shrinks and is already at its peak, so
    #   64 KiB is slack for a capacity step only; 8 leaked bytes a cycle would be 400 KB in
    #   the short run.
    # * BEAM: after a full garbage collection and the delayed frees of dead processes
    #   (`settled_beam_memory/0`) the noise measured stays under 600 KiB; 2 MiB + 16 bytes
    #   a cycle catches a leaked monitor or process entry (over 100 bytes each) in both runs.
    # * RSS: malloc and the BEAM keep freed pages in their pools, so RSS only shows gross
    #   leaks: 32 MiB + 64 bytes a cycle.
    assert growth.nif <= 64 * 1024, "NIF heap grew by #{growth.nif} bytes"
    assert growth.beam <= 2 * 1024 * 1024 + 16 * cycles, "BEAM memory grew by #{growth.beam}"

    if growth.rss != nil,
      do: assert(growth.rss <= 32 * 1024 * 1024 + 64 * cycles, "RSS grew by #{growth.rss}")
  end

  defp kb(nil), do: "n/a"
  defp kb(bytes), do: "#{div(bytes, 1024)} KiB"

  defp measure do
    await_empty_registry()
    collect_garbage()
    rss = rss_kb()

    %{
      beam: settled_beam_memory(),
      rss: rss && rss * 1024,
      nif: RegistryBackend.stats().allocated_bytes
    }
  end

  # The BEAM frees the structures of dead processes (and their monitors) only after every
  # scheduler has moved on, so memory keeps shrinking for a moment after the last exit:
  # the lowest of a few samples is what stays. A leak stays in every sample.
  defp settled_beam_memory do
    Enum.reduce(1..10, :erlang.memory(:total), fn _, low ->
      Process.sleep(20)
      min(low, :erlang.memory(:total))
    end)
  end

  # Cycles in overlapping batches: a batch subscribes while the previous one's monitors
  # are still firing.
  defp run_cycles(cycles) do
    previous =
      Enum.reduce(batches(cycles), [], fn size, previous ->
        pids = spawn_batch(size)
        await_gone(previous)
        Enum.each(pids, &finish/1)
        pids
      end)

    await_gone(previous)
  end

  defp batches(cycles) do
    full = List.duplicate(@batch, div(cycles, @batch))
    if rem(cycles, @batch) == 0, do: full, else: full ++ [rem(cycles, @batch)]
  end

  defp spawn_batch(size) do
    parent = self()

    pids =
      for i <- 1..size do
        {pid, ref} = spawn_monitor(fn -> cycle(parent, i) end)
        {pid, ref, i}
      end

    for {pid, _, _} <- pids do
      receive do
        {:subscribed, ^pid} -> :ok
      after
        60_000 -> flunk("a cycle process did not subscribe")
      end
    end

    pids
  end

  # One cycle: one to three subscriptions, duplicates included, then one of three ends.
  defp cycle(parent, i) do
    subscriptions = for _ <- 1..(1 + rem(i, 3)), do: Enum.random(@topics)
    Enum.each(subscriptions, &(:ok = Dispatcher.subscribe(&1)))
    send(parent, {:subscribed, self()})

    receive do
      :exit -> :ok
      :unsubscribe_then_exit -> Enum.each(subscriptions, &(:ok = Dispatcher.unsubscribe(&1)))
    end
  end

  defp finish({pid, _ref, i}) do
    case rem(i, 3) do
      0 -> send(pid, :exit)
      1 -> Process.exit(pid, :kill)
      2 -> send(pid, :unsubscribe_then_exit)
    end
  end

  defp await_gone(pids) do
    for {pid, ref, _} <- pids do
      receive do
        {:DOWN, ^ref, :process, ^pid, _} -> :ok
      after
        60_000 -> flunk("a cycle process did not exit")
      end
    end
  end

  # A long-lived process that subscribes (with a duplicate) and unsubscribes `rounds`
  # times, then reports who still monitors it.
  defp start_churner(rounds) do
    parent = self()

    pid =
      spawn_link(fn ->
        for round <- 1..rounds do
          topic = Enum.at(@topics, rem(round, length(@topics)))
          :ok = Dispatcher.subscribe(topic)
          :ok = Dispatcher.subscribe(topic)
          :ok = Dispatcher.unsubscribe(topic)
        end

        send(parent, {:churned, self()})

        receive do
          :never -> :ok
        end
      end)

    {pid, rounds}
  end
end
