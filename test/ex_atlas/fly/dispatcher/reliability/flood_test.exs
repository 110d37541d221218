defmodule ExAtlas.Fly.Dispatcher.Reliability.FloodTest do
  # Item 4 of the reliability suite: one producer dispatches as fast as it can to 10 000
  # subscribers. The bounded queues must slow it down to the pace of delivery, hold no
  # more than their capacity, lose nothing, and keep memory bounded.
  use ExUnit.Case, async: false

  import ExAtlas.Test.Reliability
  import ExAtlas.Test.FlyEnv, only: [restart_app: 1]

  alias ExAtlas.Fly.Dispatcher

  @moduletag timeout: :infinity

  @subscribers 10_000
  @topic "flood"
  @sample_ms 5

  test "1 s flood to #{@subscribers} subscribers, queue capacity 64" do
    flood(1_000, 64)
  end

  @tag :soak
  test "5 s flood to #{@subscribers} subscribers, default queue capacity (soak)" do
    flood(5_000, nil)
  end

  defp flood(duration, capacity) do
    restart_app(if capacity, do: [queue_capacity: capacity], else: [])
    start = stats()
    %{lanes: lanes, queue_capacity: capacity, delivered_batches: delivered0} = start

    subscribers = spawn_ready(@subscribers, &count_loop/1)
    # 10 000 pids land in every partition, so each dispatch is one batch per lane.
    assert Dispatcher.count(@topic) == @subscribers

    collect_garbage()
    rss0 = rss_kb()
    reset_peak_rss()

    dispatched = :atomics.new(1, signed: false)
    parent = self()
    sampler = spawn_link(fn -> sample(parent, dispatched, []) end)

    producer =
      spawn_link(fn ->
        deadline = System.monotonic_time(:millisecond) + duration
        produce(dispatched, deadline, 1)
        :ok = Dispatcher.sync()
        send(parent, {:produced, self()})
      end)

    assert_receive {:produced, ^producer}, 600_000
    send(sampler, {:stop, self()})
    assert_receive {:samples, samples}, 10_000
    total = :atomics.get(dispatched, 1)
    peak_rss = Enum.max([rss0 | for(s <- samples, s.rss, do: s.rss)])
    hwm = proc_status_kb("VmHWM")

    # Everything the producer dispatched before its sync is in the mailboxes; :report
    # arrives behind it.
    for pid <- subscribers, do: send(pid, {:report, self()})

    counts =
      for pid <- subscribers do
        assert_receive {:counted, ^pid, count, in_order?}, 60_000
        assert in_order?, "#{inspect(pid)} got the flood out of order"
        count
      end

    kill_all(subscribers)

    IO.puts(
      "\nflood #{duration} ms, #{lanes} lanes x capacity #{capacity}: #{total} dispatches, " <>
        "#{Enum.sum(counts)} deliveries, #{length(samples)} samples, max queued " <>
        "#{Enum.max(for s <- samples, do: s.max_queued)}, most ahead " <>
        "#{Enum.max(for s <- samples, do: ahead(s, lanes, delivered0))} dispatches; RSS " <>
        "#{rss0} kB -> peak #{peak_rss} kB sampled, VmHWM #{hwm} kB"
    )

    # Every message delivered, once per subscriber.
    assert Enum.all?(counts, &(&1 == total)),
           "deliveries per subscriber: #{inspect(Enum.frequencies(counts))}, dispatched #{total}"

    for sample <- samples do
      # No lane ever has more than its bound of batches queued or being delivered...
      assert sample.max_queued <= capacity, "max_queued #{sample.max_queued}"
      assert sample.queued <= lanes * capacity, "queued #{sample.queued}"
      # ...so the producer is never more than a lane's capacity ahead of the deliveries:
      # dispatch n returns once each lane took a credit for it, and a credit comes back
      # only when its batch is delivered. Without the bound it would be thousands of
      # dispatches ahead after the first millisecond.
      assert ahead(sample, lanes, delivered0) <= capacity,
             "producer #{ahead(sample, lanes, delivered0)} dispatches ahead: #{inspect(sample)}"
    end

    # The flood did fill the queues, so the bound above was tested, not idle.
    assert Enum.any?(samples, &(&1.max_queued == capacity))

    # Peak RSS above the start (the 10 000 subscribers already counted there): measured
    # 10-20 MB, the in-flight batches plus messages waiting in mailboxes. An unbounded
    # queue would grow by what the producer can dispatch beyond the delivery pace,
    # hundreds of thousands of dispatches a second, each a message copy and a batch
    # (about 100 bytes): over 50 MB a second. 64 MiB tells the two apart.
    assert peak_rss - rss0 <= 64 * 1024, "RSS grew by #{peak_rss - rss0} kB"
    if hwm_reset?(), do: assert(hwm - rss0 <= 64 * 1024, "VmHWM #{hwm} kB")
  end

  # Dispatches returned but not yet delivered: the producer's count, read before the
  # stats, against the batches delivered over all lanes (one batch per lane a dispatch).
  defp ahead(sample, lanes, delivered0) do
    sample.dispatched - div(sample.delivered - delivered0, lanes)
  end

  defp produce(dispatched, deadline, n) do
    if System.monotonic_time(:millisecond) < deadline do
      :ok = Dispatcher.dispatch(@topic, {:flood, n})
      :atomics.put(dispatched, 1, n)
      produce(dispatched, deadline, n + 1)
    end
  end

  defp sample(parent, dispatched, samples) do
    receive do
      {:stop, ^parent} -> send(parent, {:samples, Enum.reverse(samples)})
    after
      @sample_ms ->
        # Read the producer's count first: the stats read after it can only be later.
        count = :atomics.get(dispatched, 1)
        stats = stats()

        sample = %{
          dispatched: count,
          delivered: stats.delivered_batches,
          queued: stats.in_flight,
          max_queued: stats.max_in_flight,
          rss: rss_kb()
        }

        sample(parent, dispatched, [sample | samples])
    end
  end

  defp count_loop(ready) do
    :ok = Dispatcher.subscribe(@topic)
    ready.()
    count_loop(0, true)
  end

  defp count_loop(count, in_order?) do
    receive do
      {:flood, n} ->
        count_loop(count + 1, in_order? and n == count + 1)

      {:report, from} ->
        send(from, {:counted, self(), count, in_order?}) && count_loop(count, in_order?)
    end
  end

  # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux 4.0+), so VmHWM after
  # the flood is the flood's own peak.
  defp reset_peak_rss do
    Process.put(:hwm_reset, File.write("/proc/self/clear_refs", "5") == :ok)
  end

  defp hwm_reset?, do: Process.get(:hwm_reset, false)
end
