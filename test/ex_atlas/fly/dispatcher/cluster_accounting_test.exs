defmodule ExAtlas.Fly.Dispatcher.ClusterAccountingTest do
  # Cluster mode under faults: for every node that has interest in a topic, each dispatch
  # is delivered there or counted as dropped for it; nothing on the dispatch path waits
  # for a process; no reply outlives its call. Peer nodes as in cluster_test.exs.
  use ExUnit.Case, async: false

  import ExAtlas.Test.FlyEnv,
    only: [restart_app: 1, unique_topic: 1, eventually: 2, define_telemetry: 0]

  import ExUnit.CaptureLog

  alias ExAtlas.Fly.Dispatcher
  alias ExAtlas.Fly.Dispatcher.Cluster
  alias ExAtlas.Test.Cluster, as: Peers

  @moduletag :cluster
  @moduletag timeout: 120_000
  @drop [:ex_atlas, :fly, :dispatcher, :cluster, :drop]

  setup_all do
    [b, c] = Peers.start_peers("ex_atlas_acc", [:b, :c])
    %{b: b, c: c}
  end

  setup do
    restart_app(cluster: true)
  end

  test "a node cut off mid-flood: each dispatch is delivered to it or counted as dropped, in order",
       %{b: b, c: c} do
    topic = unique_topic("cluster:cut")
    count = 2_000
    subs = for _ <- 1..2, do: Peers.subscriber(c, topic)
    Peers.await_visible(b, topic, [c])
    # b dispatches; right after its dispatch 200 it cuts itself off from c, goes on, and
    # connects again once done.
    dropped = Peers.produce_with_cut(b, c, topic, :b1, count, 200)

    for sub <- subs do
      got = Peers.report(sub)
      seqs = for {:p, :b1, seq} <- got, do: seq
      # Exactly once, in dispatch order, and what is missing is what b counted.
      assert seqs == Enum.sort(seqs) and seqs == Enum.uniq(seqs)
      assert length(seqs) + dropped == count

      IO.puts(
        "\ncut off mid-flood: dispatched #{count}, delivered #{length(seqs)}, dropped #{dropped}"
      )
    end
  end

  test "the other node's relay restarted mid-flood: delivered + dropped = dispatched, in order",
       %{b: b} do
    topic = unique_topic("cluster:relay_restart")
    count = 2_000
    sub = Peers.subscriber(b, topic)
    Peers.await_visible(node(), topic, [b])
    before = Cluster.stats()[b].dropped
    relay = :erpc.call(b, Process, :whereis, [Cluster.Relay])
    define_telemetry()
    ExAtlas.Test.TelemetryStandIn.capture([@drop])

    capture_log(fn ->
      Peers.producer_with_fault(node(), topic, :a1, count, 300, {Process, :exit, [relay, :kill]})
      assert_receive {:produced, :a1, :ok}, 60_000
      eventually(fn -> Cluster.stats()[b].queued == 0 end, 10_000)
    end)

    refute :erpc.call(b, Process, :whereis, [Cluster.Relay]) in [nil, relay]
    dropped = Cluster.stats()[b].dropped - before
    seqs = for {:p, :a1, seq} <- Peers.report(sub), do: seq
    assert seqs == Enum.sort(seqs) and seqs == Enum.uniq(seqs)
    assert length(seqs) + dropped == count

    # The link reports its drops (log, telemetry) once a second.
    if dropped > 0, do: assert_receive({:telemetry, @drop, %{count: _}, %{node: ^b}}, 5_000)

    IO.puts(
      "\nremote relay killed: dispatched #{count}, delivered #{length(seqs)}, dropped #{dropped}"
    )
  end

  test "this node's relay restarted mid-flood: forwarding goes on, nothing is skipped", %{b: b} do
    topic = unique_topic("cluster:own_relay")
    count = 2_000
    sub = Peers.subscriber(b, topic)
    Peers.await_visible(node(), topic, [b])
    relay = Process.whereis(Cluster.Relay)

    capture_log(fn ->
      Peers.producer_with_fault(node(), topic, :a1, count, 300, {Process, :exit, [relay, :kill]})
      assert_receive {:produced, :a1, :ok}, 60_000
    end)

    refute Process.whereis(Cluster.Relay) in [nil, relay]
    assert Peers.report(sub) == for(seq <- 1..count, do: {:p, :a1, seq})
    assert Cluster.stats()[b].dropped == 0
  end

  test "a node :pg shows before its link runs: what it misses is counted, then reported by its link",
       %{b: b} do
    topic = unique_topic("cluster:unlinked")
    sub = Peers.subscriber(b, topic)
    Peers.await_visible(node(), topic, [b])
    :ok = Dispatcher.dispatch(topic, {:p, :before})
    assert :ok = Dispatcher.sync(:cluster)
    dropped = Cluster.stats()[b].dropped

    # As between a nodeup and the relay starting the node's link: `:pg` shows the node's
    # interest, and no link is there to take the dispatch.
    [{^b, handle}] = :ets.lookup(Cluster.links_table(), b)
    true = :ets.delete(Cluster.links_table(), b)
    true = :ets.match_delete(Cluster.interest_table(), {topic, b})

    try do
      for seq <- 1..5, do: :ok = Dispatcher.dispatch(topic, {:p, seq})
      assert :ets.lookup(Cluster.unlinked_table(), b) == [{b, 5}]
    after
      :ets.insert(Cluster.links_table(), {b, handle})
    end

    # Counted in stats/0 at once, and taken over by the link, which reports it.
    assert Cluster.stats()[b].dropped == dropped + 5

    capture_log(fn ->
      eventually(fn -> :ets.lookup(Cluster.unlinked_table(), b) == [] end, 5_000)
    end)

    assert Cluster.stats()[b].dropped == dropped + 5
    :ok = Dispatcher.dispatch(topic, {:p, :after})
    assert :ok = Dispatcher.sync(:cluster)
    assert Peers.report(sub) == [{:p, :before}, {:p, :after}]
  end

  test "dispatch calls no process: it goes on while this node's relay is suspended and a node joins",
       %{b: b} do
    topic = unique_topic("cluster:no_call")
    sub_b = Peers.subscriber(b, topic)
    Peers.await_visible(node(), topic, [b])
    relay = Process.whereis(Cluster.Relay)
    true = :erlang.suspend_process(relay)

    {peer_d, d} =
      Peers.start_peer("ex_atlas_acc_d_#{System.unique_integer([:positive])}", cluster: true)

    try do
      sub_d = Peers.subscriber(d, topic)
      # :pg shows d's relay here, but the relay that starts links is suspended: d has no
      # link yet. Dispatches neither wait for one nor ask the relay for it.
      Peers.await_visible(node(), topic, [b, d])

      producer =
        Task.async(fn -> for seq <- 1..200, do: Dispatcher.dispatch(topic, {:p, :a, seq}) end)

      assert Enum.all?(Task.await(producer, :infinity), &(&1 == :ok))
      assert Process.alive?(relay)
      {:messages, mailbox} = Process.info(relay, :messages)
      refute Enum.any?(mailbox, &match?({:"$gen_call", _, _}, &1))
      assert {:status, :suspended} = Process.info(relay, :status)

      true = :erlang.resume_process(relay)
      eventually(fn -> Map.has_key?(Cluster.stats(), d) end, 10_000)

      eventually(
        fn ->
          match?(
            [_ | _],
            :ets.lookup(Cluster.interest_table(), topic) |> Enum.filter(&(elem(&1, 1) == d))
          )
        end,
        10_000
      )

      for seq <- 201..300, do: :ok = Dispatcher.dispatch(topic, {:p, :a, seq})
      assert :ok = Dispatcher.sync(:cluster)
      assert Peers.report(sub_b) == for(seq <- 1..300, do: {:p, :a, seq})
      # d is reached from the moment its link knows its interest, in order.
      seqs_d = for {:p, :a, seq} <- Peers.report(sub_d), do: seq
      assert seqs_d == Enum.to_list(List.first(seqs_d)..300)
    after
      if Process.info(relay, :status) == {:status, :suspended}, do: :erlang.resume_process(relay)
      :peer.stop(peer_d)
    end
  end

  test "sync(:cluster) that timed out: the late reply never reaches the caller", %{b: b} do
    topic = unique_topic("cluster:late_reply")
    _sub = Peers.subscriber(b, topic)
    Peers.await_visible(node(), topic, [b])
    for seq <- 1..10, do: :ok = Dispatcher.dispatch(topic, {:p, :a, seq})
    relay_b = :erpc.call(b, Process, :whereis, [Cluster.Relay])
    holder = Peers.suspend(relay_b)

    try do
      assert Dispatcher.sync(:cluster, 300) == {:error, {:no_answer, [b]}}
    after
      Peers.resume(holder)
    end

    # b's relay answers the first barrier before this one: it has answered it now.
    assert :ok = Dispatcher.sync(:cluster)

    receive do
      message -> flunk("a message reached the caller after sync returned: #{inspect(message)}")
    after
      200 -> :ok
    end
  end
end
