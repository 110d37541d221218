defmodule ExAtlas.Fly.Dispatcher.RegistryCleanupTest do
  # Nothing leaks: after subscribers exit or unsubscribe, the registry's own figures
  # (topics, subscriptions, monitored subscribers) return to zero. Runs on a fresh
  # registry of its own, so it must not run beside other tests.
  use ExUnit.Case, async: false

  import ExAtlas.Test.FlyEnv

  alias ExAtlas.Fly.Dispatcher
  alias ExAtlas.Fly.Dispatcher.Backend.Registry, as: RegistryBackend

  setup do
    restart_app()
    assert %{topics: 0, subscriptions: 0, subscribers: 0} = RegistryBackend.stats()
    :ok
  end

  defp spawn_subscribers(count, topics, opts \\ []) do
    parent = self()

    pids =
      for n <- 1..count do
        spawn(fn ->
          Process.flag(:trap_exit, Keyword.get(opts, :trap_exit, false))

          for offset <- 0..4 do
            :ok = Dispatcher.subscribe(Enum.at(topics, rem(n + offset * 3, length(topics))))
          end

          :ok = Dispatcher.subscribe(Enum.at(topics, rem(n, length(topics))))
          send(parent, {:subscribed, self()})
          subscriber_loop(topics, parent)
        end)
      end

    for pid <- pids, do: assert_receive({:subscribed, ^pid}, 5_000)
    pids
  end

  defp subscriber_loop(topics, parent) do
    receive do
      {:unsubscribe_all, from} ->
        for topic <- topics, do: :ok = Dispatcher.unsubscribe(topic)
        send(from, {:unsubscribed, self()})
        subscriber_loop(topics, parent)

      {:EXIT, _from, _reason} = exit ->
        send(parent, {:closed, self(), exit})
        subscriber_loop(topics, parent)

      _dispatched ->
        subscriber_loop(topics, parent)
    end
  end

  # `monitors` and `replay_monitors`: the process monitors the NIF holds for subscribers
  # and for joiners catching up (internal figures, not in Dispatcher.stats/0).
  defp all_zero?(stats) do
    match?(
      %{topics: 0, subscriptions: 0, subscribers: 0, monitors: 0, replay_monitors: 0},
      stats
    )
  end

  test "subscribers that exit leave no topic, subscription or monitor behind" do
    topics = for n <- 1..20, do: "cleanup:#{n}"
    pids = spawn_subscribers(300, topics)

    stats = RegistryBackend.stats()
    assert stats.subscribers == 300
    assert stats.subscriptions == 300 * 6
    assert stats.topics == 20
    # One monitor per subscriber, however many subscriptions it holds.
    assert stats.monitors == 300

    for topic <- topics, do: :ok = Dispatcher.dispatch(topic, {:ex_atlas_fly_logs, topic, []})
    for pid <- pids, do: Process.exit(pid, :kill)

    eventually(fn -> all_zero?(RegistryBackend.stats()) end)
    for topic <- topics, do: assert(Dispatcher.count(topic) == 0)
  end

  test "subscribers that unsubscribe everything are no longer monitored" do
    topics = for n <- 1..20, do: "unsubscribed:#{n}"
    pids = spawn_subscribers(100, topics)
    dispatcher = RegistryBackend.dispatcher!()

    eventually(fn ->
      Enum.all?(pids, fn pid ->
        {:monitored_by, monitors} = Process.info(pid, :monitored_by)
        dispatcher in monitors
      end)
    end)

    for pid <- pids, do: send(pid, {:unsubscribe_all, self()})
    for pid <- pids, do: assert_receive({:unsubscribed, ^pid}, 5_000)

    assert %{monitors: 0, replay_monitors: 0} = stats = RegistryBackend.stats()
    assert all_zero?(stats)

    assert_no_longer_monitored(pids, dispatcher)
  end

  test "closing the registry (application stop) stops its subscribers, as the original's links did" do
    pids = spawn_subscribers(50, ["closing:1", "closing:2"])
    monitors = Map.new(pids, &{Process.monitor(&1), &1})
    reason = ExAtlas.Fly.Dispatcher.Server.closed_reason()
    stop_app()

    for {ref, pid} <- monitors, do: assert_receive({:DOWN, ^ref, :process, ^pid, ^reason})
  end

  test "closing the registry removes its monitors from subscribers that trap exits" do
    pids = spawn_subscribers(50, ["closing:1", "closing:2"], trap_exit: true)
    dispatcher = RegistryBackend.dispatcher!()
    server = Process.whereis(Dispatcher.registry_name())
    stop_app()

    reason = ExAtlas.Fly.Dispatcher.Server.closed_reason()
    for pid <- pids, do: assert_receive({:closed, ^pid, {:EXIT, ^server, ^reason}})
    assert_no_longer_monitored(pids, dispatcher)
  end

  # Demonitoring is a signal to the subscriber; it is handled when the process runs, so
  # wake each one up before looking. Kills them afterwards.
  defp assert_no_longer_monitored(pids, dispatcher) do
    for pid <- pids, do: send(pid, :wake_up)

    eventually(fn ->
      Enum.all?(pids, fn pid ->
        {:monitored_by, monitors} = Process.info(pid, :monitored_by)
        dispatcher not in monitors
      end)
    end)

    for pid <- pids, do: Process.exit(pid, :kill)
  end
end
