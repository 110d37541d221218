defmodule ExAtlas.Fly.Dispatcher.WatchdogTest do
  # subscribe_with_backpressure/2: eviction of slow subscribers, the cooldown, the end of
  # every watch, option errors and the fallback of the other modes. Some tests change the
  # mode or restart the application, and several count what the (single) watchdog holds,
  # so the module runs alone.
  use ExUnit.Case, async: false

  import ExAtlas.Test.Commanded
  import ExAtlas.Test.FlyEnv

  alias ExAtlas.Fly.Dispatcher
  alias ExAtlas.Fly.Dispatcher.Backend.Registry, as: RegistryBackend
  alias ExAtlas.Fly.Dispatcher.Watchdog
  alias ExAtlas.Test.LogForwarder

  @moduletag :capture_log

  @evict_text "[ExAtlas.Fly.Dispatcher] evicting slow subscriber"
  @fallback_text "[ExAtlas.Fly.Dispatcher] subscribe_with_backpressure/2 only works in " <>
                   ":registry mode; falling back to plain subscribe/1"

  # Forwards warnings logged anywhere in the VM (the watchdog logs from its own process)
  # to the test process as {:log, event}.
  defp forward_logs(_context), do: LogForwarder.forward_to_test(:warning)

  defp log_text(%{msg: {:string, text}}), do: IO.chardata_to_string(text)
  defp log_text(%{msg: {format, args}}), do: IO.chardata_to_string(:io_lib.format(format, args))

  defp assert_eviction_logged(topic, pid, threshold) do
    assert_receive {:log, %{meta: %{topic: ^topic, subscriber: ^pid}} = event}, 5_000
    assert event.level == :warning
    # The text names the subscriber and the topic (Logger's default format shows no
    # metadata).
    assert log_text(event) ==
             "#{@evict_text} #{inspect(pid)} from topic #{inspect(topic)}: " <>
               "#{event.meta.queue_len} messages queued, above the threshold of #{threshold}"

    assert event.meta.threshold == threshold
    assert event.meta.queue_len > threshold
  end

  # A subscriber that only reacts to the test's commands, so its mailbox grows while it
  # waits. It watches `topic` with `opts` and reports `{:watching, pid}`.
  defp spawn_watched(topic, opts) do
    spawn_commanded(fn -> :ok = Dispatcher.subscribe_with_backpressure(topic, opts) end)
  end

  defp flood(topic, count) do
    for n <- 1..count, do: :ok = Dispatcher.dispatch(topic, {:flood, n})
    :ok = Dispatcher.sync()
  end

  defp watched?(pid, topic), do: Watchdog.watch_info(pid, topic) != nil

  defp watchdog, do: Process.whereis(Watchdog)

  # Waits until the group polling this watch has polled `more` more times.
  defp await_polls(pid, topic, more) do
    %{polls: start} = Watchdog.watch_info(pid, topic)
    eventually(fn -> Watchdog.watch_info(pid, topic).polls >= start + more end)
  end

  describe "in :registry mode" do
    setup :forward_logs

    test "a flooded subscriber is evicted once: entries, later messages, sentinel, warning" do
      topic = unique_topic("flood")
      parent = self()
      other = spawn_link(fn -> forward_all(topic, parent) end)
      assert_receive {:subscribed, ^other}, 5_000

      :ok = Dispatcher.subscribe_with_backpressure(topic, threshold: 20, poll_ms: 10)
      assert Dispatcher.count(topic) == 2
      flood(topic, 100)

      assert_receive {:ex_atlas_fly_backpressure_evict, ^topic}, 5_000
      assert_eviction_logged(topic, self(), 20)
      assert Dispatcher.count(topic) == 1
      assert Dispatcher.subscribers(topic) == [other]
      refute watched?(self(), topic)

      # Later dispatches reach the other subscriber, not the evicted one.
      :ok = Dispatcher.dispatch(topic, :after_eviction)
      :ok = Dispatcher.sync()
      assert_receive {:forwarded, ^other, :after_eviction}, 5_000
      refute_received :after_eviction

      # The mailbox is still above the threshold: give a wrongly kept watch many polls to
      # send a second sentinel or log a second warning.
      :ok = Dispatcher.subscribe_with_backpressure(topic <> ":clock", poll_ms: 10)
      await_polls(self(), topic <> ":clock", 10)
      refute_received {:ex_atlas_fly_backpressure_evict, ^topic}
      refute_received {:log, %{meta: %{topic: ^topic}}}
      for n <- 1..100, do: assert_received({:flood, ^n})

      # Unsubscribing afterwards, as a host's handle_info may, is harmless.
      assert :ok = Dispatcher.unsubscribe(topic)
      assert Dispatcher.count(topic) == 1
      :ok = Dispatcher.unsubscribe(topic <> ":clock")
    end

    test "eviction comes from the watchdog, not from the subscriber's own calls" do
      topic = unique_topic("remote")
      pid = spawn_watched(topic, threshold: 10, poll_ms: 10)
      flood(topic, 50)

      eventually(fn -> Dispatcher.count(topic) == 0 end)
      assert_eviction_logged(topic, pid, 10)
      refute watched?(pid, topic)

      messages = run_in(pid, fn -> drain([]) end)
      assert Enum.count(messages, &(&1 == {:ex_atlas_fly_backpressure_evict, topic})) == 1
      assert List.last(messages) == {:ex_atlas_fly_backpressure_evict, topic}
      send(pid, :stop)
    end

    test ":cooldown_ms holds: no eviction while it runs, a poll at or below resets it" do
      topic = unique_topic("cooldown_long")
      pid = spawn_watched(topic, threshold: 10, poll_ms: 10, cooldown_ms: 3_600_000)
      flood(topic, 50)

      eventually(fn -> Watchdog.watch_info(pid, topic).above_threshold end)
      await_polls(pid, topic, 10)
      assert Watchdog.watch_info(pid, topic).above_threshold
      assert Dispatcher.count(topic) == 1
      refute_received {:log, %{meta: %{topic: ^topic}}}

      # Drained: the next poll finds it at or below the threshold and resets the cooldown.
      messages = run_in(pid, fn -> drain([]) end)
      assert length(messages) == 50
      refute {:ex_atlas_fly_backpressure_evict, topic} in messages
      eventually(fn -> not Watchdog.watch_info(pid, topic).above_threshold end)
      assert Dispatcher.count(topic) == 1
      send(pid, :stop)
    end

    test ":cooldown_ms holds: eviction once it has passed" do
      topic = unique_topic("cooldown_short")
      pid = spawn_watched(topic, threshold: 10, poll_ms: 10, cooldown_ms: 100)
      flood(topic, 50)

      # The cooldown starts running on a poll above the threshold; the eviction follows.
      assert_eviction_logged(topic, pid, 10)
      assert Dispatcher.count(topic) == 0
      messages = run_in(pid, fn -> drain([]) end)
      assert Enum.count(messages, &(&1 == {:ex_atlas_fly_backpressure_evict, topic})) == 1
      send(pid, :stop)
    end

    test "a subscriber that keeps draining is never evicted" do
      topic = unique_topic("draining")
      parent = self()

      pid =
        spawn_link(fn ->
          :ok = Dispatcher.subscribe_with_backpressure(topic, threshold: 50, poll_ms: 5)
          send(parent, {:watching, self()})
          drain_and_ack(parent)
        end)

      assert_receive {:watching, ^pid}, 5_000

      # Batches of 40 (below the threshold of 50), each consumed before the next, for at
      # least 40 polls.
      %{polls: start} = Watchdog.watch_info(pid, topic)
      batches = produce_until_polled(topic, pid, start + 40, 0)
      assert batches > 0

      refute_received {:log, %{meta: %{topic: ^topic}}}
      assert Dispatcher.count(topic) == 1
      assert watched?(pid, topic)
      send(pid, {:report, self()})
      assert_receive {:evicted?, ^pid, false}, 5_000
    end

    test "topics are watched independently, and a second call is a second subscription" do
      slow = unique_topic("slow")
      calm = unique_topic("calm")

      pid = spawn_watched(slow, threshold: 5, poll_ms: 10)
      run_in(pid, fn -> Dispatcher.subscribe_with_backpressure(slow, threshold: 5) end)
      run_in(pid, fn -> Dispatcher.subscribe_with_backpressure(calm, threshold: 1_000) end)
      assert Dispatcher.count(slow) == 2
      assert Dispatcher.count(calm) == 1
      # One watch per subscriber and topic; the latest options apply.
      assert %{threshold: 5, poll_ms: 1_000} = Watchdog.watch_info(pid, slow)

      # Both subscriptions to `slow` deliver: 5 dispatches are 10 messages.
      flood(slow, 5)
      assert_eviction_logged(slow, pid, 5)

      assert Dispatcher.count(slow) == 0
      assert Dispatcher.count(calm) == 1
      refute watched?(pid, slow)
      assert watched?(pid, calm)

      messages = run_in(pid, fn -> drain([]) end)
      assert Enum.count(messages, &match?({:flood, _}, &1)) == 10
      assert Enum.count(messages, &(&1 == {:ex_atlas_fly_backpressure_evict, slow})) == 1
      refute {:ex_atlas_fly_backpressure_evict, calm} in messages

      send(pid, :stop)
      eventually(fn -> not watched?(pid, calm) end)
      eventually(fn -> Dispatcher.count(calm) == 0 end)
    end

    test "after 300 watched subscribers exit or unsubscribe, nothing of the watch is left" do
      dog = watchdog()
      baseline = RegistryBackend.stats()
      # Watches of earlier tests' processes end with their :DOWN.
      eventually(fn -> Watchdog.stats() == %{watches: 0, subscribers: 0, timers: 0} end)
      topics = for n <- 1..3, do: unique_topic("many_#{n}")
      # 60_000 ms: that group's timer cannot fire during the test, so it must be cancelled.
      polls = [10, 25, 60_000]
      parent = self()

      subscribers =
        for n <- 1..300 do
          my_topics = [Enum.at(topics, rem(n, 3)), Enum.at(topics, rem(n + 1, 3))]
          poll_ms = Enum.at(polls, rem(n, 3))

          pid =
            spawn(fn ->
              for topic <- my_topics do
                :ok = Dispatcher.subscribe_with_backpressure(topic, poll_ms: poll_ms)
              end

              # Every fifth also subscribes twice to its first topic.
              if rem(n, 5) == 0 do
                :ok = Dispatcher.subscribe_with_backpressure(hd(my_topics), poll_ms: poll_ms)
              end

              send(parent, {:watching, self()})
              command_loop(parent)
            end)

          assert_receive {:watching, ^pid}, 5_000
          {n, pid, my_topics}
        end

      assert %{watches: 600, subscribers: 300, timers: 3} = Watchdog.stats()
      assert Enum.sum(for t <- topics, do: Dispatcher.count(t)) == 660
      assert {:monitors, monitors} = Process.info(dog, :monitors)
      assert length(monitors) == 300
      %{groups: groups} = :sys.get_state(dog)
      long_timer = groups[60_000].timer
      assert is_integer(:erlang.read_timer(long_timer))

      # A third exit (normal, killed, crashed); the rest unsubscribe and stay alive.
      {leavers, stayers} = Enum.split_with(subscribers, fn {n, _, _} -> rem(n, 3) == 0 end)

      for {n, pid, _} <- leavers do
        case rem(n, 9) do
          0 -> send(pid, :stop)
          3 -> Process.exit(pid, :kill)
          6 -> send(pid, {:run, fn -> raise "host crash" end})
        end
      end

      for {_, pid, my_topics} <- stayers do
        run_in(pid, fn -> Enum.each(my_topics, &Dispatcher.unsubscribe/1) end)
        # The watch ends with unsubscribe/1's return, not later.
        for topic <- my_topics, do: refute(watched?(pid, topic))
      end

      eventually(fn -> Watchdog.stats() == %{watches: 0, subscribers: 0, timers: 0} end)

      assert Process.whereis(Watchdog) == dog
      assert Process.info(dog, :monitors) == {:monitors, []}
      assert {:links, [_supervisor]} = Process.info(dog, :links)
      assert :ets.info(Watchdog, :size) == 0
      assert :atomics.get(:persistent_term.get({Watchdog, :watches}), 1) == 0
      assert :erlang.read_timer(long_timer) == false
      assert %{groups: groups, subscribers: subscribers_left} = :sys.get_state(dog)
      assert groups == %{} and subscribers_left == %{}
      refute Enum.any?(Process.list(), &spawned_by?(&1, dog))

      for topic <- topics do
        assert Dispatcher.count(topic) == 0
        assert Dispatcher.subscribers(topic) == []
      end

      eventually(fn -> RegistryBackend.stats().subscriptions == baseline.subscriptions end)
      assert RegistryBackend.stats().subscribers == baseline.subscribers

      for {_, pid, _} <- stayers, do: send(pid, :stop)
    end

    test "the watchdog outlives crashing subscribers and is linked to none" do
      dog = watchdog()
      topic = unique_topic("crash")

      pids =
        for _ <- 1..20 do
          pid = spawn_watched(topic, poll_ms: 10)
          Process.exit(pid, :crash)
          pid
        end

      eventually(fn -> Enum.all?(pids, &(not watched?(&1, topic))) end)
      assert Process.whereis(Watchdog) == dog
      assert Process.alive?(dog)
      assert {:links, [_supervisor]} = Process.info(dog, :links)
    end

    test "a watchdog that stops during the call: ArgumentError, then a fresh one works" do
      dog = watchdog()
      topic = unique_topic("restart")
      parent = self()
      :ok = :sys.suspend(dog)

      caller =
        spawn(fn ->
          result =
            try do
              Dispatcher.subscribe_with_backpressure(topic, poll_ms: 10)
            rescue
              error in ArgumentError -> {:raised, error.message}
            end

          send(parent, {:result, self(), result})
        end)

      # The call is waiting in the suspended watchdog's mailbox.
      eventually(fn -> Process.info(dog, :message_queue_len) == {:message_queue_len, 1} end)
      Process.exit(dog, :kill)
      assert_receive {:result, ^caller, {:raised, message}}, 5_000
      assert message =~ "watchdog is not running"

      # Its supervisor starts a fresh watchdog beside the same registry.
      eventually(fn -> watchdog() not in [nil, dog] end)
      pid = spawn_watched(topic <> ":after", threshold: 5, poll_ms: 10)
      flood(topic <> ":after", 20)
      assert_eviction_logged(topic <> ":after", pid, 5)
      send(pid, :stop)
    end

    test "options are validated: wrong values and unknown keys raise ArgumentError" do
      topic = unique_topic("options")

      for {opts, texts} <- [
            {[threshold: 0], [":threshold", "positive integer", "got: 0"]},
            {[threshold: -5], [":threshold", "got: -5"]},
            {[threshold: 1.5], [":threshold", "got: 1.5"]},
            {[threshold: :big], [":threshold", "got: :big"]},
            {[poll_ms: 0], [":poll_ms", "positive integer", "got: 0"]},
            {[poll_ms: "10"], [":poll_ms", ~s(got: "10")]},
            {[poll_ms: 4_294_967_296], [":poll_ms", "up to 4294967295", "got: 4294967296"]},
            {[cooldown_ms: -1], [":cooldown_ms", "non-negative integer", "got: -1"]},
            {[cooldown_ms: 2.0], [":cooldown_ms", "got: 2.0"]},
            {[poll_ms: 10, treshold: 10], ["unknown", ":treshold"]},
            {[{"threshold", 10}], ["unknown", ~s("threshold")]},
            {[:threshold], ["keyword list", "[:threshold]"]},
            {[{:threshold, 5} | :tail], ["keyword list", "[{:threshold, 5} | :tail]"]},
            {%{threshold: 10}, ["keyword list", "%{threshold: 10}"]}
          ] do
        error =
          assert_raise ArgumentError, fn ->
            Dispatcher.subscribe_with_backpressure(topic, opts)
          end

        for text <- texts do
          assert error.message =~ text, "#{inspect(opts)}: #{error.message}"
        end
      end

      # The bad calls subscribed nothing and watch nothing.
      assert Dispatcher.count(topic) == 0
      refute watched?(self(), topic)

      for bad <- [:atom, 123, nil, ~c"charlist"] do
        error = assert_raise ArgumentError, fn -> Dispatcher.subscribe_with_backpressure(bad) end
        assert error.message =~ "topic"
        assert error.message =~ inspect(bad)
      end

      # The boundaries are accepted.
      assert :ok = Dispatcher.subscribe_with_backpressure(topic, threshold: 1, poll_ms: 1)
      assert :ok = Dispatcher.subscribe_with_backpressure(topic, cooldown_ms: 0)

      assert %{threshold: 10_000, poll_ms: 1_000, cooldown_ms: 0} =
               Watchdog.watch_info(self(), topic)

      :ok = Dispatcher.unsubscribe(topic)
    end
  end

  describe "in the other modes" do
    setup :forward_logs

    test "{:mfa, _}: a plain subscribe/1 and the fallback warning" do
      # A mode of its own: the warning comes once per start and mode.
      put_fly(dispatcher: {:mfa, {ExAtlas.Test.Sink, :drop, [make_ref()]}})
      topic = unique_topic("mfa")

      assert :ok = Dispatcher.subscribe_with_backpressure(topic, threshold: 5)
      assert_receive {:log, %{level: :warning, meta: %{topic: ^topic}} = event}, 5_000
      assert log_text(event) =~ @fallback_text
      assert log_text(event) =~ "topic #{inspect(topic)}"
      refute watched?(self(), topic)

      # Options are still checked.
      assert_raise ArgumentError, ~r/:poll_ms/, fn ->
        Dispatcher.subscribe_with_backpressure(topic, poll_ms: 0)
      end
    end

    test ":phoenix_pubsub: a plain subscribe/1 through Phoenix.PubSub and the warning" do
      define_phoenix_pubsub(:watchdog_test_pubsub)
      put_fly(dispatcher: :phoenix_pubsub, pubsub: :watchdog_test_pubsub)
      topic = unique_topic("pubsub")

      assert :ok = Dispatcher.subscribe_with_backpressure(topic, threshold: 5, poll_ms: 10)
      assert_receive {:log, %{level: :warning, meta: %{topic: ^topic}} = event}, 5_000
      assert log_text(event) =~ @fallback_text
      assert log_text(event) =~ "topic #{inspect(topic)}"
      refute watched?(self(), topic)

      assert [{pid, _}] = Registry.lookup(:watchdog_test_pubsub, topic)
      assert pid == self()
      :ok = Dispatcher.dispatch(topic, :through_pubsub)
      assert_receive :through_pubsub, 5_000
    end

    test ":phoenix_pubsub without a pubsub falls back to the registry and watches" do
      put_fly(dispatcher: :phoenix_pubsub)
      topic = unique_topic("pubsub_fallback")

      assert :ok = Dispatcher.subscribe_with_backpressure(topic, poll_ms: 10)
      assert watched?(self(), topic)
      refute_received {:log, %{meta: %{topic: ^topic}}}
      :ok = Dispatcher.unsubscribe(topic)
      refute watched?(self(), topic)
    end
  end

  describe "in a host's supervision tree" do
    setup do
      restart_app(enabled: false)
    end

    setup :forward_logs

    test "the watchdog starts and stops with the registry" do
      assert Process.whereis(Watchdog) == nil

      assert_raise ArgumentError, ~r/not running/, fn ->
        Dispatcher.subscribe_with_backpressure("t")
      end

      start_supervised!(Dispatcher)
      assert is_pid(Process.whereis(Watchdog))

      topic = unique_topic("host_tree")
      pid = spawn_watched(topic, threshold: 10, poll_ms: 10)
      flood(topic, 30)
      assert_eviction_logged(topic, pid, 10)
      assert Dispatcher.count(topic) == 0
      send(pid, :stop)

      stop_supervised!(Dispatcher)
      assert Process.whereis(Watchdog) == nil
      assert :ets.whereis(Watchdog) == :undefined
    end
  end

  defp forward_all(topic, parent) do
    :ok = Dispatcher.subscribe(topic)
    send(parent, {:subscribed, self()})
    forward_loop(parent)
  end

  defp forward_loop(parent) do
    receive do
      message ->
        send(parent, {:forwarded, self(), message})
        forward_loop(parent)
    end
  end

  defp drain(acc) do
    receive do
      message -> drain([message | acc])
    after
      0 -> Enum.reverse(acc)
    end
  end

  defp drain_and_ack(parent, evicted? \\ false) do
    receive do
      {:batch, n, from} ->
        for _ <- 1..n do
          receive do
            {:flood, _} -> :ok
          end
        end

        send(from, {:consumed, self()})
        drain_and_ack(parent, evicted?)

      {:ex_atlas_fly_backpressure_evict, _topic} ->
        drain_and_ack(parent, true)

      {:report, from} ->
        send(from, {:evicted?, self(), evicted?})
    end
  end

  defp produce_until_polled(topic, pid, polls, batches) do
    if Watchdog.watch_info(pid, topic).polls >= polls do
      batches
    else
      for n <- 1..40, do: :ok = Dispatcher.dispatch(topic, {:flood, n})
      send(pid, {:batch, 40, self()})
      assert_receive {:consumed, ^pid}, 5_000
      produce_until_polled(topic, pid, polls, batches + 1)
    end
  end

  defp spawned_by?(pid, dog) do
    case Process.info(pid, :dictionary) do
      {:dictionary, dictionary} -> dog in Keyword.get(dictionary, :"$ancestors", [])
      nil -> false
    end
  end
end
