defmodule ExAtlas.Fly.Dispatcher.StatsCountersTest do
  # stats/0's `dispatches` and `deliveries` are exact on every delivery path: a small
  # topic's producer sending itself, a lane's sender (normal and dirty schedulers), the
  # producer sending to off-heap subscribers itself, many producers at once. Each
  # subscriber counts what it receives (with receive), and the counters must move by
  # exactly that. The tests restart the application: the module runs alone.
  use ExUnit.Case, async: false

  import ExAtlas.Test.FlyEnv

  alias ExAtlas.Fly.Dispatcher

  # A subscriber that subscribes `times` to `topic`, then receives until told to report
  # how many messages tagged `tag` it got.
  defp subscriber(topic, opts) do
    parent = self()
    times = Keyword.get(opts, :times, 1)
    queue = Keyword.get(opts, :message_queue_data, :on_heap)

    pid =
      spawn_link(fn ->
        Process.flag(:message_queue_data, queue)
        for _ <- 1..times, do: :ok = Dispatcher.subscribe(topic)
        send(parent, {:ready, self()})
        count(parent, 0)
      end)

    assert_receive {:ready, ^pid}, 5_000
    pid
  end

  defp count(parent, n) do
    receive do
      {:counted, _} -> count(parent, n + 1)
      {:report, ref} -> send(parent, {ref, n})
    end
  end

  defp received(pids) do
    Enum.reduce(pids, 0, fn pid, sum ->
      ref = make_ref()
      send(pid, {:report, ref})
      assert_receive {^ref, n}, 5_000
      sum + n
    end)
  end

  # Dispatches `dispatches` times to each topic from `producers` processes at once,
  # each calling sync/0 at the end; returns the counters' increase and what the
  # subscribers got.
  defp measure(topics, subscribers, dispatches, producers \\ 1, payload \\ nil) do
    before = Dispatcher.stats()

    1..producers
    |> Enum.map(fn p ->
      Task.async(fn ->
        for seq <- 1..dispatches,
            topic <- topics,
            do: :ok = Dispatcher.dispatch(topic, {:counted, {p, seq, payload}})

        :ok = Dispatcher.sync()
      end)
    end)
    |> Enum.each(&Task.await(&1, 30_000))

    later = Dispatcher.stats()

    {later.dispatches - before.dispatches, later.deliveries - before.deliveries,
     received(subscribers)}
  end

  for delivery <- [:scheduler, :dirty] do
    describe "delivery: #{delivery}" do
      setup do
        restart_app(lanes: 2, queue_capacity: 8, delivery: unquote(delivery))
      end

      test "small topics, sent by their producers: exact" do
        topics = for i <- 1..5, do: unique_topic("small#{i}")
        # 1 to 5 subscribers, one with a duplicate subscription: 16 at most per topic.
        subs =
          for {topic, i} <- Enum.with_index(topics, 1),
              j <- 1..i,
              do: subscriber(topic, times: if(j == 1, do: 2, else: 1))

        per_round = Enum.sum(for i <- 1..5, do: i + 1)
        assert {50, deliveries, got} = measure(topics, subs, 10)
        assert deliveries == got
        assert got == 10 * per_round
      end

      test "big topics, delivered by the senders: exact" do
        topic = unique_topic("big")
        subs = for _ <- 1..40, do: subscriber(topic, times: 2)
        assert {60, deliveries, got} = measure([topic], subs, 20, 3)
        assert deliveries == got
        assert got == 60 * 80
        assert Dispatcher.stats().delivered_batches > 0
      end

      test "big messages, whose batches outlast a timeslice (then dirty, with :dirty): exact" do
        topic = unique_topic("big_messages")
        subs = for _ <- 1..20, do: subscriber(topic, times: 2)
        # About 1.6 MB copied per send: a few sends fill a sender's 0.5 ms timeslice.
        payload = Enum.to_list(1..100_000)
        assert {6, deliveries, got} = measure([topic], subs, 3, 2, payload)
        assert deliveries == got
        assert got == 6 * 40
      end

      test "off-heap subscribers, sent to by the producer itself: exact" do
        topic = unique_topic("direct")

        subs =
          for i <- 1..30,
              do:
                subscriber(topic,
                  message_queue_data: if(rem(i, 2) == 0, do: :off_heap, else: :on_heap)
                )

        assert {25, deliveries, got} = measure([topic], subs, 5, 5)
        assert deliveries == got
        assert got == 25 * 30
      end
    end
  end

  test "a dispatch to a topic without subscribers counts as a dispatch, delivering none" do
    before = Dispatcher.stats()
    :ok = Dispatcher.dispatch(unique_topic("nobody"), :m)
    later = Dispatcher.stats()
    assert later.dispatches - before.dispatches == 1
    assert later.deliveries == before.deliveries
  end
end
