defmodule ExAtlas.Fly.Dispatcher.StatsTest do
  # ExAtlas.Fly.Dispatcher.stats/0 in every mode. The tests restart the application (for
  # a registry with known figures) or change the mode, so the module runs alone.
  use ExUnit.Case, async: false

  import ExAtlas.Test.FlyEnv

  alias ExAtlas.Fly.Dispatcher

  @keys [
    :subscriptions,
    :topics,
    :subscribers,
    :lanes,
    :queue_capacity,
    :in_flight,
    :peak_in_flight,
    :delivered_batches,
    :dispatches,
    :deliveries,
    :waiting,
    :lost_batches,
    :lost_deliveries,
    :replay_messages,
    :replay_bytes,
    :replay_cuts,
    :replay_missed,
    :skipping,
    :skipped,
    :cluster
  ]

  @zero %{
    subscriptions: 0,
    topics: 0,
    subscribers: 0,
    lanes: 0,
    queue_capacity: 0,
    in_flight: 0,
    peak_in_flight: 0,
    delivered_batches: 0,
    dispatches: 0,
    deliveries: 0,
    waiting: 0,
    lost_batches: 0,
    lost_deliveries: 0,
    replay_messages: 0,
    replay_bytes: 0,
    replay_cuts: 0,
    replay_missed: 0,
    skipping: 0,
    skipped: 0,
    cluster: %{}
  }

  setup do
    remove_phoenix_pubsub()
    on_exit(&remove_phoenix_pubsub/0)
    :ok
  end

  describe ":registry mode" do
    setup do
      restart_app(lanes: 2, queue_capacity: 16)
    end

    test "the registry's figures, with an empty cluster map outside cluster mode" do
      assert Enum.sort(Map.keys(Dispatcher.stats())) == Enum.sort(@keys)

      assert %{subscriptions: 0, topics: 0, subscribers: 0, lanes: 2, queue_capacity: 16} =
               Dispatcher.stats()

      [a, b] = topics = [unique_topic("stats:a"), unique_topic("stats:b")]
      :ok = Dispatcher.subscribe(a)
      :ok = Dispatcher.subscribe(a)
      :ok = Dispatcher.subscribe(b)
      other = spawn_subscriber(b)

      for topic <- topics, _ <- 1..3, do: :ok = Dispatcher.dispatch(topic, :counted)
      :ok = Dispatcher.sync()

      # Every figure is known: small dispatches to idle lanes are sent inline, without a
      # batch, so no lane ever had one in flight.
      assert Dispatcher.stats() == %{
               @zero
               | subscriptions: 4,
                 topics: 2,
                 subscribers: 2,
                 lanes: 2,
                 queue_capacity: 16,
                 # 6 dispatches to 2 subscriptions each, all sent inline.
                 dispatches: 6,
                 deliveries: 12
             }

      # Batches: a topic past 16 subscriptions goes to the senders. One process holds all
      # 17, so one lane has them: with every sender suspended, each dispatch holds one
      # batch in flight there until the senders run again.
      big = unique_topic("stats:big")
      fan = spawn_subscriptions(big, 17)
      senders = ExAtlas.Fly.Dispatcher.Server.senders()
      for sender <- senders, do: true = :erlang.suspend_process(sender)

      held =
        try do
          for seq <- 1..3, do: :ok = Dispatcher.dispatch(big, {:counted, seq})
          Dispatcher.stats()
        after
          for sender <- senders, do: :erlang.resume_process(sender)
        end

      assert %{in_flight: 3, peak_in_flight: 3, delivered_batches: 0, waiting: 0} = held
      :ok = Dispatcher.sync()
      assert %{in_flight: 0, peak_in_flight: 3, delivered_batches: 3} = Dispatcher.stats()
      # The senders' deliveries are counted too: 3 dispatches of 17.
      assert %{dispatches: 9, deliveries: 63} = Dispatcher.stats()

      Process.exit(fan, :kill)
      Process.exit(other, :kill)
      :ok = Dispatcher.unsubscribe(a)
      :ok = Dispatcher.unsubscribe(b)
      eventually(fn -> match?(%{subscriptions: 0, topics: 0}, Dispatcher.stats()) end)
    end

    # A process subscribed `n` times to `topic`, which never reads its mailbox.
    defp spawn_subscriptions(topic, n) do
      parent = self()

      pid =
        spawn(fn ->
          for _ <- 1..n, do: :ok = Dispatcher.subscribe(topic)
          send(parent, {:subscribed, self()})
          Process.sleep(:infinity)
        end)

      assert_receive {:subscribed, ^pid}, 5_000
      pid
    end

    test "raises ArgumentError when no registry runs" do
      restart_app(enabled: false)
      assert_raise ArgumentError, ~r/registry is not running/, &Dispatcher.stats/0
    end

    test ":phoenix_pubsub without Phoenix.PubSub falls back to the registry's figures" do
      put_fly(dispatcher: :phoenix_pubsub, pubsub: MyApp.PubSub)
      assert %{lanes: 2, queue_capacity: 16, cluster: %{}} = Dispatcher.stats()
    end
  end

  describe "modes without a registry" do
    test "{:mfa, _}: every figure zero and no cluster" do
      put_fly(dispatcher: {:mfa, {ExAtlas.Test.Sink, :drop, []}})
      assert Dispatcher.stats() == @zero
    end

    test ":phoenix_pubsub: every figure zero and no cluster" do
      define_phoenix_pubsub(ExAtlas.StatsTest.PubSub)
      put_fly(dispatcher: :phoenix_pubsub, pubsub: ExAtlas.StatsTest.PubSub)
      :ok = Dispatcher.subscribe("stats:pubsub")
      assert Dispatcher.stats() == @zero
    end
  end
end
