defmodule ExAtlas.Fly.Dispatcher.ClusterReplayTest do
  # Replay in cluster mode: each node's history holds the dispatches made on every node,
  # including topics that no node subscribes to, so a subscriber on any node is replayed
  # what one on the producer's node would be, and what a node's history misses after a
  # cut is what was counted as dropped for it. Peer nodes as in cluster_test.exs, all
  # with `replay: @kept`.
  use ExUnit.Case, async: false

  import ExAtlas.Test.FlyEnv, only: [restart_app: 1, unique_topic: 1, eventually: 2]
  import ExAtlas.Test.Replay, only: [account: 3, split_gaps: 1]

  alias ExAtlas.Fly.Dispatcher
  alias ExAtlas.Fly.Dispatcher.Cluster
  alias ExAtlas.Test.Cluster, as: Peers

  @moduletag :cluster
  @moduletag timeout: 120_000
  # Dispatches kept per topic on every node.
  @kept 5_000
  # The peers' per-node queue: a cut of a peer from another one outlasts it.
  @peer_queue 500

  # What runs on a peer beyond ExAtlas.Test.Cluster: the peers load the library and
  # test/support from the build, not the modules of this file, so setup_all loads this
  # one there (`:code.load_binary/3`) from the object code `defmodule` returns.
  {:module, _, beam, _} =
    defmodule OnPeer do
      @moduledoc false
      alias ExAtlas.Fly.Dispatcher
      alias ExAtlas.Fly.Dispatcher.Backend.Registry, as: RegistryBackend
      alias ExAtlas.Fly.Dispatcher.Native
      alias ExAtlas.Test.Replay

      @doc false
      def payload, do: for(i <- 1..10, do: %{"line" => i, "text" => "replayed line #{i}"})

      # replay_test.exs's stalled joiner, on a peer: joins `topic` through the NIF asking
      # for `n` (as subscribe(topic, replay: n) does), sends itself one chunk of its
      # replay, tells `parent` `{ref, :mid_replay, answer}` and waits there (the test
      # suspends it). On `{ref, :go}` it goes on with the production code
      # (`RegistryBackend.catch_up/2`) and sends `{ref, result, what it got}`; on
      # `{ref, :live}`, `{ref, :live, what it got since}`.
      @doc false
      def stalled_joiner(parent, ref, topic, n) do
        dispatcher = RegistryBackend.dispatcher!()
        :ok = Native.join(dispatcher, topic, n, false)
        send(parent, {ref, :mid_replay, Native.replay(dispatcher, topic)})

        receive do
          {^ref, :go} -> :ok
        end

        result = RegistryBackend.catch_up(dispatcher, topic)
        send(parent, {ref, result, Replay.drain()})

        receive do
          {^ref, :live} -> send(parent, {ref, :live, Replay.drain()})
        after
          60_000 -> :ok
        end
      end

      # A subscriber with `on_slow: :catch_up` whose watchdog never acts on its own (the
      # test parks it): `{ref, :subscribed}`; on `{ref, :park}` it is parked,
      # `{ref, :parked, true}`; on `{ref, :catch_up}` it catches up and sends
      # `{ref, :got, what it got}`; on `{ref, :unsubscribe}` it unsubscribes and sends
      # `{ref, :unsubscribed}`.
      @doc false
      def parking_subscriber(parent, ref, topic) do
        opts = [on_slow: :catch_up, threshold: 1_000_000, poll_ms: 3_600_000]
        :ok = Dispatcher.subscribe_with_backpressure(topic, opts)
        send(parent, {ref, :subscribed})

        receive do
          {^ref, :park} -> send(parent, {ref, :parked, RegistryBackend.park(topic, self())})
        end

        receive do
          {^ref, :catch_up} ->
            :ok = Dispatcher.catch_up(topic)
            send(parent, {ref, :got, Replay.drain()})

          {^ref, :unsubscribe} ->
            :ok = Dispatcher.unsubscribe(topic)
            send(parent, {ref, :unsubscribed})
            Process.sleep(:infinity)
        end
      end

      # Dispatches `{:seq, p, n, payload}` to `topic` for each n of `range`, then sends
      # `{:produced, p, sync(:cluster)}` to `parent`.
      @doc false
      def produce(parent, topic, p, range) do
        for n <- range, do: :ok = Dispatcher.dispatch(topic, {:seq, p, n, payload()})
        send(parent, {:produced, p, Dispatcher.sync(:cluster)})
      end
    end

  @on_peer_beam beam

  setup_all do
    [b, c] =
      Peers.start_peers("ex_atlas_replay", [:b, :c],
        cluster: true,
        replay: @kept,
        cluster_queue: @peer_queue
      )

    for node <- [b, c] do
      {:module, OnPeer} =
        :erpc.call(node, :code, :load_binary, [OnPeer, ~c"#{__ENV__.file}", @on_peer_beam])
    end

    %{b: b, c: c}
  end

  setup %{b: b, c: c} do
    restart_app(cluster: true, replay: @kept)
    # This node forwards to b and c once their relays have welcomed its new links.
    eventually(fn -> Enum.sort(Cluster.peers()) == Enum.sort([b, c]) end, 10_000)
    :ok
  end

  test "a node's history holds what another node dispatched to a topic nobody subscribes to",
       %{b: b, c: c} do
    topic = unique_topic("replay:nobody")
    before = for node <- [b, c], into: %{}, do: {node, received(node)}
    count = @kept + 50

    for seq <- 1..count, do: :ok = Dispatcher.dispatch(topic, {:p, :a, seq})
    assert :ok = Dispatcher.sync(:cluster)

    # No node has a subscriber, and each got one message per dispatch.
    for node <- [node(), b, c],
        do: assert(:erpc.call(node, Dispatcher, :count, [topic]) == 0)

    assert :pg.get_members(Cluster.scope(), topic) == []
    for node <- [b, c], do: assert(received(node) - before[node] == count)

    # The last min(n, @kept), then live, nothing else.
    few_b = Peers.replay_subscriber(b, topic, 10)
    all_b = Peers.replay_subscriber(b, topic, 1_000_000)
    all_c = Peers.replay_subscriber(c, topic, @kept)
    none_c = Peers.replay_subscriber(c, topic, 0)
    :ok = Dispatcher.dispatch(topic, {:p, :a, count + 1})
    assert :ok = Dispatcher.sync(:cluster)

    assert Peers.report(few_b) == messages(:a, (count - 9)..(count + 1))
    assert Peers.report(all_b) == messages(:a, (count - @kept + 1)..(count + 1))
    assert Peers.report(all_c) == messages(:a, (count - @kept + 1)..(count + 1))
    assert Peers.report(none_c) == messages(:a, (count + 1)..(count + 1))

    # And the producer's own node replays the same.
    here = Peers.replay_subscriber(node(), topic, 1_000_000)
    assert Peers.report(here) == messages(:a, (count - @kept + 2)..(count + 1))

    for node <- [b, c], do: assert(Cluster.stats()[node].dropped == 0)
  end

  test "replay off on the producer's node: only nodes with subscribers get its dispatches",
       %{b: b, c: c} do
    restart_app(cluster: true, replay: 0)
    eventually(fn -> Enum.sort(Cluster.peers()) == Enum.sort([b, c]) end, 10_000)
    topic = unique_topic("replay:off_here")
    _sub_b = Peers.subscriber(b, topic)
    Peers.await_visible(node(), topic, [b])
    before = for node <- [b, c], into: %{}, do: {node, received(node)}

    for seq <- 1..100, do: :ok = Dispatcher.dispatch(topic, {:p, :a, seq})
    assert :ok = Dispatcher.sync(:cluster)

    assert received(b) - before[b] == 100
    assert received(c) - before[c] == 0
    # c keeps a history, but this node sent it nothing to keep.
    assert Peers.report(Peers.replay_subscriber(c, topic, 1_000_000)) == []
  end

  test "replay off here: a subscriber parked on b keeps b's interest and catches up on all",
       %{b: b, c: c} do
    # This node forwards only to nodes with interest. b's only subscriber is parked
    # (on_slow: :catch_up): out of b's registry, but b still wants the topic, for it.
    restart_app(cluster: true, replay: 0)
    eventually(fn -> Enum.sort(Cluster.peers()) == Enum.sort([b, c]) end, 10_000)
    topic = unique_topic("replay:parked")
    ref = make_ref()
    sub = Node.spawn(b, OnPeer, :parking_subscriber, [self(), ref, topic])
    assert_receive {^ref, :subscribed}, 10_000
    Peers.await_visible(node(), topic, [b])
    send(sub, {ref, :park})
    assert_receive {^ref, :parked, true}, 10_000
    assert :erpc.call(b, Dispatcher, :count, [topic]) == 0
    # b's relay was told, and stays in the topic's group.
    Process.sleep(200)
    Peers.await_visible(node(), topic, [b])

    for seq <- 1..100, do: :ok = Dispatcher.dispatch(topic, {:p, :a, seq})
    assert :ok = Dispatcher.sync(:cluster)
    send(sub, {ref, :catch_up})
    assert_receive {^ref, :got, got}, 10_000
    assert got == messages(:a, 1..100)
    assert Cluster.stats()[b].dropped == 0
  end

  # The node's interest went with its last parked subscriber: no registry change told
  # the relay (the subscriber had left the registry when it was parked), so the history's
  # does. Before, b stayed in the group until the topic next changed there.
  for way <- [:unsubscribe, :exit] do
    test "a subscriber parked on b that leaves (#{way}) takes b out of the topic's group",
         %{b: b} do
      topic = unique_topic("replay:parked_#{unquote(way)}")
      ref = make_ref()
      sub = Node.spawn(b, OnPeer, :parking_subscriber, [self(), ref, topic])
      assert_receive {^ref, :subscribed}, 10_000
      send(sub, {ref, :park})
      assert_receive {^ref, :parked, true}, 10_000
      Peers.await_visible(node(), topic, [b])

      case unquote(way) do
        :unsubscribe ->
          send(sub, {ref, :unsubscribe})
          assert_receive {^ref, :unsubscribed}, 10_000

        :exit ->
          Process.exit(sub, :kill)
      end

      eventually(
        fn -> Enum.all?(:pg.get_members(Cluster.scope(), topic), &(node(&1) != b)) end,
        10_000
      )

      assert :erpc.call(b, :pg, :get_local_members, [Cluster.scope(), topic]) == []
      assert :erpc.call(b, Dispatcher, :stats, []).skipping == 0
      Process.exit(sub, :kill)
    end
  end

  test "subscribers joining another node mid-stream get a contiguous run up to the last dispatch",
       %{b: b} do
    topic = unique_topic("replay:joiners")
    count = 3_000
    Peers.producer(node(), topic, :a1, count, 2)

    joiners =
      for replay <- [1, 50, 1_000_000, 500, 7, 1_000_000, 200, 1, 3_000, 20] do
        # Random moments: anywhere before, during or after the stream.
        Process.sleep(:rand.uniform(20))
        {replay, Peers.replay_subscriber(b, topic, replay)}
      end

    assert_receive {:produced, :a1, :ok}, 60_000
    late = {1_000_000, Peers.replay_subscriber(b, topic, 1_000_000)}

    for {replay, pid} <- [late | joiners] do
      got = Peers.report(pid)
      assert [{:p, :a1, first} | _] = got
      # No gap, no duplicate, in order, up to the last one dispatched.
      assert got == messages(:a1, first..count), "replay #{replay}: #{inspect(got)}"
      # The history was replayed: all of it (@kept > count), or the last `replay`.
      assert first == 1 or length(got) >= replay
      if replay >= count, do: assert(first == 1)
    end
  end

  test "a node cut off mid-stream: its history misses exactly what was counted as dropped for it",
       %{b: b, c: c} do
    topic = unique_topic("replay:cut")
    count = 2_000
    # b and c are connected, and b knows that c runs cluster mode.
    :ok = :erpc.call(b, Peers, :connect, [c])
    eventually(fn -> c in :erpc.call(b, Cluster, :peers, []) end, 10_000)
    # b dispatches to a topic nobody subscribes to; right after its dispatch 200 it cuts
    # itself off from c, goes on (c's queue on b fills up, then drops), connects again
    # once done and syncs.
    dropped = Peers.produce_with_cut(b, c, topic, :b1, count, 200)
    # The cut outlasted c's queue on b: the loss is real, and counted.
    assert dropped >= count - 200 - @peer_queue

    # A joiner on c after the reconnection: c's history (it keeps more than `count`).
    joiner_c = Peers.replay_subscriber(c, topic, 1_000_000)
    joiner_b = Peers.replay_subscriber(b, topic, 1_000_000)
    Peers.producer(b, topic, :b2, 1)
    assert_receive {:produced, :b2, :ok}, 60_000

    {history, live} = Enum.split_with(Peers.report(joiner_c), &match?({:p, :b1, _}, &1))
    seqs = for {:p, :b1, seq} <- history, do: seq
    # In order, no duplicate, and what is missing is exactly as many as were counted.
    assert seqs == Enum.sort(seqs) and seqs == Enum.uniq(seqs)
    assert Enum.all?(seqs, &(&1 in 1..count))
    assert count - length(seqs) == dropped
    # One cut: what c's relay received before it (from 1), the dispatches in flight then
    # (lost), what c's queue on b held (delivered once back), the rest (dropped): at most
    # two runs.
    assert [first.._ | _] = runs(seqs)
    assert first == 1 and length(runs(seqs)) <= 2
    assert live == [{:p, :b2, 1}]

    # b's own history has no hole.
    assert Peers.report(joiner_b) == messages(:b1, 1..count) ++ [{:p, :b2, 1}]

    IO.puts(
      "\nreplay across a cut: dispatched #{count}, in c's history #{length(seqs)}, " <>
        "counted dropped for c #{dropped}, missing runs #{inspect(runs(Enum.to_list(1..count) -- seqs))}"
    )
  end

  # The issue's case (issue 24): node A (here b) has a subscriber suspended in the middle
  # of subscribe(topic, replay: 1_000), placed there deterministically: joined, one chunk
  # of its replay sent, suspended. Nobody may wait for it: not a producer on A, not A's
  # relay (which delivers what node B, here this node, dispatches, to that topic and to
  # others), not B's producers. Once resumed, what it got is complete or told.
  test "a joiner suspended mid-replay holds no producer, nor the relay; resumed, it is told",
       %{b: a} do
    topic = unique_topic("replay:stalled")
    other = unique_topic("replay:other")
    # A's history of `topic`: 300 from A (producer 1), then 100 from B (producer 2);
    # fewer than the 1 000 asked for, so the joiner is due every dispatch from 1.
    :ok = produce_on(a, topic, 1, 1..300)
    :ok = produce_here(topic, 2, 1..100)
    other_sub = Peers.subscriber(a, other)
    before = replay_stats(a)

    ref = make_ref()
    joiner = Node.spawn(a, OnPeer, :stalled_joiner, [self(), ref, topic, 1_000])
    # Mid-replay: it has sent itself a chunk and has more to go.
    assert_receive {^ref, :mid_replay, :more}, 10_000
    holder = Peers.suspend(joiner)

    # Meanwhile: 1 000 from A to `topic`; from B, 1 000 to `topic` with, after every
    # tenth, one to `other` (A's relay gets them in that order), then sync(:cluster),
    # which returns once A's relay has delivered them all. Were either held, they would
    # not complete within the timeouts.
    Node.spawn(a, OnPeer, :produce, [self(), topic, 1, 301..1_300])
    parent = self()

    spawn_link(fn ->
      for i <- 1..1_000 do
        :ok = Dispatcher.dispatch(topic, {:seq, 2, 100 + i, OnPeer.payload()})
        if rem(i, 10) == 0, do: :ok = Dispatcher.dispatch(other, {:other, div(i, 10)})
      end

      send(parent, {:produced, 2, Dispatcher.sync(:cluster)})
    end)

    assert_receive {:produced, 1, :ok}, 30_000
    assert_receive {:produced, 2, :ok}, 30_000
    assert Peers.report(other_sub) == for(k <- 1..100, do: {:other, k})
    # All of that while the joiner stayed suspended, and it was cut for it.
    assert :erpc.call(a, Process, :info, [joiner, :status]) == {:status, :suspended}
    assert replay_stats(a).replay_cuts > before.replay_cuts

    send(joiner, {ref, :go})
    :ok = Peers.resume(holder)
    assert_receive {^ref, :ok, got}, 30_000
    assert :erpc.call(a, Dispatcher, :count, [topic]) == 1

    # Subscribed: one more from each node reaches it live, in the order dispatched.
    :ok = produce_on(a, topic, 1, 1_301..1_301)
    :ok = produce_here(topic, 2, 1_101..1_101)
    send(joiner, {ref, :live})
    assert_receive {^ref, :live, live}, 10_000
    assert [{:seq, 1, 1_301, _}, {:seq, 2, 1_101, _}] = live

    # Complete or told, exactly: each producer's numbers from 1 (`starts`) to its last,
    # once each or counted in a notice, the notices adding up to what is missing.
    stream = got ++ live
    assert account(stream, [1_301, 1_101], [1, 1]) == nil
    {gaps, messages} = split_gaps(stream)
    assert gaps != []
    assert length(messages) + Enum.sum(gaps) == 1_301 + 1_101
    # And A counted exactly what it told.
    assert replay_stats(a).replay_missed - before.replay_missed == Enum.sum(gaps)

    IO.puts(
      "\njoiner suspended mid-replay on a peer: #{length(messages)} of 2402 dispatches " <>
        "delivered, gap notices #{inspect(gaps)}, replay_missed on it #{Enum.sum(gaps)}"
    )
  end

  defp messages(id, range), do: for(seq <- range, do: {:p, id, seq})

  # Producer `p` on `node` dispatches `range`, then syncs the cluster.
  defp produce_on(node, topic, p, range) do
    Node.spawn(node, OnPeer, :produce, [self(), topic, p, range])
    assert_receive {:produced, ^p, result}, 30_000
    result
  end

  defp produce_here(topic, p, range) do
    for n <- range, do: :ok = Dispatcher.dispatch(topic, {:seq, p, n, OnPeer.payload()})
    Dispatcher.sync(:cluster)
  end

  defp replay_stats(node),
    do: :erpc.call(node, Dispatcher, :stats, []) |> Map.take([:replay_cuts, :replay_missed])

  defp received(node), do: :erpc.call(node, Cluster, :relay_counts, []).received

  # Consecutive runs of a sorted list, as ranges.
  defp runs([]), do: []

  defp runs([first | rest]) do
    {runs, from, to} =
      Enum.reduce(rest, {[], first, first}, fn
        seq, {acc, from, to} when seq == to + 1 -> {acc, from, seq}
        seq, {acc, from, to} -> {[from..to | acc], seq, seq}
      end)

    Enum.reverse([from..to | runs])
  end
end
