defmodule ExAtlas.Fly.Dispatcher.CatchUpTest do
  # subscribe_with_backpressure/2 with `on_slow: :catch_up`: a subscriber that is behind is
  # parked, what is dispatched meanwhile waits in the history, and catch_up/1 delivers it
  # in order, once, with a gap notice only for what the history no longer held. The slow
  # state is forced as in skip_test.exs (the watchdog suspended while the mailbox fills);
  # the property test runs producers throughout. The module restarts the application with
  # its own settings, so it runs alone.
  use ExUnit.Case, async: false

  import ExAtlas.Test.Commanded
  import ExAtlas.Test.FlyEnv
  import ExAtlas.Test.SlowSubscribers
  import ExAtlas.Test.Replay, only: [account: 3, drain: 0, split_gaps: 1]

  alias ExAtlas.Fly.Dispatcher
  alias ExAtlas.Fly.Dispatcher.Backend.Registry, as: RegistryBackend
  alias ExAtlas.Fly.Dispatcher.Native
  alias ExAtlas.Fly.Dispatcher.Watchdog
  alias ExAtlas.Test.BufferedSignals
  alias ExAtlas.Test.LogForwarder
  alias ExAtlas.Test.TelemetryStandIn

  @moduletag :capture_log
  @moduletag timeout: 300_000

  @skip_event [:ex_atlas, :fly, :dispatcher, :skip]

  setup do
    restart_app(replay: 100_000, replay_memory: 256 * 1024 * 1024)
    :ok
  end

  defp spawn_slow(topic, opts) do
    spawn_commanded(fn -> :ok = Dispatcher.subscribe_with_backpressure(topic, opts) end)
  end

  defp fill_until_parked(pid, topic, range) do
    fill_until_skipping(pid, topic, range)
    eventually(fn -> RegistryBackend.stats().replay_parked == 1 end)
  end

  # Waits in `pid` for `{:ex_atlas_fly_behind, topic}` (taken out of its mailbox).
  defp await_notice(pid, topic) do
    notice =
      run_in(pid, fn ->
        receive do
          {:ex_atlas_fly_behind, ^topic} -> :ok
        after
          5_000 -> :no_notice
        end
      end)

    assert notice == :ok
  end

  # A `:catch_up` subscriber of `topic` (beside 20 idle ones, so dispatches go through
  # the lanes), parked between dispatch 1 and dispatch 2 while the lanes' senders are
  # suspended with dispatch 1 in hand, and told to catch up: still waiting for
  # dispatch 1 200 ms later. Returns it and the suspended senders.
  defp catching_up_behind_held_senders(topic) do
    idle_subscribers(topic, 20)
    pid = spawn_slow(topic, on_slow: :catch_up, threshold: 1_000, poll_ms: 1_000)
    senders = Native.senders(RegistryBackend.dispatcher!())
    for sender <- senders, do: :ok = :sys.suspend(sender)
    :ok = Dispatcher.dispatch(topic, {:n, 1})
    assert RegistryBackend.park(topic, pid)
    :ok = Dispatcher.dispatch(topic, {:n, 2})

    send(pid, {:run, fn -> {Dispatcher.catch_up(topic), drain()} end})
    refute_receive {:ran, ^pid, _}, 200
    {pid, senders}
  end

  # Runs `fun` with the watchdog held: what catch_up/1 brings may put the mailbox past
  # the threshold until it is read, and a poll then would park the subscriber again.
  defp with_watchdog_held(fun) do
    dog = Process.whereis(Watchdog)
    :ok = :sys.suspend(dog)

    try do
      fun.()
    after
      :ok = :sys.resume(dog)
    end
  end

  # Waits in `pid` for the watchdog's notice, then has it catch up and returns its
  # mailbox.
  defp catch_up_on_notice(pid, topic) do
    await_notice(pid, topic)

    with_watchdog_held(fn ->
      run_in(pid, fn ->
        :ok = Dispatcher.catch_up(topic)
        drain()
      end)
    end)
  end

  defp figures do
    Map.take(RegistryBackend.stats(), [
      :skipping,
      :replay_joiners,
      :replay_parked,
      :replay_monitors,
      :monitors,
      :subscriptions
    ])
  end

  describe "in :registry mode" do
    for {path, extra} <- [inline: 0, lanes: 20] do
      test "#{path}: parked, it misses nothing, and catch_up/1 brings it all, in order" do
        topic = unique_topic("catch_up_#{unquote(path)}")
        idle_subscribers(topic, unquote(extra))
        pid = spawn_slow(topic, on_slow: :catch_up, threshold: 20, poll_ms: 10)
        assert Dispatcher.count(topic) == unquote(extra) + 1

        fill_until_parked(pid, topic, 1..30)
        # Parked: out of the registry; what follows waits in the history.
        assert Dispatcher.count(topic) == unquote(extra)
        assert RegistryBackend.stats().skipping == 1
        dispatch_range(topic, 31..80)

        # It reads its mailbox (the 30 from before), recovers, is told, and catches up.
        assert run_in(pid, fn -> drain() end) == for(n <- 1..30, do: {:n, n})
        assert catch_up_on_notice(pid, topic) == for(n <- 31..80, do: {:n, n})
        assert Dispatcher.count(topic) == unquote(extra) + 1
        assert %{skipping: 0, replay_parked: 0, replay_joiners: 0} = figures()

        # Live again, and a second episode works the same.
        dispatch_range(topic, 81..90)
        assert run_in(pid, fn -> drain() end) == for(n <- 81..90, do: {:n, n})
        fill_until_parked(pid, topic, 91..115)
        dispatch_range(topic, 116..120)
        assert run_in(pid, fn -> drain() end) == for(n <- 91..115, do: {:n, n})

        assert catch_up_on_notice(pid, topic) ==
                 for(n <- 116..120, do: {:n, n})

        Process.exit(pid, :kill)
      end
    end

    test "catch_up/2 with :max: that many at a time, each batch followed by its notice" do
      topic = unique_topic("catch_up_max")
      pid = spawn_slow(topic, on_slow: :catch_up, threshold: 10, poll_ms: 10)
      fill_until_parked(pid, topic, 1..11)
      dispatch_range(topic, 12..111)
      assert length(run_in(pid, fn -> drain() end)) == 11

      # The first notice from the watchdog; then each batch brings the next, until the
      # last brings none and it is back in the registry.
      await_notice(pid, topic)

      batches =
        with_watchdog_held(fn ->
          Enum.map(1..5, fn _ ->
            run_in(pid, fn -> {Dispatcher.catch_up(topic, max: 30), drain()} end)
          end)
        end)

      behind = {:ex_atlas_fly_behind, topic}

      assert batches == [
               {:ok, for(n <- 12..41, do: {:n, n}) ++ [behind]},
               {:ok, for(n <- 42..71, do: {:n, n}) ++ [behind]},
               {:ok, for(n <- 72..101, do: {:n, n}) ++ [behind]},
               {:ok, for(n <- 102..111, do: {:n, n})},
               {:ok, []}
             ]

      assert Dispatcher.count(topic) == 1
      dispatch_range(topic, 112..113)
      assert run_in(pid, fn -> drain() end) == [{:n, 112}, {:n, 113}]
      Process.exit(pid, :kill)
    end

    test "what the history no longer holds is told, exactly, in its place" do
      # 64 KiB of history: a joiner may hold a sixteenth of it, so most of what a parked
      # subscriber misses goes, and is told; the newest stay.
      restart_app(replay: 100_000, replay_memory: 64 * 1024)
      topic = unique_topic("catch_up_cut")
      pid = spawn_slow(topic, on_slow: :catch_up, threshold: 10, poll_ms: 10)
      fill_until_parked(pid, topic, 1..11)
      dispatch_range(topic, 12..2_000)
      assert length(run_in(pid, fn -> drain() end)) == 11
      got = catch_up_on_notice(pid, topic)
      {gaps, messages} = split_gaps(got)
      assert [_ | _] = gaps, "64 KiB cannot keep 1 989 messages for it"
      assert Enum.sum(gaps) + length(messages) == 2_000 - 11
      numbers = for {:n, n} <- messages, do: n
      assert numbers == Enum.sort(numbers) and List.last(numbers) == 2_000
      # Each notice sits at its gap: the numbers around it differ by what it tells.
      assert hd(got) == {:ex_atlas_fly_gap, topic, hd(numbers) - 12}
      Process.exit(pid, :kill)
    end

    test "catch_up/1 waits for what was dispatched before the park, still in a lane" do
      # The lanes' senders hold a dispatch from before the park (suspended); the
      # subscriber asks to catch up meanwhile: it must not send itself the later dispatch
      # first, as that would put one producer's messages out of order.
      topic = unique_topic("catch_up_barrier")
      {pid, senders} = catching_up_behind_held_senders(topic)
      for sender <- senders, do: :ok = :sys.resume(sender)
      assert_receive {:ran, ^pid, {:ok, [{:n, 1}, {:n, 2}]}}, 5_000
      Process.exit(pid, :kill)
    end

    test "catch_up/1 waiting on a dispatch whose senders are killed goes on; the loss is counted" do
      # As above, but the senders holding the dispatch from before the park die (:kill,
      # no terminate): their reclaim lets the dispatch go, so the catch-up is not held
      # for ever, and what they had not delivered is counted lost, as for any subscriber.
      topic = unique_topic("catch_up_senders_killed")
      lost_before = RegistryBackend.stats().lost_deliveries
      {pid, senders} = catching_up_behind_held_senders(topic)
      for sender <- senders, do: Process.exit(sender, :kill)
      assert_receive {:ran, ^pid, {:ok, got}}, 5_000

      # Both dispatches died in the senders' mailboxes: dispatch 1 to 21 subscribers
      # (this one among them), dispatch 2 to the 20 others. Dispatch 2, kept for this
      # one, came to it from the history.
      assert got == [{:n, 2}]
      eventually(fn -> RegistryBackend.stats().lost_deliveries - lost_before == 21 + 20 end)
      assert Dispatcher.count(topic) == 21
      Process.exit(pid, :kill)
    end

    test "unsubscribing or exiting while parked leaves nothing behind" do
      topic = unique_topic("catch_up_leave")
      before = figures()

      for leave <- [:unsubscribe, :exit] do
        pid = spawn_slow(topic, on_slow: :catch_up, threshold: 10, poll_ms: 10)
        fill_until_parked(pid, topic, 1..11)
        dispatch_range(topic, 12..20)

        case leave do
          :unsubscribe -> run_in(pid, fn -> Dispatcher.unsubscribe(topic) end)
          :exit -> Process.exit(pid, :kill)
        end

        eventually(fn -> figures() == before end)
        eventually(fn -> Watchdog.watch_info(pid, topic) == nil end)
        if leave == :unsubscribe, do: assert(run_in(pid, fn -> drain() end) |> length() == 11)
        Process.exit(pid, :kill)
      end

      # The topic tracks nothing more: its log went with its last watch.
      dispatch_range(topic, 21..30)
      assert Dispatcher.count(topic) == 0
    end

    test "telemetry at the park and at the notice; stats/0 counts it skipping meanwhile" do
      define_telemetry()
      TelemetryStandIn.capture([@skip_event])
      topic = unique_topic("catch_up_telemetry")
      pid = spawn_slow(topic, on_slow: :catch_up, threshold: 10, poll_ms: 10)
      fill_until_parked(pid, topic, 1..12)

      assert_receive {:telemetry, @skip_event, %{queue_len: 12, skipped: 0}, meta}
      assert meta == %{topic: topic, subscriber: pid, phase: :start, on_slow: :catch_up}
      assert Dispatcher.stats().skipping == 1
      assert length(run_in(pid, fn -> drain() end)) == 12

      assert_receive {:telemetry, @skip_event, %{queue_len: 0, skipped: 0}, meta}
      assert meta == %{topic: topic, subscriber: pid, phase: :stop, on_slow: :catch_up}
      # Told, not yet caught up: still parked.
      assert Dispatcher.stats().skipping == 1
      assert catch_up_on_notice(pid, topic) == []
      assert Dispatcher.stats().skipping == 0
      Process.exit(pid, :kill)
    end

    test "a watchdog killed while a subscriber is parked: its successor tells it to catch up" do
      topic = unique_topic("catch_up_dog_killed")
      pid = spawn_slow(topic, on_slow: :catch_up, threshold: 10, poll_ms: 10)
      # Watched the same way, never behind: not parked, so not told.
      calm = spawn_slow(topic, on_slow: :catch_up, threshold: 1_000, poll_ms: 10)
      fill_until_parked(pid, topic, 1..11)
      dispatch_range(topic, 12..20)
      dog = Process.whereis(Watchdog)
      Process.exit(dog, :kill)
      eventually(fn -> Process.whereis(Watchdog) not in [nil, dog] end)

      # The notice comes from the new watchdog, at its start. Read first, so that what
      # catch_up/1 brings stays below the threshold and no poll parks it again.
      await_notice(pid, topic)
      assert run_in(pid, fn -> drain() end) == for(n <- 1..11, do: {:n, n})
      # The new watchdog has started (and sent every notice it sends at its start).
      _ = :sys.get_state(Watchdog)
      assert run_in(calm, fn -> drain() end) == for(n <- 1..20, do: {:n, n})

      assert run_in(pid, fn -> {Dispatcher.catch_up(topic), drain()} end) ==
               {:ok, for(n <- 12..20, do: {:n, n})}

      assert Dispatcher.count(topic) == 2
      Process.exit(pid, :kill)
      Process.exit(calm, :kill)
    end

    test "the server killed while a subscriber is parked: it stays parked and misses nothing" do
      # The registry, and with it the parking, outlives the server (and the senders that
      # stop with it); the restarted server adopts it.
      topic = unique_topic("catch_up_server_killed")
      idle_subscribers(topic, 20)
      pid = spawn_slow(topic, on_slow: :catch_up, threshold: 10, poll_ms: 10)
      fill_until_parked(pid, topic, 1..11)
      server = Process.whereis(Dispatcher.registry_name())
      Process.exit(server, :kill)

      eventually(fn ->
        Process.whereis(Dispatcher.registry_name()) not in [nil, server] and
          RegistryBackend.parked?(topic, pid)
      end)

      # Through the new server's senders (21 subscribers: lanes), while it is parked.
      dispatch_range(topic, 12..40)
      assert run_in(pid, fn -> drain() end) == for(n <- 1..11, do: {:n, n})
      # Recovered (its mailbox read), it is told by the watchdog's next poll.
      await_notice(pid, topic)

      caught_up =
        with_watchdog_held(fn ->
          run_in(pid, fn -> {Dispatcher.catch_up(topic), drain()} end)
        end)

      assert caught_up == {:ok, for(n <- 12..40, do: {:n, n})}
      assert Dispatcher.count(topic) == 21
      Process.exit(pid, :kill)
    end

    test "the registry closing while a subscriber is parked tells it, as it tells subscribers" do
      topic = unique_topic("catch_up_closed")
      pid = spawn_slow(topic, on_slow: :catch_up, threshold: 10, poll_ms: 10)
      fill_until_parked(pid, topic, 1..11)
      ref = Process.monitor(pid)
      stop_app()
      assert_receive {:DOWN, ^ref, :process, ^pid, {:shutdown, :ex_atlas_dispatcher_closed}}
    end

    test "each :catch_up watch's count is given back, however the watch ends" do
      # A topic is tracked while it has :catch_up watches, and its log (and tracking)
      # stays while tracked: replay_bytes shows whether a count was left behind.
      bytes = fn -> RegistryBackend.stats().replay_bytes end
      empty = bytes.()
      topic = unique_topic("catch_up_counts")
      opts = [on_slow: :catch_up, threshold: 1_000_000]

      # Subscribed twice (the second watch replaces the first), then unsubscribed.
      :ok = Dispatcher.subscribe_with_backpressure(topic, opts)
      assert bytes.() > empty
      :ok = Dispatcher.subscribe_with_backpressure(topic, opts)
      :ok = Dispatcher.unsubscribe(topic)
      eventually(fn -> bytes.() == empty end)

      # Replaced by a :skip watch.
      :ok = Dispatcher.subscribe_with_backpressure(topic, opts)
      :ok = Dispatcher.subscribe_with_backpressure(topic, on_slow: :skip)
      eventually(fn -> bytes.() == empty end)
      :ok = Dispatcher.unsubscribe(topic)

      # The subscriber exits, and across a watchdog killed meanwhile.
      for kill_dog? <- [false, true] do
        pid = spawn_slow(topic, opts)
        assert bytes.() > empty

        if kill_dog? do
          dog = Process.whereis(Watchdog)
          Process.exit(dog, :kill)
          eventually(fn -> Process.whereis(Watchdog) not in [nil, dog] end)
        end

        Process.exit(pid, :kill)
        eventually(fn -> bytes.() == empty end)
      end
    end

    test "catch_up/1 when not parked returns :ok and changes nothing" do
      topic = unique_topic("catch_up_idle")
      assert Dispatcher.catch_up(topic) == :ok
      :ok = Dispatcher.subscribe_with_backpressure(topic, on_slow: :catch_up)
      assert Dispatcher.catch_up(topic) == :ok
      dispatch_range(topic, 1..3)
      assert drain() == [{:n, 1}, {:n, 2}, {:n, 3}]
      :ok = Dispatcher.unsubscribe(topic)
    end

    test "bad values" do
      assert_raise ArgumentError, ~r/:on_slow.*:evict, :skip or :catch_up.*:later/, fn ->
        Dispatcher.subscribe_with_backpressure("t", on_slow: :later)
      end

      assert_raise ArgumentError, ~r/expected a binary topic|topic/, fn ->
        Dispatcher.catch_up(:not_a_binary)
      end

      for bad <- [0, -1, 1.5, :all, nil] do
        assert_raise ArgumentError, ~r/:max.*got: #{Regex.escape(inspect(bad))}/, fn ->
          Dispatcher.catch_up("t", max: bad)
        end
      end

      for bad <- [[bogus: 1], [max: 1, max: 2], :max, %{max: 1}] do
        assert_raise ArgumentError, ~r/catch_up\/2 options/, fn ->
          Dispatcher.catch_up("t", bad)
        end
      end

      # Without a history there is nothing to catch up from: refused, and said why, with
      # no subscription or watch left behind.
      restart_app(replay: 0)
      topic = unique_topic("catch_up_no_history")

      assert_raise ArgumentError, ~r/on_slow: :catch_up needs the registry to keep/, fn ->
        Dispatcher.subscribe_with_backpressure(topic, on_slow: :catch_up)
      end

      assert Dispatcher.count(topic) == 0
      assert Watchdog.watch_info(self(), topic) == nil
    end

    test "under producers, parked and caught up again and again (property)" do
      numtests = String.to_integer(System.get_env("EX_ATLAS_PROPER_NUMTESTS", "12"))

      # The first fault is kept: a shrunk case need not fail the same way again.
      property =
        :proper.forall(catch_up_case(), fn params ->
          # PropEr 1.4 cannot report an exception on OTP 25 (it calls
          # erlang:get_stacktrace/0): one is a fault like any other.
          fault =
            try do
              check_case(run_case(params), params)
            rescue
              error -> Exception.format(:error, error, __STACKTRACE__)
            end

          if fault, do: Process.put(:first_fault, Process.get(:first_fault) || {params, fault})
          fault == nil
        end)

      result = :proper.quickcheck(property, [:quiet, {:numtests, numtests}])

      if result != true do
        {params, fault} = Process.get(:first_fault)
        flunk("catch-up case failed: #{inspect(params)}\n#{fault}")
      end
    end
  end

  describe "in the other modes" do
    test "a plain subscription with the fallback warning, and catch_up/1 does nothing" do
      :ok = LogForwarder.forward_to_test()
      # The warning comes once per start of the application: forget the ones said so far.
      true = :ets.delete_all_objects(ExAtlas.Fly.Dispatcher.Warnings)

      put_fly(dispatcher: {:mfa, {ExAtlas.Test.Sink, :drop, []}})
      topic = unique_topic("catch_up_mfa")
      assert :ok = Dispatcher.subscribe_with_backpressure(topic, on_slow: :catch_up)
      assert_receive {:log, %{level: :warning, meta: %{topic: ^topic}} = event}, 5_000
      assert :unicode.characters_to_binary(elem(event.msg, 1)) =~ "only works in :registry mode"
      assert Watchdog.watch_info(self(), topic) == nil
      assert Dispatcher.catch_up(topic) == :ok

      define_phoenix_pubsub(:catch_up_test_pubsub)
      put_fly(dispatcher: :phoenix_pubsub, pubsub: :catch_up_test_pubsub)
      topic = unique_topic("catch_up_pubsub")
      assert :ok = Dispatcher.subscribe_with_backpressure(topic, on_slow: :catch_up)
      assert_receive {:log, %{level: :warning, meta: %{topic: ^topic}}}, 5_000
      assert [{pid, _}] = Registry.lookup(:catch_up_test_pubsub, topic)
      assert pid == self()
      assert Dispatcher.catch_up(topic) == :ok
      :ok = Dispatcher.dispatch(topic, :hello)
      assert_receive :hello
    end
  end

  # Property test: producers dispatch numbered messages until the subscriber has been
  # parked and caught up `episodes` times; it stalls after subscribing and after each
  # catch-up, so that its mailbox goes past the threshold again. Paced producers send a
  # burst, then sleep a millisecond: the subscriber, catching up, outruns them, and must
  # get everything. Producers at full speed can outrun it while it catches up (it is cut
  # then, as any joiner, and told): what it gets must still add up exactly.
  defp catch_up_case do
    :proper_types.tuple([
      # producers, threshold, stall in ms, episodes, idle subscribers (0: inline sends;
      # 20: the lanes), off-heap (forced buffered) subscriber, burst (nil: full speed)
      :proper_types.range(1, 3),
      :proper_types.range(5, 60),
      :proper_types.range(5, 40),
      :proper_types.range(1, 3),
      :proper_types.oneof([:proper_types.exactly(0), :proper_types.exactly(20)]),
      :proper_types.boolean(),
      :proper_types.oneof([:proper_types.range(1, 20), :proper_types.exactly(nil)]),
      # catch_up/2's :max
      :proper_types.oneof([:proper_types.range(1, 200), :proper_types.exactly(:infinity)])
    ])
  end

  defp run_case({producers, threshold, stall, episodes, extra, off_heap, burst, max}) do
    topic = unique_topic("catch_up_prop")
    idle = idle_subscribers(topic, extra)
    if off_heap, do: BufferedSignals.enable_internal_state()
    parent = self()
    opts = [on_slow: :catch_up, threshold: threshold, poll_ms: 5]

    subscriber =
      spawn_link(fn ->
        if off_heap do
          Process.flag(:message_queue_data, :off_heap)
          :erts_debug.set_internal_state(:proc_sig_buffers, true)
        end

        :ok = Dispatcher.subscribe_with_backpressure(topic, opts)
        send(parent, {:subscribed, self()})
        fall_behind(threshold, stall)
        receive_loop(parent, topic, {threshold, stall, max}, [])
      end)

    assert_receive {:subscribed, ^subscriber}, 5_000
    producer_pids = for p <- 1..producers, do: start_producer(topic, p, burst)

    for _ <- 1..episodes do
      receive do
        {:episode, ^subscriber} -> :ok
      after
        10_000 ->
          info = Process.info(subscriber, [:current_stacktrace, :message_queue_len])
          watch = Watchdog.watch_info(subscriber, topic)
          flunk("not parked and caught up: #{inspect(info)}, watch #{inspect(watch)}")
      end
    end

    lasts = for pid <- producer_pids, do: stop_producer(pid)
    send(subscriber, {:collect, self()})
    assert_receive {:got, ^subscriber, got}, 10_000
    for pid <- idle, do: Process.unlink(pid) && Process.exit(pid, :kill)
    {got, lasts}
  end

  # Reads nothing until its mailbox is past the threshold, and then for `stall` ms more,
  # so that a poll sees it there; gives up after a second (the producers stopped).
  defp fall_behind(threshold, stall, waited \\ 0) do
    case Process.info(self(), :message_queue_len) do
      {:message_queue_len, n} when n > threshold ->
        Process.sleep(stall)

      _ when waited >= 1_000 ->
        :ok

      _ ->
        Process.sleep(1)
        fall_behind(threshold, stall, waited + 1)
    end
  end

  defp receive_loop(parent, topic, {threshold, stall, max} = slow, got) do
    receive do
      {:ex_atlas_fly_behind, ^topic} ->
        :ok = Dispatcher.catch_up(topic, max: max)
        send(parent, {:episode, self()})
        fall_behind(threshold, stall)
        receive_loop(parent, topic, slow, got)

      {:collect, from} ->
        # Whatever is still kept for it comes now (all of it); no producer runs any more.
        :ok = Dispatcher.catch_up(topic)
        rest = Enum.reject(drain(), &match?({:ex_atlas_fly_behind, _}, &1))
        send(from, {:got, self(), Enum.reverse(got, rest)})

      message ->
        receive_loop(parent, topic, slow, [message | got])
    end
  end

  # Every number of every producer, exactly once or inside the count of a notice at its
  # place, in order. The history is large enough to keep everything: with paced
  # producers, no gap is allowed.
  defp check_case({got, lasts}, params) do
    {gaps, _messages} = split_gaps(got)

    cond do
      fault = account(got, lasts, Enum.map(lasts, fn _ -> 1 end)) ->
        "#{fault} in #{inspect(got, limit: 30)}"

      gaps != [] and elem(params, 6) != nil ->
        "gap notices #{inspect(gaps, limit: 10)} with everything kept, paced producers"

      true ->
        nil
    end
  end

  defp start_producer(topic, p, burst) do
    parent = self()
    spawn_link(fn -> produce(parent, topic, p, 1, burst) end)
  end

  defp produce(parent, topic, p, n, burst) do
    receive do
      :stop ->
        :ok = Dispatcher.sync()
        send(parent, {:last, self(), n - 1})
    after
      0 ->
        count = burst || 1
        for i <- n..(n + count - 1), do: :ok = Dispatcher.dispatch(topic, {:seq, p, i, nil})
        if burst, do: Process.sleep(1)
        produce(parent, topic, p, n + count, burst)
    end
  end

  defp stop_producer(pid) do
    send(pid, :stop)
    assert_receive {:last, ^pid, last}, 30_000
    last
  end
end
