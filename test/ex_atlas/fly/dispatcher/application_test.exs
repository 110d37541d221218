defmodule ExAtlas.Fly.Dispatcher.ApplicationTest do
  # Starting, stopping and restarting the registry: by the :ex_atlas application, by a
  # host's own supervision tree, and with a tiny queue. These restart the application, so
  # they run alone; `restart_app/1` puts the original application back afterwards.
  use ExUnit.Case, async: false

  import ExAtlas.Test.FlyEnv
  import ExUnit.CaptureLog

  alias ExAtlas.Fly.Dispatcher
  alias ExAtlas.Fly.Dispatcher.Backend.Registry, as: RegistryBackend

  defp api_calls do
    [
      subscribe: fn -> Dispatcher.subscribe("t") end,
      unsubscribe: fn -> Dispatcher.unsubscribe("t") end,
      dispatch: fn -> Dispatcher.dispatch("t", :m) end,
      sync: fn -> Dispatcher.sync() end,
      count: fn -> Dispatcher.count("t") end,
      subscribers: fn -> Dispatcher.subscribers("t") end,
      stats: fn -> Dispatcher.stats() end,
      subscribe_with_backpressure: fn -> Dispatcher.subscribe_with_backpressure("t") end
    ]
  end

  defp assert_working_registry do
    topic = unique_topic("working")
    :ok = Dispatcher.subscribe(topic)
    :ok = Dispatcher.dispatch(topic, {:works, topic})
    :ok = Dispatcher.sync()
    assert_received {:works, ^topic}
    assert Dispatcher.count(topic) == 1
    :ok = Dispatcher.unsubscribe(topic)
  end

  test "the :ex_atlas application runs the registry by default" do
    assert Dispatcher.needs_registry?()
    assert is_pid(Process.whereis(Dispatcher.registry_name()))
    assert_working_registry()
  end

  test "stopping and starting the application gives a working, empty registry" do
    topic = unique_topic("before_restart")
    :ok = Dispatcher.subscribe(topic)
    :ok = Dispatcher.subscribe(topic)
    assert Dispatcher.count(topic) == 2
    old_server = Process.whereis(Dispatcher.registry_name())

    # Closing the registry tells every subscriber with an exit signal, once, as the links
    # of the original Registry did; this test process traps it to look.
    Process.flag(:trap_exit, true)
    stop_app()
    reason = ExAtlas.Fly.Dispatcher.Server.closed_reason()
    assert_receive {:EXIT, ^old_server, ^reason}
    refute_receive {:EXIT, ^old_server, _}
    Process.flag(:trap_exit, false)
    for {_name, call} <- api_calls(), do: assert_raise(ArgumentError, call)
    :ok = Application.ensure_started(:ex_atlas)

    refute Process.whereis(Dispatcher.registry_name()) in [nil, old_server]
    assert Dispatcher.count(topic) == 0
    assert Dispatcher.subscribers(topic) == []
    assert %{topics: 0, subscriptions: 0, subscribers: 0} = RegistryBackend.stats()

    # The old subscriptions are gone for good: nothing dispatched now reaches them.
    :ok = Dispatcher.dispatch(topic, :after_restart)
    :ok = Dispatcher.sync()
    refute_received :after_restart

    assert_working_registry()

    # And again, several times in a row.
    for _ <- 1..3 do
      stop_app()
      :ok = Application.ensure_started(:ex_atlas)
      assert_working_registry()
    end
  end

  describe "the deprecated `sender_threads` config key" do
    test "still sets the lanes, with a warning that names `lanes`" do
      log = capture_log(fn -> restart_app(sender_threads: 3) end)
      assert %{lanes: 3} = RegistryBackend.stats()
      assert log =~ "`config :ex_atlas, :fly` key :sender_threads is deprecated: use :lanes"
      assert_working_registry()
    end

    test "loses to `lanes` when both are set, and the warning says so" do
      log = capture_log(fn -> restart_app(sender_threads: 4, lanes: 3) end)
      assert %{lanes: 3} = RegistryBackend.stats()
      assert log =~ "`config :ex_atlas, :fly` key :sender_threads is deprecated and ignored"
      assert log =~ ":lanes is set too, and wins (lanes: 3, sender_threads: 4)"
      assert_working_registry()
    end

    test "`lanes` alone logs no warning" do
      log = capture_log(fn -> restart_app(lanes: 3) end)
      assert %{lanes: 3} = RegistryBackend.stats()
      refute log =~ "deprecated"
    end
  end

  describe "with `enabled: false`" do
    setup do
      restart_app(enabled: false)
    end

    test "the application starts no registry and the API says how to start one" do
      assert Process.whereis(Dispatcher.registry_name()) == nil

      for {name, call} <- api_calls() do
        error = assert_raise ArgumentError, call

        # The application runs: the cause is `enabled: false`, and the advice fits it.
        assert error.message =~ "not running", "#{name}: #{error.message}"
        assert error.message =~ "`config :ex_atlas, :fly, enabled: false` is set"
        assert error.message =~ "add ExAtlas.Fly.Dispatcher to it"
        refute error.message =~ "application is not started"
      end
    end

    test "a host can run the registry in its own supervision tree" do
      start_supervised!(Dispatcher)
      assert_working_registry()
      stop_supervised!(Dispatcher)
      assert_raise ArgumentError, ~r/not running/, fn -> Dispatcher.subscribe("t") end
    end

    test "child_spec/1 takes :lanes and :queue_capacity" do
      log =
        capture_log(fn ->
          start_supervised!({Dispatcher, lanes: 3, queue_capacity: 7})
        end)

      assert %{lanes: 3, queue_capacity: 7} = RegistryBackend.stats()
      refute log =~ "deprecated"
      assert_working_registry()
    end

    test "child_spec/1 still takes the deprecated :sender_threads, with a warning" do
      log =
        capture_log(fn ->
          start_supervised!({Dispatcher, sender_threads: 3, queue_capacity: 7})
        end)

      assert %{lanes: 3, queue_capacity: 7} = RegistryBackend.stats()
      assert log =~ "child_spec option :sender_threads is deprecated: use :lanes"
      assert_working_registry()
    end

    test "child_spec/1 with both :lanes and :sender_threads uses :lanes and says so" do
      log =
        capture_log(fn ->
          start_supervised!({Dispatcher, sender_threads: 4, lanes: 3})
        end)

      assert %{lanes: 3} = RegistryBackend.stats()
      assert log =~ "child_spec option :sender_threads is deprecated and ignored"
      assert log =~ "(lanes: 3, sender_threads: 4)"
      assert_working_registry()
    end

    test "child_spec/1 rejects bad options with ArgumentError naming them" do
      for {opts, text} <- [
            {[lanes: 0], "0"},
            {[sender_threads: 0], "0"},
            {[queue_capacity: -1], "-1"},
            {[queue_capacity: :big], ":big"},
            {[lanes: 2_000], "2000"},
            {[lanes: 2, sender_threads: 2_000], "2000"},
            {[unknown: 1], ":unknown"},
            {:not_a_list, ":not_a_list"}
          ] do
        error = assert_raise ArgumentError, fn -> Dispatcher.child_spec(opts) end
        assert error.message =~ text
      end
    end

    test "starting the child spec twice does not crash and keeps one registry" do
      start_supervised!(Dispatcher)
      dispatcher = RegistryBackend.dispatcher!()
      topic = unique_topic("twice")
      :ok = Dispatcher.subscribe(topic)

      # A second copy, in another supervisor, starts without replacing the registry.
      {:ok, other_sup} = Supervisor.start_link([Dispatcher], strategy: :one_for_one)
      assert [{Dispatcher, _, _, _}] = Supervisor.which_children(other_sup)
      assert RegistryBackend.dispatcher!() == dispatcher
      assert Dispatcher.count(topic) == 1

      # Its supervisor going away does not touch the running registry.
      Supervisor.stop(other_sup)
      assert RegistryBackend.dispatcher!() == dispatcher
      :ok = Dispatcher.dispatch(topic, :still_here)
      :ok = Dispatcher.sync()
      assert_received :still_here
    end
  end

  test "the child spec also starts cleanly beside the application's registry" do
    dispatcher = RegistryBackend.dispatcher!()
    assert {:ok, _} = start_supervised(Dispatcher)
    assert RegistryBackend.dispatcher!() == dispatcher
    assert_working_registry()
  end

  describe "with a tiny queue (queue_capacity: 1)" do
    setup do
      restart_app(lanes: 2, queue_capacity: 1)
    end

    test "the application uses the configured lanes and capacity" do
      assert %{lanes: 2, queue_capacity: 1} = RegistryBackend.stats()
    end

    test "nothing is lost, duplicated or reordered while dispatchers wait for room" do
      topics = [unique_topic("full_a"), unique_topic("full_b")]
      producers = 4
      per_producer = 250
      parent = self()

      subscribers =
        for n <- 1..60 do
          topic = Enum.at(topics, rem(n, 2))
          pid = spawn_link(fn -> ordered_subscriber(topic, producers, parent) end)
          assert_receive {:subscribed, ^pid}, 5_000
          {pid, topic}
        end

      # Watch the bound while the producers run.
      sampler = spawn_link(fn -> sample_queues(parent, 0) end)

      producer_pids =
        for p <- 1..producers do
          spawn_link(fn ->
            receive do
              :go -> :ok
            end

            for n <- 1..per_producer do
              topic = Enum.at(topics, rem(n, 2))
              :ok = Dispatcher.dispatch(topic, {:seq, p, n, :binary.copy(<<p>>, 256)})
            end

            :ok = Dispatcher.sync()
            send(parent, {:produced, self()})
          end)
        end

      for pid <- producer_pids, do: send(pid, :go)
      for pid <- producer_pids, do: assert_receive({:produced, ^pid}, 60_000)
      send(sampler, {:stop, self()})
      assert_receive {:max_queued_seen, max_queued}, 5_000
      assert max_queued <= 1
      # The registry's own high-water mark, where it keeps one.
      assert Map.get(RegistryBackend.stats(), :peak_in_flight, 0) <= 1

      for {pid, topic} <- subscribers do
        send(pid, :report)
        # Topic at index rem(n, 2) received the n with that parity.
        parity = if topic == hd(topics), do: 0, else: 1
        expected = for n <- 1..per_producer, rem(n, 2) == parity, do: n
        assert_receive {:report, ^pid, received}, 30_000
        assert received == Map.new(1..producers, &{&1, expected})
      end
    end
  end

  defp ordered_subscriber(topic, producers, parent) do
    :ok = Dispatcher.subscribe(topic)
    send(parent, {:subscribed, self()})
    received = collect(Map.new(1..producers, &{&1, []}))
    send(parent, {:report, self(), Map.new(received, fn {p, ns} -> {p, Enum.reverse(ns)} end)})
  end

  defp collect(acc) do
    receive do
      {:seq, p, n, _payload} -> collect(Map.update!(acc, p, &[n | &1]))
      :report -> acc
    end
  end

  defp sample_queues(parent, max_seen) do
    receive do
      {:stop, from} -> send(from, {:max_queued_seen, max_seen})
    after
      0 ->
        %{max_in_flight: max_queued} = RegistryBackend.stats()
        Process.sleep(1)
        sample_queues(parent, max(max_seen, max_queued))
    end
  end
end
