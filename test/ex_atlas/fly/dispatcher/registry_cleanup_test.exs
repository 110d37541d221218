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

  defp spawn_subscribers(count, topics) do
    parent = self()

    pids =
      for n <- 1..count do
        spawn(fn ->
          for offset <- 0..4 do
            :ok = Dispatcher.subscribe(Enum.at(topics, rem(n + offset * 3, length(topics))))
          end

          :ok = Dispatcher.subscribe(Enum.at(topics, rem(n, length(topics))))
          send(parent, {:subscribed, self()})
          subscriber_loop(topics)
        end)
      end

    for pid <- pids, do: assert_receive({:subscribed, ^pid}, 5_000)
    pids
  end

  defp subscriber_loop(topics) do
    receive do
      {:unsubscribe_all, from} ->
        for topic <- topics, do: :ok = Dispatcher.unsubscribe(topic)
        send(from, {:unsubscribed, self()})
        subscriber_loop(topics)

      _dispatched ->
        subscriber_loop(topics)
    end
  end

  defp all_zero?(stats), do: match?(%{topics: 0, subscriptions: 0, subscribers: 0}, stats)

  test "subscribers that exit leave no topic, subscription or monitor behind" do
    topics = for n <- 1..20, do: "cleanup:#{n}"
    pids = spawn_subscribers(300, topics)

    stats = RegistryBackend.stats()
    assert stats.subscribers == 300
    assert stats.subscriptions == 300 * 6
    assert stats.topics == 20

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

    assert all_zero?(RegistryBackend.stats())

    assert_no_longer_monitored(pids, dispatcher)
  end

  test "closing the registry (application stop) removes its monitors from live subscribers" do
    pids = spawn_subscribers(50, ["closing:1", "closing:2"])
    dispatcher = RegistryBackend.dispatcher!()
    stop_app()

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
