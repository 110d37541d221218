defmodule ExAtlas.Fly.Dispatcher.RegistryBackendTest do
  # Registry semantics of the default mode: duplicate keys as in Elixir's `Registry`,
  # unsubscribe, and cleanup of subscribers that exit. Topics are unique per test.
  use ExUnit.Case, async: true

  alias ExAtlas.Fly.Dispatcher
  alias ExAtlas.Fly.Dispatcher.Backend.Registry, as: RegistryBackend
  import ExAtlas.Test.FlyEnv, only: [eventually: 1, unique_topic: 0]

  defp monitored_by_registry?(pid) do
    {:monitored_by, monitors} = Process.info(pid, :monitored_by)
    RegistryBackend.dispatcher!() in monitors
  end

  # Lets the calling process handle pending signals (monitor/demonitor) before checking.
  defp settle_signals, do: receive(after: (50 -> :ok))

  defp flush(acc \\ []) do
    receive do
      message -> flush([message | acc])
    after
      0 -> Enum.reverse(acc)
    end
  end

  describe "duplicate keys" do
    test "subscribing twice delivers twice" do
      topic = unique_topic()
      :ok = Dispatcher.subscribe(topic)
      :ok = Dispatcher.subscribe(topic)

      assert Dispatcher.count(topic) == 2
      assert Dispatcher.subscribers(topic) == [self(), self()]

      :ok = Dispatcher.dispatch(topic, :twice)
      :ok = Dispatcher.sync()
      assert flush() == [:twice, :twice]
    end

    test "unsubscribe/1 removes all of the caller's entries for the topic, and only those" do
      topic = unique_topic()
      kept = unique_topic()
      for _ <- 1..3, do: :ok = Dispatcher.subscribe(topic)
      :ok = Dispatcher.subscribe(kept)

      assert :ok = Dispatcher.unsubscribe(topic)
      assert Dispatcher.count(topic) == 0
      assert Dispatcher.subscribers(topic) == []
      assert Dispatcher.count(kept) == 1

      :ok = Dispatcher.dispatch(topic, :gone)
      :ok = Dispatcher.dispatch(kept, :kept)
      :ok = Dispatcher.sync()
      assert flush() == [:kept]
    end

    test "unsubscribe/1 leaves other processes' entries alone" do
      topic = unique_topic()
      parent = self()

      other =
        spawn_link(fn ->
          :ok = Dispatcher.subscribe(topic)
          :ok = Dispatcher.subscribe(topic)
          send(parent, :subscribed)
          Process.sleep(:infinity)
        end)

      assert_receive :subscribed, 5_000
      :ok = Dispatcher.subscribe(topic)
      :ok = Dispatcher.unsubscribe(topic)
      assert Dispatcher.subscribers(topic) == [other, other]
    end

    test "unsubscribing from an unknown topic, or twice, is :ok" do
      topic = unique_topic()
      assert :ok = Dispatcher.unsubscribe(topic)
      :ok = Dispatcher.subscribe(topic)
      assert :ok = Dispatcher.unsubscribe(topic)
      assert :ok = Dispatcher.unsubscribe(topic)
      assert Dispatcher.count(topic) == 0
    end

    test "agrees with Elixir's Registry (keys: :duplicate) over random operations" do
      topics = for _ <- 1..3, do: unique_topic()
      registry = :"registry_model_#{System.unique_integer([:positive])}"
      start_supervised!({Registry, keys: :duplicate, name: registry})
      workers = for _ <- 1..4, do: spawn_link(fn -> worker_loop(registry) end)
      :rand.seed(:exsss, {3, 14, 15})

      for _step <- 1..300 do
        worker = Enum.random(workers)
        topic = Enum.random(topics)
        op = Enum.random([:subscribe, :subscribe, :unsubscribe])
        send(worker, {op, topic, self()})
        assert_receive {:done, ^worker}, 5_000

        for topic <- topics do
          expected = for {pid, _} <- Registry.lookup(registry, topic), do: pid
          assert Enum.sort(Dispatcher.subscribers(topic)) == Enum.sort(expected)
          assert Dispatcher.count(topic) == length(expected)
        end
      end

      # And deliveries match: one message per entry.
      for topic <- topics do
        :ok = Dispatcher.dispatch(topic, {:model, topic})
        :ok = Dispatcher.sync()

        for pid <- Enum.uniq(for {pid, _} <- Registry.lookup(registry, topic), do: pid) do
          send(pid, {:report, topic, self()})
        end
      end

      for topic <- topics do
        entries = Registry.lookup(registry, topic)
        per_pid = Enum.frequencies_by(entries, fn {pid, _} -> pid end)

        for {pid, expected} <- per_pid do
          assert_receive {:received, ^pid, ^topic, ^expected}, 5_000
        end
      end
    end
  end

  defp worker_loop(registry) do
    receive do
      {:subscribe, topic, from} ->
        :ok = Dispatcher.subscribe(topic)
        {:ok, _} = Registry.register(registry, topic, nil)
        send(from, {:done, self()})

      {:unsubscribe, topic, from} ->
        :ok = Dispatcher.unsubscribe(topic)
        :ok = Registry.unregister(registry, topic)
        send(from, {:done, self()})

      {:report, topic, from} ->
        count = count_model_messages(topic, 0)
        send(from, {:received, self(), topic, count})
    end

    worker_loop(registry)
  end

  defp count_model_messages(topic, n) do
    receive do
      {:model, ^topic} -> count_model_messages(topic, n + 1)
    after
      0 -> n
    end
  end

  describe "subscribers that exit" do
    test "are removed from every topic; count/1 and subscribers/1 agree" do
      topic_a = unique_topic()
      topic_b = unique_topic()
      parent = self()

      subscribers =
        for n <- 1..40 do
          spawn(fn ->
            :ok = Dispatcher.subscribe(topic_a)
            if rem(n, 3) == 0, do: :ok = Dispatcher.subscribe(topic_a)
            if rem(n, 2) == 0, do: :ok = Dispatcher.subscribe(topic_b)
            send(parent, {:subscribed, self()})

            receive do
              :exit_normally -> :ok
            end
          end)
        end

      for pid <- subscribers, do: assert_receive({:subscribed, ^pid}, 5_000)
      assert Dispatcher.count(topic_a) == 40 + 13
      assert Dispatcher.count(topic_b) == 20

      {dying, alive} = Enum.split_with(Enum.with_index(subscribers, 1), fn {_, n} -> n <= 24 end)

      for {pid, n} <- dying do
        if rem(n, 2) == 0, do: Process.exit(pid, :kill), else: send(pid, :exit_normally)
      end

      # Dispatching while they die must not disturb anything.
      :ok = Dispatcher.dispatch(topic_a, :while_dying)

      expected_a =
        Enum.flat_map(alive, fn {pid, n} -> if rem(n, 3) == 0, do: [pid, pid], else: [pid] end)

      expected_b = for {pid, n} <- alive, rem(n, 2) == 0, do: pid

      eventually(fn -> Dispatcher.count(topic_a) == length(expected_a) end)
      eventually(fn -> Dispatcher.count(topic_b) == length(expected_b) end)

      assert Enum.sort(Dispatcher.subscribers(topic_a)) == Enum.sort(expected_a)
      assert Enum.sort(Dispatcher.subscribers(topic_b)) == Enum.sort(expected_b)
      assert Dispatcher.count(topic_a) == length(Dispatcher.subscribers(topic_a))
      assert Dispatcher.count(topic_b) == length(Dispatcher.subscribers(topic_b))

      for {pid, _} <- alive, do: Process.exit(pid, :kill)
      eventually(fn -> Dispatcher.count(topic_a) == 0 and Dispatcher.count(topic_b) == 0 end)
      assert Dispatcher.subscribers(topic_a) == []
      assert Dispatcher.subscribers(topic_b) == []
    end

    test "a process that subscribed and exited at once leaves nothing behind" do
      topic = unique_topic()

      pids =
        for _ <- 1..200 do
          {pid, ref} = spawn_monitor(fn -> :ok = Dispatcher.subscribe(topic) end)
          {pid, ref}
        end

      for {pid, ref} <- pids, do: assert_receive({:DOWN, ^ref, :process, ^pid, _}, 5_000)
      eventually(fn -> Dispatcher.count(topic) == 0 end)
      assert Dispatcher.subscribers(topic) == []
    end
  end

  describe "the process monitor" do
    test "is set by the first subscription and removed with the last one" do
      topic_a = unique_topic()
      topic_b = unique_topic()
      settle_signals()
      refute monitored_by_registry?(self())

      :ok = Dispatcher.subscribe(topic_a)
      :ok = Dispatcher.subscribe(topic_a)
      :ok = Dispatcher.subscribe(topic_b)
      settle_signals()
      assert monitored_by_registry?(self())

      :ok = Dispatcher.unsubscribe(topic_a)
      settle_signals()
      assert monitored_by_registry?(self())

      :ok = Dispatcher.unsubscribe(topic_b)
      settle_signals()
      refute monitored_by_registry?(self())

      # And it comes back for a new subscription.
      :ok = Dispatcher.subscribe(topic_b)
      settle_signals()
      assert monitored_by_registry?(self())
      :ok = Dispatcher.unsubscribe(topic_b)
    end
  end

  describe "unsubscribe/1" do
    test "nothing dispatched after it returns reaches the caller (same process)" do
      topic = unique_topic()
      :ok = Dispatcher.subscribe(topic)
      :ok = Dispatcher.subscribe(topic)

      for n <- 1..200, do: :ok = Dispatcher.dispatch(topic, {:n, n})
      :ok = Dispatcher.unsubscribe(topic)
      for n <- 201..400, do: :ok = Dispatcher.dispatch(topic, {:n, n})
      :ok = Dispatcher.sync()

      # Dispatched before: delivered (twice, in order); after: never.
      assert flush() == Enum.flat_map(1..200, &[{:n, &1}, {:n, &1}])
    end

    test "nothing dispatched after it returns reaches the caller (other dispatching process)" do
      topic = unique_topic()
      parent = self()
      unsubscribers = 12

      # A subscriber that stays, to prove the stream went on after the cut.
      stayer = spawn_link(fn -> collect_until_done(topic, parent, :stay) end)

      quitters =
        for i <- 1..unsubscribers do
          spawn_link(fn -> collect_until_done(topic, parent, {:quit_after, i * 25}) end)
        end

      for pid <- [stayer | quitters], do: assert_receive({:ready, ^pid}, 5_000)

      producer =
        spawn_link(fn ->
          :ok = produce(topic, 1, unsubscribers, nil)
          :ok = Dispatcher.sync()
          for pid <- [stayer | quitters], do: send(pid, :done)
        end)

      for pid <- quitters do
        send(pid, {:producer, producer})
      end

      assert_receive {:result, ^stayer, stayer_seen, nil}, 10_000
      last = List.last(stayer_seen)
      assert stayer_seen == Enum.to_list(1..last)

      for pid <- quitters do
        assert_receive {:result, ^pid, seen, cut}, 10_000
        assert is_integer(cut)
        # Contiguous from 1, and nothing at or after the cut.
        assert seen == Enum.to_list(1..length(seen))
        assert length(seen) < cut
        assert cut <= last
      end
    end
  end

  # Dispatches {:n, n} until every quitter reported its unsubscribe, then 300 more. `cut`
  # answered to a quitter is the first n dispatched after its notice arrived.
  defp produce(_topic, n, 0, stop_at) when is_integer(stop_at) and n >= stop_at, do: :ok

  defp produce(topic, n, waiting, stop_at) do
    receive do
      {:unsubscribed, pid} ->
        send(pid, {:cut, n})
        waiting = waiting - 1
        produce(topic, n, waiting, if(waiting == 0, do: n + 300, else: stop_at))
    after
      0 ->
        :ok = Dispatcher.dispatch(topic, {:n, n})
        produce(topic, n + 1, waiting, stop_at)
    end
  end

  defp collect_until_done(topic, parent, role) do
    :ok = Dispatcher.subscribe(topic)
    send(parent, {:ready, self()})

    {seen, cut} =
      case role do
        :stay ->
          {collect([]), nil}

        {:quit_after, count} ->
          producer =
            receive do
              {:producer, pid} -> pid
            end

          seen = Enum.map(1..count, fn _ -> receive(do: ({:n, n} -> n)) end)
          :ok = Dispatcher.unsubscribe(topic)
          send(producer, {:unsubscribed, self()})
          cut = receive(do: ({:cut, cut} -> cut))
          {seen ++ collect([]), cut}
      end

    send(parent, {:result, self(), seen, cut})
  end

  defp collect(acc) do
    receive do
      {:n, n} -> collect([n | acc])
      :done -> Enum.reverse(acc)
    end
  end
end
