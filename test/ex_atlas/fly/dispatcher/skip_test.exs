defmodule ExAtlas.Fly.Dispatcher.SkipTest do
  # subscribe_with_backpressure/2 with `on_slow: :skip`: the skipped count, order across
  # skip and resume, one notice per episode, cleanup, telemetry and stats, off-heap
  # subscribers in forced buffered mode, bad values and the other modes. The slow state
  # is forced: the watchdog is suspended while a subscriber's mailbox is filled past the
  # threshold, so its next poll sees exactly that mailbox. The module counts what the
  # (single) watchdog and skip table hold, so it runs alone.
  use ExUnit.Case, async: false

  import ExAtlas.Test.Commanded
  import ExAtlas.Test.FlyEnv
  import ExAtlas.Test.SlowSubscribers
  import ExAtlas.Test.Replay, only: [drain: 0]

  alias ExAtlas.Fly.Dispatcher
  alias ExAtlas.Fly.Dispatcher.Backend.Registry, as: RegistryBackend
  alias ExAtlas.Fly.Dispatcher.Watchdog
  alias ExAtlas.Test.BufferedSignals
  alias ExAtlas.Test.LogForwarder
  alias ExAtlas.Test.TelemetryStandIn

  @moduletag :capture_log

  @skip_event [:ex_atlas, :fly, :dispatcher, :skip]
  @fallback_text "[ExAtlas.Fly.Dispatcher] subscribe_with_backpressure/2 only works in " <>
                   ":registry mode; falling back to plain subscribe/1"

  # A subscriber that only runs the test's commands, so its mailbox grows meanwhile.
  defp spawn_slow(topics, opts) do
    spawn_commanded(fn ->
      for topic <- List.wrap(topics),
          do: :ok = Dispatcher.subscribe_with_backpressure(topic, opts)
    end)
  end

  defp take(0), do: []

  defp take(count) do
    receive do
      message -> [message | take(count - 1)]
    end
  end

  defp await_polls(pid, topic, more) do
    %{polls: start} = Watchdog.watch_info(pid, topic)
    eventually(fn -> Watchdog.watch_info(pid, topic).polls >= start + more end)
  end

  # Empties `pid`'s mailbox (returning it) and waits until the watchdog stopped skipping.
  defp drain_until_resumed(pid, topic) do
    messages = run_in(pid, fn -> drain() end)
    eventually(fn -> not Watchdog.watch_info(pid, topic).skipping end)
    messages
  end

  defp skip_stats, do: Map.take(RegistryBackend.stats(), [:skipping, :skipped, :skip_entries])

  describe "in :registry mode" do
    for {path, extra} <- [inline: 0, lanes: 20] do
      test "#{path}: the notice counts exactly what was skipped, once per episode, in order" do
        topic = unique_topic("skip_exact_#{unquote(path)}")
        idle_subscribers(topic, unquote(extra))
        before = skip_stats()
        pid = spawn_slow(topic, on_slow: :skip, threshold: 20, poll_ms: 10)
        %{deliveries: delivered_before} = RegistryBackend.stats()

        # Episode 1: 30 fill the mailbox past the threshold, 50 are skipped.
        fill_until_skipping(pid, topic, 1..30)
        assert skip_stats().skipping == before.skipping + 1
        dispatch_range(topic, 31..80)
        # Down to 15, at or below the threshold but above its half: skipping goes on.
        assert run_in(pid, fn -> take(15) end) == for(n <- 1..15, do: {:n, n})
        await_polls(pid, topic, 3)
        assert Watchdog.watch_info(pid, topic).skipping
        assert drain_until_resumed(pid, topic) == for(n <- 16..30, do: {:n, n})
        assert skip_stats().skipping == before.skipping
        assert skip_stats().skipped == before.skipped + 50
        dispatch_range(topic, 81..90)

        # Episode 2: what is there and 25 more fill it again, 7 are skipped.
        fill_until_skipping(pid, topic, 91..115)
        dispatch_range(topic, 116..122)

        assert drain_until_resumed(pid, topic) ==
                 [{:ex_atlas_fly_gap, topic, 50} | for(n <- 81..115, do: {:n, n})]

        dispatch_range(topic, 123..130)

        assert run_in(pid, fn -> drain() end) ==
                 [{:ex_atlas_fly_gap, topic, 7} | for(n <- 123..130, do: {:n, n})]

        # One notice per episode: none with the next message.
        dispatch_range(topic, 131..131)
        assert run_in(pid, fn -> drain() end) == [{:n, 131}]
        assert skip_stats().skip_entries == before.skip_entries
        # `deliveries` counts real sends only: 131 to each idle subscriber, 131 - 57 to pid.
        assert RegistryBackend.stats().deliveries - delivered_before ==
                 unquote(extra) * 131 + 131 - 57

        Process.exit(pid, :kill)
      end
    end

    test "the notice comes before the first message after the gap, with the exact count" do
      topic = unique_topic("skip_count")
      pid = spawn_slow(topic, on_slow: :skip, threshold: 10, poll_ms: 10)
      fill_until_skipping(pid, topic, 1..11)
      dispatch_range(topic, 12..40)
      assert length(drain_until_resumed(pid, topic)) == 11
      dispatch_range(topic, 41..45)
      # A second episode with its own count.
      fill_until_skipping(pid, topic, 46..56)
      dispatch_range(topic, 57..59)
      first = drain_until_resumed(pid, topic)
      dispatch_range(topic, 60..61)
      messages = first ++ run_in(pid, fn -> drain() end)

      numbers = for {:n, n} <- messages, do: n
      gaps = for {:ex_atlas_fly_gap, ^topic, missed} <- messages, do: missed
      # What the notices count is exactly what did not arrive.
      assert Enum.sum(gaps) == 61 - 11 - length(numbers)
      assert gaps == [29, 3]

      assert messages ==
               [{:ex_atlas_fly_gap, topic, 29}] ++
                 for(n <- 41..56, do: {:n, n}) ++
                 [{:ex_atlas_fly_gap, topic, 3}, {:n, 60}, {:n, 61}]

      Process.exit(pid, :kill)
    end

    test "several subscriptions to the topic: counted once per dispatch" do
      topic = unique_topic("skip_twice")
      opts = [on_slow: :skip, threshold: 20, poll_ms: 10]
      pid = spawn_slow([topic, topic], opts)
      assert Dispatcher.count(topic) == 2
      fill_until_skipping(pid, topic, 1..15)
      dispatch_range(topic, 16..40)
      assert length(drain_until_resumed(pid, topic)) == 30
      dispatch_range(topic, 41..41)

      assert run_in(pid, fn -> drain() end) ==
               [{:ex_atlas_fly_gap, topic, 25}, {:n, 41}, {:n, 41}]

      Process.exit(pid, :kill)
    end

    test "skipping is per topic: the subscriber's other topics are delivered" do
      topic = unique_topic("skip_slow")
      other = unique_topic("skip_other")
      pid = spawn_slow(topic, on_slow: :skip, threshold: 10, poll_ms: 10)
      run_in(pid, fn -> Dispatcher.subscribe(other) end)
      fill_until_skipping(pid, topic, 1..11)
      dispatch_range(topic, 12..13)
      :ok = Dispatcher.dispatch(other, :still_sent)
      :ok = Dispatcher.sync()
      received = drain_until_resumed(pid, topic)
      assert List.last(received) == :still_sent
      assert length(received) == 12
      Process.exit(pid, :kill)
    end

    test "unsubscribing or dying while skipping or owing a notice leaves nothing behind" do
      topic = unique_topic("skip_cleanup")
      base = skip_stats()

      # Unsubscribe while skipping, then while owing a notice: a new subscription of the
      # same process gets no notice, and the table is back where it was.
      pid = spawn_slow(topic, on_slow: :skip, threshold: 10, poll_ms: 10)
      fill_until_skipping(pid, topic, 1..11)
      dispatch_range(topic, 12..14)
      run_in(pid, fn -> Dispatcher.unsubscribe(topic) end)
      assert %{skipping: s, skip_entries: e} = skip_stats()
      assert {s, e} == {base.skipping, base.skip_entries}

      run_in(pid, fn -> Dispatcher.subscribe_with_backpressure(topic, on_slow: :skip) end)
      run_in(pid, fn -> drain() end)
      dispatch_range(topic, 15..15)
      assert run_in(pid, fn -> drain() end) == [{:n, 15}]

      run_in(pid, fn -> Dispatcher.unsubscribe(topic) end)
      opts = [on_slow: :skip, threshold: 10, poll_ms: 10]
      run_in(pid, fn -> Dispatcher.subscribe_with_backpressure(topic, opts) end)
      fill_until_skipping(pid, topic, 16..26)
      dispatch_range(topic, 27..27)
      drain_until_resumed(pid, topic)
      assert skip_stats().skip_entries == base.skip_entries + 1
      run_in(pid, fn -> Dispatcher.unsubscribe(topic) end)
      assert skip_stats().skip_entries == base.skip_entries

      # Death while skipping: the watchdog's :DOWN clears the entry.
      dead = spawn_slow(topic, on_slow: :skip, threshold: 10, poll_ms: 10)
      fill_until_skipping(dead, topic, 28..38)
      dispatch_range(topic, 39..40)
      ref = Process.monitor(dead)
      Process.exit(dead, :kill)
      assert_receive {:DOWN, ^ref, :process, ^dead, :killed}, 5_000
      eventually(fn -> Watchdog.watch_info(dead, topic) == nil end)
      assert %{skipping: s, skip_entries: e} = skip_stats()
      assert {s, e} == {base.skipping, base.skip_entries}
      assert Dispatcher.count(topic) == 0
      Process.exit(pid, :kill)
    end

    test "telemetry reports each start and stop; stats/0 the skipping and the skipped" do
      define_telemetry()
      TelemetryStandIn.capture([@skip_event])
      topic = unique_topic("skip_telemetry")
      before = Dispatcher.stats()
      pid = spawn_slow(topic, on_slow: :skip, threshold: 10, poll_ms: 10)
      fill_until_skipping(pid, topic, 1..12)

      assert_receive {:telemetry, @skip_event, %{queue_len: 12, skipped: 0}, meta}, 5_000
      assert meta == %{topic: topic, subscriber: pid, phase: :start, on_slow: :skip}
      assert Dispatcher.stats().skipping == before.skipping + 1
      dispatch_range(topic, 13..16)
      assert Dispatcher.stats().skipped == before.skipped + 4
      drain_until_resumed(pid, topic)

      assert_receive {:telemetry, @skip_event, %{queue_len: 0, skipped: 4}, meta}, 5_000
      assert meta == %{topic: topic, subscriber: pid, phase: :stop, on_slow: :skip}
      assert Dispatcher.stats().skipping == before.skipping
      Process.exit(pid, :kill)
    end

    test "off-heap, buffered: the notice precedes its sender's next message, order per producer" do
      topic = unique_topic("skip_buffered")
      opts = [on_slow: :skip, threshold: 10, poll_ms: 10]
      subscribe = &Dispatcher.subscribe_with_backpressure(&1, opts)
      sub = BufferedSignals.start_subscriber([topic], off_heap: true, subscribe: subscribe)
      assert Dispatcher.count(topic) == 1
      dog = Process.whereis(Watchdog)

      # Held, it fetches nothing: 11 from P1 fill it past the threshold.
      :ok = BufferedSignals.hold(sub)
      :ok = :sys.suspend(dog)

      steps = fn producer, range ->
        for(n <- range, do: {:dispatch, topic, {producer, n}}) ++ [:sync]
      end

      BufferedSignals.produce(steps.(:p1, 1..11))
      :ok = :sys.resume(dog)
      eventually(fn -> Watchdog.watch_info(sub.pid, topic).skipping end)

      # Skipped: 9 from P1, 10 from P2.
      BufferedSignals.produce(steps.(:p1, 12..20))
      BufferedSignals.produce(steps.(:p2, 1..10))
      BufferedSignals.release(sub)
      assert BufferedSignals.collect(sub, 11) == for(n <- 1..11, do: {:p1, n})
      eventually(fn -> not Watchdog.watch_info(sub.pid, topic).skipping end)

      # After the gap, held again and no poll to flush its buffers: P1 sends first (so
      # the notice), then P2, each a fresh process.
      :ok = :sys.suspend(dog)
      :ok = BufferedSignals.hold(sub)
      BufferedSignals.produce(steps.(:p1, 21..25))
      BufferedSignals.produce(steps.(:p2, 11..15))
      BufferedSignals.release(sub)
      messages = BufferedSignals.collect(sub, 11)
      :ok = :sys.resume(dog)

      assert Enum.count(messages) == 11
      assert [19] == for({:ex_atlas_fly_gap, ^topic, missed} <- messages, do: missed)
      # The notice's sender's own message comes after it; each producer's in order.
      gap_at = Enum.find_index(messages, &match?({:ex_atlas_fly_gap, _, _}, &1))
      assert gap_at < Enum.find_index(messages, &(&1 == {:p1, 21}))
      assert for({:p1, n} <- messages, do: n) == Enum.to_list(21..25)
      assert for({:p2, n} <- messages, do: n) == Enum.to_list(11..15)

      BufferedSignals.stop(sub)
      eventually(fn -> Dispatcher.count(topic) == 0 end)
    end
  end

  describe "bad values and the other modes" do
    test "on_slow must be :evict, :skip or :catch_up; the error names the value" do
      topic = unique_topic("skip_bad")

      for bad <- [:skipp, "skip", nil, {:skip}, :catchup] do
        error =
          assert_raise ArgumentError, fn ->
            Dispatcher.subscribe_with_backpressure(topic, on_slow: bad)
          end

        assert error.message =~ ":on_slow"
        assert error.message =~ "got: #{inspect(bad)}"
      end

      assert Dispatcher.count(topic) == 0
      assert Watchdog.watch_info(self(), topic) == nil
      assert :ok = Dispatcher.subscribe_with_backpressure(topic, on_slow: :evict)
      assert %{on_slow: :evict} = Watchdog.watch_info(self(), topic)
      assert :ok = Dispatcher.subscribe_with_backpressure(topic)
      assert %{on_slow: :evict, skipping: false} = Watchdog.watch_info(self(), topic)
      :ok = Dispatcher.unsubscribe(topic)
    end

    test "{:mfa, _} and :phoenix_pubsub: a plain subscribe and the warning" do
      :ok = LogForwarder.forward_to_test()

      # The warning comes once per start of the application: forget the ones said so far.
      true = :ets.delete_all_objects(ExAtlas.Fly.Dispatcher.Warnings)
      put_fly(dispatcher: {:mfa, {ExAtlas.Test.Sink, :drop, []}})
      topic = unique_topic("skip_mfa")
      assert :ok = Dispatcher.subscribe_with_backpressure(topic, on_slow: :skip)
      assert_receive {:log, %{level: :warning, meta: %{topic: ^topic}} = event}, 5_000

      assert String.starts_with?(
               :unicode.characters_to_binary(elem(event.msg, 1)),
               @fallback_text
             )

      assert Watchdog.watch_info(self(), topic) == nil

      assert_raise ArgumentError, ~r/:on_slow.*got: :later/, fn ->
        Dispatcher.subscribe_with_backpressure(topic, on_slow: :later)
      end

      define_phoenix_pubsub(:skip_test_pubsub)
      put_fly(dispatcher: :phoenix_pubsub, pubsub: :skip_test_pubsub)
      topic = unique_topic("skip_pubsub")
      assert :ok = Dispatcher.subscribe_with_backpressure(topic, on_slow: :skip)
      assert_receive {:log, %{level: :warning, meta: %{topic: ^topic}}}, 5_000
      assert [{pid, _}] = Registry.lookup(:skip_test_pubsub, topic)
      assert pid == self()
    end
  end
end
