defmodule ExAtlas.Fly.DispatcherTest do
  # The public API in the default `:registry` mode, against the registry the `:ex_atlas`
  # application started. Every test uses topics of its own, so the module runs async.
  use ExUnit.Case, async: true

  alias ExAtlas.Fly.Dispatcher
  import ExAtlas.Test.FlyEnv, only: [unique_topic: 0, unique_topic: 1]

  doctest ExAtlas.Fly.Dispatcher

  describe "subscribe/1 and dispatch/2" do
    test "deliver a dispatched message to the subscriber" do
      topic = unique_topic("logs")
      assert :ok = Dispatcher.subscribe(topic)
      assert :ok = Dispatcher.dispatch(topic, {:ex_atlas_fly_logs, "app", [%{"msg" => "hi"}]})
      assert_receive {:ex_atlas_fly_logs, "app", [%{"msg" => "hi"}]}, 5_000
    end

    test "deliver to every subscriber process, and not to other topics" do
      topic = unique_topic()
      other = unique_topic()
      parent = self()

      subscribers =
        for topic <- [topic, topic, topic, other] do
          spawn_link(fn ->
            :ok = Dispatcher.subscribe(topic)
            send(parent, {:subscribed, self()})

            receive do
              message -> send(parent, {:got, self(), message})
            end
          end)
        end

      for pid <- subscribers, do: assert_receive({:subscribed, ^pid}, 5_000)

      :ok = Dispatcher.dispatch(topic, :hello)
      :ok = Dispatcher.sync()

      for pid <- Enum.take(subscribers, 3), do: assert_receive({:got, ^pid, :hello}, 5_000)
      [other_pid] = Enum.drop(subscribers, 3)
      refute_received {:got, ^other_pid, _}
    end

    test "dispatch to a topic without subscribers returns :ok" do
      assert :ok = Dispatcher.dispatch(unique_topic(), :nobody_listens)
      assert :ok = Dispatcher.sync()
      refute_received :nobody_listens
    end

    test "the empty binary is a topic like any other" do
      # Other async tests never use "", but keep the subscription short anyway.
      :ok = Dispatcher.subscribe("")
      :ok = Dispatcher.dispatch("", :empty_topic)
      :ok = Dispatcher.sync()
      :ok = Dispatcher.unsubscribe("")
      assert_received :empty_topic
    end

    test "subscribe_with_backpressure/2 subscribes the caller" do
      topic = unique_topic()
      assert :ok = Dispatcher.subscribe_with_backpressure(topic)
      assert :ok = Dispatcher.subscribe_with_backpressure(topic, threshold: 100)
      assert Dispatcher.subscribers(topic) == [self(), self()]
      :ok = Dispatcher.dispatch(topic, :bp)
      assert_receive :bp, 5_000
      assert_receive :bp, 5_000
    end
  end

  describe "messages arrive unchanged" do
    setup do
      topic = unique_topic("terms")
      :ok = Dispatcher.subscribe(topic)
      %{topic: topic}
    end

    test "any term, compared with ==", %{topic: topic} do
      big = :rand.bytes(4 * 1024 * 1024)
      <<_::binary-size(1000), sub::binary-size(100_000), _::binary>> = big
      ref = make_ref()
      {pid, monitor} = spawn_monitor(fn -> :ok end)
      assert_receive {:DOWN, ^monitor, :process, ^pid, :normal}, 5_000

      terms = [
        big,
        sub,
        <<1::3>>,
        "",
        ref,
        self(),
        pid,
        make_ref(),
        :atom,
        :"with space and ünïcode",
        123_456_789_012_345_678_901_234_567_890,
        -1,
        3.14159,
        -0.0,
        {},
        {:ex_atlas_fly_logs, "app", Enum.map(1..20, &%{"line" => &1, "level" => "info"})},
        [1, 2 | :improper],
        %{ref => [pid, {big, sub}], "nested" => %{list: [1.0, :x, "y"]}},
        Enum.to_list(1..10_000),
        &Enum.map/2
      ]

      for term <- terms, do: :ok = Dispatcher.dispatch(topic, {:term, term})

      for term <- terms do
        assert_receive {:term, received}, 5_000
        assert received === term
      end
    end

    test "funs arrive callable, with their closure", %{topic: topic} do
      secret = {:rand.uniform(1_000_000), "closure"}
      fun = fn x -> {x, secret} end
      :ok = Dispatcher.dispatch(topic, {:fun, fun})
      assert_receive {:fun, received}, 5_000
      assert received == fun
      assert received.(:arg) == {:arg, secret}
    end

    test "a message outlives the process that dispatched it", %{topic: topic} do
      payload = :rand.bytes(1024 * 1024)

      {pid, monitor} =
        spawn_monitor(fn ->
          for n <- 1..20, do: :ok = Dispatcher.dispatch(topic, {:from_dead, n, payload})
        end)

      assert_receive {:DOWN, ^monitor, :process, ^pid, :normal}, 5_000
      :erlang.garbage_collect()

      for n <- 1..20 do
        assert_receive {:from_dead, ^n, received}, 5_000
        assert received == payload
      end
    end
  end

  describe "sync/0" do
    test "returns once earlier dispatches are in every subscriber's mailbox" do
      topic = unique_topic()
      parent = self()

      # Subscribers that never read their mailbox until told to.
      subscribers =
        for _ <- 1..20 do
          spawn_link(fn ->
            :ok = Dispatcher.subscribe(topic)
            send(parent, {:subscribed, self()})

            receive do
              :stop -> :ok
            end
          end)
        end

      for pid <- subscribers, do: assert_receive({:subscribed, ^pid}, 5_000)

      for round <- 1..5 do
        for n <- 1..50, do: :ok = Dispatcher.dispatch(topic, {:n, n, :binary.copy("x", 512)})
        assert :ok = Dispatcher.sync()

        for pid <- subscribers do
          assert {:message_queue_len, round * 50} == Process.info(pid, :message_queue_len)
        end
      end

      for pid <- subscribers, do: send(pid, :stop)
    end

    test "leaves nothing of its own in the caller's mailbox" do
      for _ <- 1..10, do: assert(:ok = Dispatcher.sync())
      assert {:messages, []} = Process.info(self(), :messages)
    end

    test "leaves the caller's own :DOWN messages alone" do
      {pid, ref} = spawn_monitor(fn -> :ok end)
      # Wait for the exit without receiving the :DOWN message.
      ExAtlas.Test.FlyEnv.eventually(fn -> not Process.alive?(pid) end)

      ExAtlas.Test.FlyEnv.eventually(fn ->
        Process.info(self(), :message_queue_len) != {:message_queue_len, 0}
      end)

      assert :ok = Dispatcher.sync()

      assert {:messages, [{:DOWN, ^ref, :process, ^pid, :normal}]} =
               Process.info(self(), :messages)
    end

    test "does not consume messages that were already in the mailbox" do
      send(self(), :before)
      topic = unique_topic()
      :ok = Dispatcher.subscribe(topic)
      :ok = Dispatcher.dispatch(topic, :dispatched)
      :ok = Dispatcher.sync()
      assert {:messages, [:before, :dispatched]} = Process.info(self(), :messages)
    end
  end

  describe "count/1 and subscribers/1" do
    test "are 0 and [] for an unknown topic" do
      topic = unique_topic()
      assert Dispatcher.count(topic) == 0
      assert Dispatcher.subscribers(topic) == []
    end

    test "see the subscriptions of several processes" do
      topic = unique_topic()
      parent = self()

      pids =
        for n <- 1..3 do
          spawn_link(fn ->
            for _ <- 1..n, do: :ok = Dispatcher.subscribe(topic)
            send(parent, {:subscribed, self()})
            Process.sleep(:infinity)
          end)
        end

      for pid <- pids, do: assert_receive({:subscribed, ^pid}, 5_000)

      assert Dispatcher.count(topic) == 6
      [a, b, c] = pids
      assert Enum.sort(Dispatcher.subscribers(topic)) == Enum.sort([a, b, b, c, c, c])
    end
  end

  describe "ArgumentError for topics that are not binaries" do
    @bad_topics [:atom, 'charlist', 42, {"tuple"}, nil, ["io", "list"], %{}]

    for {name, call} <- [
          subscribe: quote(do: &Dispatcher.subscribe/1),
          unsubscribe: quote(do: &Dispatcher.unsubscribe/1),
          dispatch: quote(do: &Dispatcher.dispatch(&1, :message)),
          count: quote(do: &Dispatcher.count/1),
          subscribers: quote(do: &Dispatcher.subscribers/1),
          subscribe_with_backpressure: quote(do: &Dispatcher.subscribe_with_backpressure/1)
        ] do
      test "#{name}/1 names the bad value" do
        call = unquote(call)

        for topic <- @bad_topics do
          error = assert_raise ArgumentError, fn -> call.(topic) end
          assert error.message =~ "topic"
          assert error.message =~ inspect(topic)
        end
      end
    end
  end

  test "needs_registry?/0 is true in the default mode" do
    assert Dispatcher.needs_registry?()
  end

  test "registry_name/0 is an atom naming the running registry process" do
    name = Dispatcher.registry_name()
    assert is_atom(name)
    assert is_pid(Process.whereis(name))
  end
end
