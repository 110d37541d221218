defmodule ExAtlas.Fly.Dispatcher.ClusterDeathsTest do
  # Cluster mode when one of its own processes dies: each of them (on the producing node:
  # its link to the subscribers' node, its relay, its `:pg` scope, `Switch`, the link
  # supervisor, the cluster supervisor; on the subscribers' node: its relay and scope),
  # killed with `:kill` or crashed, mid-flood. What the remote subscribers lack is
  # exactly what the producing node counted as dropped for their node, each gets the
  # dispatches in order, and forwarding resumes: the last dispatch arrives.
  use ExUnit.Case, async: false

  import ExAtlas.Test.FlyEnv, only: [restart_app: 1, unique_topic: 1, eventually: 2]
  import ExUnit.CaptureLog

  alias ExAtlas.Fly.Dispatcher
  alias ExAtlas.Fly.Dispatcher.{Cluster, Server}
  alias ExAtlas.Test.Cluster, as: Peers

  @moduletag :cluster
  @moduletag timeout: 300_000

  @flood 3_000
  @kill_at 1_000
  @tail 50

  setup_all do
    [b, c] = Peers.start_peers("ex_atlas_deaths", [:b, :c])
    %{b: b, c: c}
  end

  setup %{b: b, c: c} do
    restart_app(cluster: true)
    # A fresh cluster mode on both, whatever the test before killed.
    Peers.restart_app_on(b)
    Peers.restart_app_on(c)
    :ok
  end

  targets = [
    {:b, :link},
    {:b, :relay},
    {:b, :scope},
    {:b, :switch},
    {:b, :link_supervisor},
    {:b, :cluster_supervisor},
    {:c, :relay},
    {:c, :scope}
  ]

  for {where, target} <- targets, how <- [:kill, :crash] do
    @tag target: target, where: where, how: how
    test "#{inspect(target)} on #{where} (#{how}) mid-flood: missing = counted, in order, resumes",
         %{b: b, c: c, target: target, where: where, how: how} do
      target = if target == :link, do: {:link, c}, else: target
      on = if where == :b, do: b, else: c
      flood(b, c, {on, target, how})
    end
  end

  # b dispatches @flood messages to c's subscribers, has `target` killed on `on` right
  # after dispatch @kill_at, then dispatches @tail more, one every 20 ms.
  defp flood(b, c, {on, target, how}) do
    {subs, producer} = from_b_to_c(b, c, "cluster:deaths", 3)
    total = @flood + @tail

    capture_log(fn ->
      :ok = Peers.drive(producer, {:dispatch, 1..@kill_at})
      victim = :erpc.call(on, Peers, :kill_cluster_process, [target, how])
      :ok = Peers.drive(producer, {:dispatch, (@kill_at + 1)..@flood})
      Peers.drive_paced(producer, (@flood + 1)..total, 20)
      # The dead process has a successor.
      eventually(
        fn -> :erpc.call(on, Peers, :cluster_process, [target]) not in [nil, victim] end,
        10_000
      )

      # Everything b held for c is settled: delivered or counted.
      eventually(fn -> queued(b, c) == 0 end, 10_000)
      :ok = Peers.drive(producer, :stop)
    end)

    dropped = Peers.dropped_on(b, c)

    for sub <- subs do
      seqs = for {:p, :b1, seq} <- Peers.report(sub), do: seq
      assert seqs == Enum.sort(seqs), "out of order"
      assert seqs == Enum.uniq(seqs), "duplicates"
      assert List.last(seqs) == total, "forwarding did not resume: last #{List.last(seqs)}"
      assert length(seqs) + dropped == total
    end
  end

  # A new topic with `n` subscribers on c, seen from b, and a producer on b for it.
  defp from_b_to_c(b, c, prefix, n) do
    topic = unique_topic(prefix)
    subs = for _ <- 1..n, do: Peers.subscriber(c, topic)
    Peers.await_visible(b, topic, [c])
    {subs, Peers.driven_producer(b, topic, :b1)}
  end

  defp queued(b, c) do
    case Peers.stats_on(b)[c] do
      %{queued: queued} -> queued
      nil -> :no_link
    end
  end

  # b's link to c is suspended with nothing held, gets @backlog dispatches in its mailbox,
  # and is killed still suspended: its successor counts exactly those as dropped, and
  # what comes after is delivered.
  @backlog 500
  test "a link killed with a backlog in its mailbox: the backlog is counted, the rest delivered",
       %{b: b, c: c} do
    {[sub], producer} = from_b_to_c(b, c, "cluster:backlog", 1)

    capture_log(fn ->
      :ok = Peers.drive(producer, {:dispatch, 1..100})
      assert Peers.drive(producer, :sync) == :ok
      eventually(fn -> queued(b, c) == 0 end, 10_000)

      link = :erpc.call(b, Peers, :cluster_process, [{:link, c}])
      holder = Peers.suspend(link)
      :ok = Peers.drive(producer, {:dispatch, 101..(100 + @backlog)})
      assert queued(b, c) == @backlog
      Peers.kill_suspended(holder)

      eventually(fn -> :erpc.call(b, Peers, :cluster_process, [{:link, c}]) != link end, 5_000)
      eventually(fn -> queued(b, c) == 0 end, 10_000)
      assert Peers.dropped_on(b, c) == @backlog

      :ok = Peers.drive(producer, {:dispatch, (101 + @backlog)..(200 + @backlog)})
      assert Peers.drive(producer, :sync) == :ok
      :ok = Peers.drive(producer, :stop)
    end)

    seqs = for {:p, :b1, seq} <- Peers.report(sub), do: seq
    assert seqs == Enum.to_list(1..100) ++ Enum.to_list((101 + @backlog)..(200 + @backlog))
    assert Peers.dropped_on(b, c) == @backlog
  end

  # b's scope killed while b's relay is suspended: b's cluster supervisor is stuck
  # stopping the relay before it starts a new scope, so b runs without a scope for as
  # long as the test wants. Dispatches meanwhile still go to c, whose interest b's link
  # holds.
  test "dispatches while the :pg scope is down still reach the nodes the links know",
       %{b: b, c: c} do
    {[sub], producer} = from_b_to_c(b, c, "cluster:no_scope", 1)

    capture_log(fn ->
      :ok = Peers.drive(producer, {:dispatch, 1..100})
      holder = Peers.suspend(:erpc.call(b, Peers, :cluster_process, [:relay]))
      _ = :erpc.call(b, Peers, :kill_cluster_process, [:scope, :kill])
      assert :erpc.call(b, Peers, :cluster_process, [:scope]) == nil
      :ok = Peers.drive(producer, {:dispatch, 101..200})
      assert :erpc.call(b, Peers, :cluster_process, [:scope]) == nil
      Peers.resume(holder)
      eventually(fn -> :erpc.call(b, Peers, :cluster_process, [:scope]) != nil end, 10_000)
      :ok = Peers.drive(producer, {:dispatch, 201..300})
      eventually(fn -> queued(b, c) == 0 end, 10_000)
      :ok = Peers.drive(producer, :stop)
    end)

    seqs = for {:p, :b1, seq} <- Peers.report(sub), do: seq
    assert seqs == Enum.to_list(1..300)
    assert Peers.dropped_on(b, c) == 0
  end

  # This node's relay killed while it waits for room in a full lane, mid-dispatch: with
  # two lanes of one slot and one lane's sender suspended, a dispatch from b reaches the
  # subscribers of the free lane and waits for the other. b counts that dispatch as
  # dropped for this node (the relay had not counted it as received), and the rest of
  # the relay's mailbox too: the subscribers of the stalled lane lack exactly what b
  # counted; those of the free lane may have that one dispatch besides.
  test "a relay killed mid local dispatch: the rest of it is counted", %{b: b} do
    restart_app(cluster: true, lanes: 2, queue_capacity: 1)
    topic = unique_topic("cluster:relay_mid_dispatch")
    # More than 16 subscriptions: every dispatch goes through the lanes' senders.
    subs = for _ <- 1..20, do: Peers.subscriber(node(), topic)
    Peers.await_visible(b, topic, [node()])
    producer = Peers.driven_producer(b, topic, :b1)
    [sender | _] = Server.senders()

    capture_log(fn ->
      true = :erlang.suspend_process(sender)
      :ok = Peers.drive(producer, {:dispatch, 1..3})
      # The relay waits for room in the stalled lane.
      eventually(fn -> Dispatcher.stats().waiting == 1 end, 10_000)
      relay = Process.whereis(Cluster.Relay)
      Process.exit(relay, :kill)
      true = :erlang.resume_process(sender)
      eventually(fn -> Process.whereis(Cluster.Relay) not in [nil, relay] end, 10_000)
      Peers.drive_paced(producer, 4..60, 20)
      eventually(fn -> queued(b, node()) == 0 end, 10_000)
      assert Peers.drive(producer, :sync) == :ok
      :ok = Peers.drive(producer, :stop)
    end)

    dropped = Peers.dropped_on(b, node())
    assert dropped >= 1

    missing =
      for sub <- subs do
        seqs = for {:p, :b1, seq} <- Peers.report(sub), do: seq
        assert seqs == Enum.sort(seqs) and seqs == Enum.uniq(seqs)
        assert List.last(seqs) == 60
        60 - length(seqs)
      end

    # Those of the stalled lane lack what b counted; those of the free lane one less at
    # most (the dispatch the relay was in reached them).
    assert Enum.max(missing) == dropped
    assert Enum.all?(missing, &(&1 in [dropped, dropped - 1]))
  end
end
