defmodule ExAtlas.Fly.Dispatcher.ClusterReplayTest do
  # Replay in cluster mode: each node's history holds the dispatches made on every node,
  # including topics that no node subscribes to, so a subscriber on any node is replayed
  # what one on the producer's node would be, and what a node's history misses after a
  # cut is what was counted as dropped for it. Peer nodes as in cluster_test.exs, all
  # with `replay: @kept`.
  use ExUnit.Case, async: false

  import ExAtlas.Test.FlyEnv, only: [restart_app: 1, unique_topic: 1, eventually: 2]

  alias ExAtlas.Fly.Dispatcher
  alias ExAtlas.Fly.Dispatcher.Cluster
  alias ExAtlas.Test.Cluster, as: Peers

  @moduletag :cluster
  @moduletag timeout: 120_000
  # Dispatches kept per topic on every node.
  @kept 5_000
  # The peers' per-node queue: a cut of a peer from another one outlasts it.
  @peer_queue 500

  setup_all do
    [b, c] =
      Peers.start_peers("ex_atlas_replay", [:b, :c],
        cluster: true,
        replay: @kept,
        cluster_queue: @peer_queue
      )

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

  defp messages(id, range), do: for(seq <- range, do: {:p, id, seq})

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
