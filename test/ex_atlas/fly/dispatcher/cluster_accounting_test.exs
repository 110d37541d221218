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

  # What is in the distribution buffer when the connection goes is up to the VM: a cut
  # this short may drop nothing (what was queued is sent again once c is back), and the
  # drop path cannot be placed here. The cut overlaps the flood by construction (it comes
  # after dispatch 200 of 2 000, and c is connected again after the last). The test below
  # places the drop: a cut that outlasts the hold.
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

  # b cuts itself off from c for longer than its hold (300 ms here), with everything
  # before the cut delivered and acknowledged: what b dispatches meanwhile is exactly what
  # c misses, counted as dropped when the hold is over. b's link for c is suspended
  # while b cuts and dispatches, so it starts the hold only once all of it is queued,
  # and b's relay (which reaps a link twice the hold after its node left) until c is
  # back.
  test "a node cut off for longer than the hold: exactly what it missed is counted as dropped",
       %{b: b, c: c} do
    topic = unique_topic("cluster:long_cut")
    subs = for _ <- 1..2, do: Peers.subscriber(c, topic)
    Peers.await_visible(b, topic, [c])
    :ok = :erpc.call(b, Application, :put_env, [:ex_atlas, :cluster_hold_ms, 300])
    on_exit(fn -> :erpc.call(b, Application, :delete_env, [:ex_atlas, :cluster_hold_ms]) end)
    producer = Peers.driven_producer(b, topic, :b1)
    before = Peers.dropped_on(b, c)

    :ok = Peers.drive(producer, {:dispatch, 1..200})
    assert Peers.drive(producer, :sync) == :ok
    eventually(fn -> Peers.stats_on(b)[c].queued == 0 end, 10_000)

    relay = :erpc.call(b, Process, :whereis, [Cluster.Relay])
    [{^c, {link, _}}] = :erpc.call(b, :ets, :lookup, [Cluster.links_table(), c])
    relay_holder = Peers.suspend(relay)
    link_holder = Peers.suspend(link)

    capture_log(fn ->
      true = :erpc.call(b, :erlang, :disconnect_node, [c])
      :ok = Peers.drive(producer, {:dispatch, 201..2_000})
      Peers.resume(link_holder)
      # The hold is over: everything queued for c is dropped.
      eventually(fn -> Peers.stats_on(b)[c].queued == 0 end, 10_000)
      assert Peers.dropped_on(b, c) - before == 1_800

      :ok = :erpc.call(b, Peers, :connect, [c])
      Peers.resume(relay_holder)
      # c's relay welcomes b's link again, with c's interest: from then on c gets it all.
      eventually(
        fn -> {topic, c} in :erpc.call(b, :ets, :lookup, [Cluster.interest_table(), topic]) end,
        10_000
      )

      :ok = Peers.drive(producer, {:dispatch, 2_001..2_200})
      assert Peers.drive(producer, :sync) == :ok
      eventually(fn -> Peers.stats_on(b)[c].queued == 0 end, 10_000)
    end)

    :ok = Peers.drive(producer, :stop)
    dropped = Peers.dropped_on(b, c) - before
    assert dropped == 1_800

    for sub <- subs do
      seqs = for {:p, :b1, seq} <- Peers.report(sub), do: seq
      assert seqs == Enum.to_list(1..200) ++ Enum.to_list(2_001..2_200)
      assert length(seqs) + dropped == 2_200
    end
  end

  # The relay is suspended before it is killed, so the dispatches it holds unread when it
  # dies are known: the 100 sent to it meanwhile. They are lost with it, and its link
  # counts exactly those as dropped once the new relay tells it what arrived.
  test "the other node's relay restarted mid-flood: delivered + dropped = dispatched, in order",
       %{b: b} do
    topic = unique_topic("cluster:relay_restart")
    sub = Peers.subscriber(b, topic)
    Peers.await_visible(node(), topic, [b])
    before = Cluster.stats()[b].dropped
    relay = :erpc.call(b, Process, :whereis, [Cluster.Relay])
    define_telemetry()
    ExAtlas.Test.TelemetryStandIn.capture([@drop])

    # Delivered and acknowledged: nothing of it is on its way when the relay dies.
    for seq <- 1..500, do: :ok = Dispatcher.dispatch(topic, {:p, :a1, seq})
    assert :ok = Dispatcher.sync(:cluster)
    eventually(fn -> Cluster.stats()[b].queued == 0 end, 10_000)

    holder = Peers.suspend(relay)
    # Fewer than the link's window (256): all of it goes out to the suspended relay.
    for seq <- 501..600, do: :ok = Dispatcher.dispatch(topic, {:p, :a1, seq})
    eventually(fn -> unread(b, relay) == 100 end, 10_000)

    capture_log(fn ->
      :ok = Peers.kill_suspended(holder)

      # The rest waits in the link until a new relay welcomes it.
      for seq <- 601..2_000, do: :ok = Dispatcher.dispatch(topic, {:p, :a1, seq})
      assert :ok = Dispatcher.sync(:cluster)
      eventually(fn -> Cluster.stats()[b].queued == 0 end, 10_000)
    end)

    refute :erpc.call(b, Process, :whereis, [Cluster.Relay]) in [nil, relay]
    dropped = Cluster.stats()[b].dropped - before
    seqs = for {:p, :a1, seq} <- Peers.report(sub), do: seq
    assert seqs == Enum.to_list(1..500) ++ Enum.to_list(601..2_000)
    assert dropped == 100
    assert length(seqs) + dropped == 2_000

    # The link reports its drops (log, telemetry) once a second: all of them.
    eventually(fn -> telemetry_drops(b) == dropped end, 5_000)

    IO.puts(
      "\nremote relay killed: dispatched 2000, delivered #{length(seqs)}, dropped #{dropped}"
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

  # Dispatches from this node's link in `relay`'s mailbox on `node`, not handled yet.
  defp unread(node, relay) do
    {:messages, messages} = :erpc.call(node, Process, :info, [relay, :messages])
    Enum.count(messages, &match?({:"$ex_atlas_remote", _, _, _}, &1))
  end

  # The drops reported to telemetry for `node` so far in this test; kept in the process
  # dictionary, as each event is received once.
  defp telemetry_drops(node) do
    key = {:telemetry_drops, node}

    receive do
      {:telemetry, @drop, %{count: count}, %{node: ^node}} ->
        Process.put(key, Process.get(key, 0) + count)
        telemetry_drops(node)
    after
      0 -> Process.get(key, 0)
    end
  end
end
