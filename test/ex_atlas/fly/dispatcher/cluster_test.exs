defmodule ExAtlas.Fly.Dispatcher.ClusterTest do
  # Cluster mode on distributed Erlang and :pg, with real peer nodes (OTP's :peer) on
  # 127.0.0.1: this node and two peers, a third started later. Each peer runs :ex_atlas
  # from this build with `cluster: true`.
  use ExUnit.Case, async: false

  import ExAtlas.Test.FlyEnv,
    only: [restart_app: 1, unique_topic: 1, eventually: 2, define_telemetry: 0]

  import ExUnit.CaptureLog

  alias ExAtlas.Fly.Dispatcher
  alias ExAtlas.Fly.Dispatcher.Cluster
  alias ExAtlas.Test.Cluster, as: Peers

  @moduletag :cluster
  @moduletag timeout: 120_000
  @bound 300
  @drop [:ex_atlas, :fly, :dispatcher, :cluster, :drop]

  setup_all do
    [b, c] = Peers.start_peers("ex_atlas", [:b, :c])
    %{b: b, c: c}
  end

  setup do
    restart_app(cluster: true)
  end

  test "every subscriber on every node gets each message once, in per-producer order, under churn",
       %{b: b, c: c} do
    topic = unique_topic("cluster:all")
    nodes = [node(), b, c]
    stable = for node <- nodes, _ <- 1..3, do: Peers.subscriber(node, topic)
    for node <- nodes, do: Peers.await_visible(node, topic, nodes)
    churners = for node <- nodes, _ <- 1..2, do: Peers.churner(node, topic)

    # Two producers here, one on a peer.
    count = 400
    Peers.producer(node(), topic, :a1, count)
    Peers.producer(node(), topic, :a2, count)
    Peers.producer(b, topic, :b1, count)
    for id <- [:a1, :a2, :b1], do: assert_receive({:produced, ^id, :ok}, 60_000)
    for pid <- churners, do: send(pid, :stop)

    want = for id <- [:a1, :a2, :b1], seq <- 1..count, do: {:p, id, seq}

    for pid <- stable do
      got = Peers.report(pid)
      # Exactly once and in order per producer: each producer's subsequence is 1..count.
      for id <- [:a1, :a2, :b1] do
        assert Enum.filter(got, &match?({:p, ^id, _}, &1)) ==
                 Enum.filter(want, &match?({:p, ^id, _}, &1)),
               "#{inspect(pid)} on #{node(pid)}: producer #{id}"
      end
    end
  end

  test "one message per dispatch to each other node with subscribers, none to the others",
       %{b: b, c: c} do
    topic = unique_topic("cluster:count")
    before = for node <- [b, c], into: %{}, do: {node, received(node)}

    subs_b = for _ <- 1..5, do: Peers.subscriber(b, topic)
    Peers.await_visible(node(), topic, [b])

    for seq <- 1..100, do: :ok = Dispatcher.dispatch(topic, {:p, :a, seq})
    assert :ok = Dispatcher.sync(:cluster)
    # Five subscribers on b, one message each dispatch; nothing to c.
    assert received(b) - before[b] == 100
    assert received(c) - before[c] == 0
    for pid <- subs_b, do: assert(length(Peers.report(pid)) == 100)

    _subs_c = for _ <- 1..3, do: Peers.subscriber(c, topic)
    Peers.await_visible(node(), topic, [b, c])
    for seq <- 101..200, do: :ok = Dispatcher.dispatch(topic, {:p, :a, seq})
    assert :ok = Dispatcher.sync(:cluster)
    assert received(b) - before[b] == 200
    assert received(c) - before[c] == 100

    # Subscribers of this node only: the other nodes get nothing.
    local = unique_topic("cluster:local")
    Peers.subscriber(node(), local)
    for seq <- 1..50, do: :ok = Dispatcher.dispatch(local, {:p, :a, seq})
    assert :ok = Dispatcher.sync(:cluster)
    assert received(b) - before[b] == 200
    assert received(c) - before[c] == 100
  end

  test "interest follows subscriptions: the last one gone, the node leaves the group", %{b: b} do
    topic = unique_topic("cluster:leave")
    sub = Peers.subscriber(b, topic)
    Peers.await_visible(node(), topic, [b])
    send(sub, :stop)

    eventually(
      fn -> b not in Enum.map(:pg.get_members(Cluster.scope(), topic), &node/1) end,
      5_000
    )
  end

  test "a node started later gets what is dispatched once its subscription is visible" do
    topic = unique_topic("cluster:late")

    {peer_d, d} =
      Peers.start_peer("ex_atlas_d_#{System.unique_integer([:positive])}", cluster: true)

    try do
      sub = Peers.subscriber(d, topic)
      Peers.await_visible(node(), topic, [d])
      for seq <- 1..50, do: :ok = Dispatcher.dispatch(topic, {:p, :a, seq})
      assert :ok = Dispatcher.sync(:cluster)
      assert Peers.report(sub) == for(seq <- 1..50, do: {:p, :a, seq})
    after
      :peer.stop(peer_d)
    end
  end

  test "a node stopped mid-stream does not break or block the others; what it missed is dropped",
       %{b: b} do
    put_hold(500)
    define_telemetry()
    ExAtlas.Test.TelemetryStandIn.capture([@drop])
    topic = unique_topic("cluster:stop")

    {peer_d, d} =
      Peers.start_peer("ex_atlas_d_#{System.unique_integer([:positive])}", cluster: true)

    sub_b = Peers.subscriber(b, topic)
    sub_d = Peers.subscriber(d, topic)
    Peers.await_visible(node(), topic, [b, d])

    # The first half reaches both nodes, and d acknowledged all of it: nothing of it can
    # be counted as dropped later.
    for seq <- 1..1_000, do: :ok = Dispatcher.dispatch(topic, {:p, :a, seq})
    assert :ok = Dispatcher.sync(:cluster)
    assert length(Peers.report(sub_d)) == 1_000
    eventually(fn -> Cluster.stats()[d].queued == 0 end, 10_000)

    # This node's relay reaps a departed node's link (twice the hold after it left):
    # suspended meanwhile, so that d's link and its counts are there to read. d's link
    # is suspended while d stops and the second half is dispatched: it learns that d's
    # relay is gone, and starts the hold, only after every dispatch for d is in its
    # mailbox, however long they take.
    relay = Process.whereis(Cluster.Relay)
    [{^d, {link, _counters}}] = :ets.lookup(Cluster.links_table(), d)
    true = :erlang.suspend_process(relay)
    true = :erlang.suspend_process(link)

    log =
      capture_log(fn ->
        try do
          true = :erlang.monitor_node(d, true)
          :peer.stop(peer_d)
          assert_receive {:nodedown, ^d}, 10_000

          # The second half, with d gone: b gets it, and d's interest is held, so what d
          # misses is queued for it, then counted as dropped when the hold is over.
          for seq <- 1_001..2_000, do: :ok = Dispatcher.dispatch(topic, {:p, :a, seq})
          true = :erlang.resume_process(link)
          eventually(fn -> Cluster.stats()[d].queued == 0 end, 10_000)
          assert Cluster.stats()[d].dropped == 1_000
          assert Dispatcher.sync(:cluster) in [:ok, {:error, {:no_answer, [d]}}]
          assert Peers.report(sub_b) == for(seq <- 1..2_000, do: {:p, :a, seq})
        after
          for pid <- [link, relay],
              Process.info(pid, :status) == {:status, :suspended},
              do: :erlang.resume_process(pid)
        end

        # Then its link goes, and its last report says every drop: whether or not the
        # link was still there, log and telemetry add up to what it counted.
        eventually(fn -> not Map.has_key?(Cluster.stats(), d) end, 10_000)
      end)

    assert log =~ "dropped"
    assert telemetry_drops(d, 0) == 1_000
  end

  test "a suspended relay: dispatch goes on, the node's queue stays bounded, drops are counted",
       %{b: b, c: c} do
    restart_app(cluster: true, cluster_queue: @bound)
    define_telemetry()
    ExAtlas.Test.TelemetryStandIn.capture([@drop])
    topic = unique_topic("cluster:suspended")
    _sub_b = Peers.subscriber(b, topic)
    sub_c = Peers.subscriber(c, topic)
    Peers.await_visible(node(), topic, [b, c])
    relay_b = :erpc.call(b, Process, :whereis, [Cluster.Relay])
    holder = Peers.suspend(relay_b)

    log =
      capture_log(fn ->
        try do
          # Paced by c's queue, so that c never meets its own bound: b's suspension must
          # not slow c down, and c must get everything, in order.
          for chunk <- Enum.chunk_every(1..(4 * @bound), 100) do
            for seq <- chunk, do: :ok = Dispatcher.dispatch(topic, {:p, :a, seq})
            eventually(fn -> Cluster.stats()[c].queued == 0 end, 10_000)
          end

          %{queued: queued, dropped: dropped} = Cluster.stats()[b]
          assert queued <= @bound
          assert dropped == 4 * @bound - queued
          assert Cluster.stats()[c].dropped == 0
          assert %{^b => %{dropped: ^dropped}, ^c => %{dropped: 0}} = Dispatcher.stats().cluster
          # The suspended node cannot answer a barrier; the other one got everything.
          assert Dispatcher.sync(:cluster, 1_000) == {:error, {:no_answer, [b]}}
          assert Peers.report(sub_c) == for(seq <- 1..(4 * @bound), do: {:p, :a, seq})
          Process.sleep(1_100)
        after
          Peers.resume(holder)
        end
      end)

    assert log =~ "dropped"
    assert log =~ inspect(b)
    # The link reported every drop (once a second, the new ones each time) to telemetry.
    assert telemetry_drops(b, 0) == Cluster.stats()[b].dropped
    eventually(fn -> Cluster.stats()[b].queued == 0 end, 10_000)
  end

  test "subscribers that do not drain: nothing piles up here, their node's watchdog evicts them",
       %{b: b, c: c} do
    restart_app(cluster: true, cluster_queue: @bound)
    topic = unique_topic("cluster:stalled")
    threshold = 200
    stalled = Peers.stalled_subscriber(b, topic, threshold: threshold, poll_ms: 20)
    sub_c = Peers.subscriber(c, topic)
    Peers.await_visible(node(), topic, [b, c])
    count = 10 * threshold

    # b's relay hands each message to b's own lanes and acknowledges it: what b's
    # subscriber does not read piles up in its mailbox on b, never in b's queue here.
    # In chunks of 100, each once b's queue has drained as c's has (below 64: a relay
    # acknowledges every 64 messages, the rest after 500 ms), so that the producer's
    # speed never takes either queue to the bound.
    for chunk <- Enum.chunk_every(1..count, 100) do
      for seq <- chunk, do: :ok = Dispatcher.dispatch(topic, {:p, :a, seq})
      eventually(fn -> Enum.all?([b, c], &(Cluster.stats()[&1].queued < 64)) end, 10_000)
    end

    # Evicted on b: b has no subscriber of the topic left, so its relay leaves the group.
    eventually(fn -> :erpc.call(b, Dispatcher, :count, [topic]) == 0 end, 10_000)

    eventually(
      fn -> Enum.all?(:pg.get_members(Cluster.scope(), topic), &(node(&1) != b)) end,
      10_000
    )

    {:message_queue_len, len} = :erpc.call(b, Process, :info, [stalled, :message_queue_len])
    assert len > threshold
    eventually(fn -> Cluster.stats()[b].queued == 0 end, 10_000)
    %{dropped: 0} = Cluster.stats()[b]

    # From now on b gets nothing; c still gets everything, in order.
    received_b = received(b)
    for seq <- (count + 1)..(count + 100), do: :ok = Dispatcher.dispatch(topic, {:p, :a, seq})
    assert Dispatcher.sync(:cluster, 5_000) == :ok
    assert received(b) == received_b
    assert Peers.report(sub_c) == for(seq <- 1..(count + 100), do: {:p, :a, seq})
  end

  # The link's hold time for a departed node, on this node, for one test.
  defp put_hold(ms) do
    Application.put_env(:ex_atlas, :cluster_hold_ms, ms)
    on_exit(fn -> Application.delete_env(:ex_atlas, :cluster_hold_ms) end)
  end

  defp received(node), do: :erpc.call(node, Cluster, :relay_counts, []).received

  defp telemetry_drops(node, sum) do
    receive do
      {:telemetry, @drop, %{count: count}, %{node: ^node}} -> telemetry_drops(node, sum + count)
    after
      0 -> sum
    end
  end
end
