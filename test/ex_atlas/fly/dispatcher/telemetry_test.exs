defmodule ExAtlas.Fly.Dispatcher.TelemetryTest do
  # The `:telemetry` events, with `:telemetry` defined at runtime by a stand-in (hex is out
  # of reach), and the same paths with no `:telemetry` at all. Defining a module named
  # `:telemetry` is global, so the module runs alone.
  use ExUnit.Case, async: false

  import ExAtlas.Test.FlyEnv

  alias ExAtlas.Fly.Dispatcher
  alias ExAtlas.Fly.Dispatcher.Cluster.Link
  alias ExAtlas.Fly.Dispatcher.Server
  alias ExAtlas.Test.LogForwarder
  alias ExAtlas.Test.TelemetryStandIn

  @moduletag :capture_log
  @compile {:no_warn_undefined, :telemetry}

  @evict [:ex_atlas, :fly, :dispatcher, :evict]
  @wait_start [:ex_atlas, :fly, :dispatcher, :wait, :start]
  @wait_stop [:ex_atlas, :fly, :dispatcher, :wait, :stop]
  @drop [:ex_atlas, :fly, :dispatcher, :cluster, :drop]
  @lost [:ex_atlas, :fly, :dispatcher, :lost]
  @all [@evict, @wait_start, @wait_stop, @drop, @lost]

  # More than the 16 subscriptions a dispatch may deliver inline: every dispatch then
  # goes through the lane's sender.
  @subscribers 20

  describe "with :telemetry loaded" do
    setup do
      define_telemetry()
      TelemetryStandIn.capture(@all)
      :ok
    end

    test "evict: queue length, threshold, topic and subscriber" do
      topic = unique_topic("telemetry:evict")
      slow = spawn_slow_subscriber(topic, threshold: 5, poll_ms: 10)
      flood(topic, 20)

      assert_receive {:telemetry, @evict, measurements, metadata}, 5_000
      assert metadata == %{topic: topic, subscriber: slow}
      assert %{threshold: 5, queue_len: queue_len} = measurements
      assert map_size(measurements) == 2
      assert queue_len > 5
      assert Dispatcher.count(topic) == 0
      refute_received {:telemetry, @evict, _, _}
      Process.exit(slow, :kill)
    end

    test "wait: start and stop around a producer's real wait for lane room, only then" do
      restart_app(lanes: 1, queue_capacity: 1)
      topic = unique_topic("telemetry:wait")
      subscribers = spawn_subscribers(topic)

      # Room, no wait: no event.
      :ok = Dispatcher.dispatch(topic, :no_wait)
      :ok = Dispatcher.sync()
      refute_received {:telemetry, @wait_start, _, _}

      # The sender suspended holds the lane's only credit: the next dispatch waits.
      [sender] = Server.senders()
      true = :erlang.suspend_process(sender)
      :ok = Dispatcher.dispatch(topic, :takes_the_credit)
      producer = spawn_producer(topic, :waits)

      assert_receive {:telemetry, @wait_start, start, %{topic: ^topic, reason: :full} = meta},
                     5_000

      assert %{system_time: system_time, monotonic_time: monotonic} = start
      assert is_integer(system_time) and is_integer(monotonic)
      assert is_reference(meta.telemetry_span_context)
      eventually(fn -> Dispatcher.stats().waiting == 1 end)
      refute_received {:telemetry, @wait_stop, _, _}

      true = :erlang.resume_process(sender)
      assert_receive {:dispatched, ^producer}, 5_000
      assert_receive {:telemetry, @wait_stop, stop, ^meta}, 5_000
      assert %{duration: duration, monotonic_time: stopped} = stop
      # It waited while the sender was suspended: a real span, measured.
      assert is_integer(duration) and duration > 0
      assert stopped - monotonic == duration
      refute_received {:telemetry, @wait_start, _, _}
      assert Dispatcher.stats().waiting == 0
      stop_all(subscribers)
    end

    test "lost: deliveries and batches a killed sender had not delivered" do
      restart_app(lanes: 1, queue_capacity: 8)
      topic = unique_topic("telemetry:lost")
      subscribers = spawn_subscribers(topic)
      [sender] = Server.senders()
      true = :erlang.suspend_process(sender)
      for n <- 1..3, do: :ok = Dispatcher.dispatch(topic, {:lost, n})
      Process.exit(sender, :kill)

      # The server checks shortly after a sender's exit.
      assert_receive {:telemetry, @lost, measurements, metadata}, 5_000
      assert measurements == %{deliveries: 3 * @subscribers, batches: 3}
      assert metadata == %{}
      assert %{lost_batches: 3, lost_deliveries: lost} = Dispatcher.stats()
      assert lost == 3 * @subscribers
      stop_all(subscribers)
    end

    test "cluster drop: the new drops of a node, from its link's report" do
      # A link (cluster mode's tables and scope must run) to a node that is never
      # connected: no relay ever welcomes it, so with a bound of 1 the first message stays
      # queued and the next ones are dropped.
      restart_app(cluster: true)
      {:ok, link} = Link.start_link({:"nowhere@127.0.0.1", 1})
      handle = {link, GenServer.call(link, :counts)}
      assert :ok = Link.push(handle, 1, "t", :queued)
      assert :dropped = Link.push(handle, 1, "t", :dropped_1)
      assert :dropped = Link.push(handle, 1, "t", :dropped_2)

      # The link reports once a second what was dropped since its last report (a report
      # may fall between the two pushes: the counts add up either way).
      await_drops(:"nowhere@127.0.0.1", 2)
      assert :dropped = Link.push(handle, 1, "t", :dropped_3)
      await_drops(:"nowhere@127.0.0.1", 1)
      assert Link.counts(handle) == %{queued: 1, dropped: 3}

      GenServer.stop(link)
    end

    test "a handler that raises is detached; the dispatcher goes on" do
      :ok = :telemetry.attach(:boom, @evict, fn _, _, _, _ -> raise "boom" end, nil)
      topic = unique_topic("telemetry:boom")
      slow = spawn_slow_subscriber(topic, threshold: 1, poll_ms: 10)
      flood(topic, 10)

      assert_receive {:telemetry, @evict, _, %{subscriber: ^slow}}, 5_000
      # Detached in the emitting process, right after our capture handler ran.
      eventually(fn -> :ets.match_object(TelemetryStandIn, {:_, :boom, :_, :_}) == [] end)
      assert Process.alive?(Process.whereis(ExAtlas.Fly.Dispatcher.Watchdog))
      Process.exit(slow, :kill)
    end
  end

  describe "without :telemetry" do
    setup do
      remove_telemetry()
      refute function_exported?(:telemetry, :execute, 3)
      assert :code.which(:telemetry) == :non_existing
      :ok
    end

    test "eviction, waits and lost deliveries work as before, with no event anywhere" do
      forward_logs()
      topic = unique_topic("no_telemetry:evict")
      watchdog = Process.whereis(ExAtlas.Fly.Dispatcher.Watchdog)
      slow = spawn_slow_subscriber(topic, threshold: 5, poll_ms: 10)
      flood(topic, 20)
      assert_receive {:log, %{meta: %{topic: ^topic, subscriber: ^slow}}}, 5_000
      # The watchdog went on past its telemetry call.
      assert %{watches: 0} = ExAtlas.Fly.Dispatcher.Watchdog.stats()
      assert Process.whereis(ExAtlas.Fly.Dispatcher.Watchdog) == watchdog
      assert Dispatcher.count(topic) == 0
      Process.exit(slow, :kill)

      restart_app(lanes: 1, queue_capacity: 1)
      topic = unique_topic("no_telemetry:wait")
      subscribers = spawn_subscribers(topic)
      [sender] = Server.senders()
      true = :erlang.suspend_process(sender)
      :ok = Dispatcher.dispatch(topic, :takes_the_credit)
      producer = spawn_producer(topic, :waits)
      eventually(fn -> Dispatcher.stats().waiting == 1 end)
      true = :erlang.resume_process(sender)
      assert_receive {:dispatched, ^producer}, 5_000

      # A killed sender: counted and logged, as with telemetry. The producer's batch must
      # be delivered first: with the lane's only credit still on it, the next dispatch
      # would wait for room that only the sender this test is about to kill can give.
      server = Process.whereis(Dispatcher.registry_name())
      eventually(fn -> Dispatcher.stats().in_flight == 0 end)
      [sender] = Server.senders()
      true = :erlang.suspend_process(sender)
      :ok = Dispatcher.dispatch(topic, :lost)
      Process.exit(sender, :kill)
      assert_receive {:log, %{meta: %{lost_deliveries: @subscribers, lost_batches: 1}}}, 5_000
      # The server went on past its telemetry call.
      _ = :sys.get_state(server)
      assert Process.whereis(Dispatcher.registry_name()) == server
      assert %{lost_batches: 1, in_flight: 0} = Dispatcher.stats()

      stop_all(subscribers)
      refute_received {:telemetry, _, _, _}
    end
  end

  defp await_drops(_node, 0), do: refute_received({:telemetry, @drop, _, _})

  defp await_drops(node, left) do
    assert_receive {:telemetry, @drop, %{count: count}, %{node: ^node}}, 5_000
    assert count in 1..left
    await_drops(node, left - count)
  end

  # Our processes log from themselves: forward their warnings and errors here.
  defp forward_logs, do: LogForwarder.forward_to_test(:warning)

  defp spawn_subscribers(topic) do
    parent = self()

    pids =
      for _ <- 1..@subscribers do
        spawn(fn ->
          :ok = Dispatcher.subscribe(topic)
          send(parent, {:subscribed, self()})

          receive do
            :stop -> :ok
          end
        end)
      end

    for pid <- pids, do: assert_receive({:subscribed, ^pid}, 5_000)
    pids
  end

  defp stop_all(pids), do: Enum.each(pids, &send(&1, :stop))

  # A subscriber with backpressure that never reads its mailbox.
  defp spawn_slow_subscriber(topic, opts) do
    parent = self()

    pid =
      spawn(fn ->
        :ok = Dispatcher.subscribe_with_backpressure(topic, opts)
        send(parent, {:watching, self()})
        Process.sleep(:infinity)
      end)

    assert_receive {:watching, ^pid}, 5_000
    pid
  end

  defp spawn_producer(topic, message) do
    parent = self()

    spawn(fn ->
      :ok = Dispatcher.dispatch(topic, message)
      send(parent, {:dispatched, self()})
    end)
  end

  defp flood(topic, count) do
    for n <- 1..count, do: :ok = Dispatcher.dispatch(topic, {:flood, n})
    :ok = Dispatcher.sync()
  end
end
