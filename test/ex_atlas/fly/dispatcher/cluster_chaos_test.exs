defmodule ExAtlas.Fly.Dispatcher.ClusterChaosTest do
  # Soak (`mix test --include soak`): producers on every node while nodes are cut off and
  # connected again, relays are suspended and a node is stopped, at random moments. Per
  # producer and node: delivered + counted as dropped = dispatched, in dispatch order.
  use ExUnit.Case, async: false

  import ExAtlas.Test.FlyEnv, only: [restart_app: 1, unique_topic: 1, eventually: 2]
  import ExUnit.CaptureLog

  alias ExAtlas.Fly.Dispatcher.Cluster
  alias ExAtlas.Test.Cluster, as: Peers

  @moduletag :cluster
  @moduletag :soak
  @moduletag timeout: 600_000

  @count 5_000

  test "chaos: cuts, suspended relays and a stopped node; every dispatch delivered or counted" do
    :ok = Peers.ensure_distribution()
    restart_app(cluster: true)

    peers =
      for name <- ~w(b c d e) do
        Peers.start_peer("ex_atlas_chaos_#{name}_#{System.unique_integer([:positive])}",
          cluster: true
        )
      end

    on_exit(fn -> for {peer, _} <- peers, do: stop_peer(peer) end)
    [b, c, d, e] = Enum.map(peers, &elem(&1, 1))
    {peer_e, _} = List.last(peers)
    checked = [node(), b, c, d]
    topic = unique_topic("cluster:chaos")
    subs = Map.new(checked ++ [e], fn node -> {node, Peers.subscriber(node, topic)} end)
    for node <- checked ++ [e], do: Peers.await_visible(node, topic, checked ++ [e])
    before = Map.new(checked, fn node -> {node, dropped_on(node)} end)

    capture_log(fn ->
      for node <- checked, do: Peers.timed_producer(node, topic, node, @count, 20)
      chaos(Enum.random(30..50), [b, c, d], peer_e)

      slowest =
        for node <- checked do
          assert_receive {:produced, ^node, us}, 300_000
          us
        end

      # Everyone connected again, then every queue drained.
      for x <- [b, c, d], y <- [b, c, d], x < y, do: :erpc.call(x, Peers, :connect, [y])

      for node <- checked do
        eventually(fn -> Enum.all?(Map.values(stats_on(node)), &(&1.queued == 0)) end, 60_000)
      end

      IO.puts("\nchaos: slowest dispatch per node (us): #{inspect(Enum.zip(checked, slowest))}")
    end)

    for from <- checked, to <- checked, from != to do
      seqs = for {:p, ^from, seq} <- Peers.report(subs[to]), do: seq
      dropped = dropped_on(from)[to] - Map.get(before[from], to, 0)
      assert seqs == Enum.sort(seqs) and seqs == Enum.uniq(seqs), "#{from} -> #{to}: order"

      assert length(seqs) + dropped == @count,
             "#{from} -> #{to}: #{length(seqs)} delivered + #{dropped} dropped"

      IO.puts("#{from} -> #{to}: delivered #{length(seqs)}, dropped #{dropped}")
    end
  end

  defp chaos(0, _nodes, _peer_e), do: :ok

  defp chaos(rounds, nodes, peer_e) do
    Process.sleep(Enum.random(10..150))

    case Enum.random([:cut, :cut, :suspend, :suspend, :stop]) do
      :cut ->
        [x, y] = Enum.take_random(nodes, 2)
        :erpc.call(x, :erlang, :disconnect_node, [y])
        Process.sleep(Enum.random(0..300))
        :erpc.call(x, Peers, :connect, [y])

      :suspend ->
        relay = :erpc.call(Enum.random(nodes), Process, :whereis, [Cluster.Relay])
        holder = Peers.suspend(relay)
        Process.sleep(Enum.random(0..500))
        Peers.resume(holder)

      :stop ->
        stop_peer(peer_e)
    end

    chaos(rounds - 1, nodes, peer_e)
  end

  # Stopped already, or not: either way it is gone afterwards.
  defp stop_peer(peer) do
    :peer.stop(peer)
  catch
    :exit, _ -> :ok
  end

  defp stats_on(node) do
    if node == node(), do: Cluster.stats(), else: :erpc.call(node, Cluster, :stats, [])
  end

  defp dropped_on(node), do: Map.new(stats_on(node), fn {to, %{dropped: n}} -> {to, n} end)
end
