defmodule ExAtlas.Fly.Dispatcher.ClusterChaosTest do
  # Soak (`mix test --include soak`): producers on every node while nodes are cut off and
  # connected again, relays are suspended, a node is stopped, and our own processes die
  # (links, relays and `:pg` scopes, killed or crashed), at random moments, for
  # EX_ATLAS_CHAOS_MS ms (60 000 by default). Per producer and node: delivered + counted
  # as dropped = dispatched, in dispatch order, no duplicate.
  #
  # The producers run from before the first fault until after the last: they dispatch
  # until told to stop, once the chaos is over. Each fault reads how far they got when it
  # started and when it was undone; the test asserts that faults hit traffic (dispatches
  # went on while they lasted), not idle nodes.
  use ExUnit.Case, async: false

  import ExAtlas.Test.FlyEnv, only: [restart_app: 1, unique_topic: 1, eventually: 2]
  import ExUnit.CaptureLog

  alias ExAtlas.Fly.Dispatcher.Cluster
  alias ExAtlas.Test.Cluster, as: Peers

  @moduletag :cluster
  @moduletag :soak
  @moduletag timeout: 600_000

  # Each producer sleeps 1 ms every @pace dispatches: a few thousand a second each,
  # so the subscribers' records stay small over a chaos of several seconds.
  @pace 5

  # How long the chaos lasts; and at most one death of our processes per node in this
  # long, so that no supervisor reaches its restart intensity (3 in 5 s).
  @chaos_ms String.to_integer(System.get_env("EX_ATLAS_CHAOS_MS", "60000"))
  @kill_every_ms 2_000

  test "chaos: cuts, suspended relays, a stopped node, our processes killed; every dispatch delivered or counted" do
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

    {{faults, counts}, _log} =
      with_log(fn ->
        producers = for node <- checked, do: Peers.endless_producer(node, topic, node, @pace)
        # Running before the first fault.
        ExAtlas.Test.FlyEnv.eventually(
          fn -> Enum.all?(producers, &(Peers.progress(&1) > 0)) end,
          10_000
        )

        deadline = System.monotonic_time(:millisecond) + @chaos_ms
        faults = chaos(deadline, [b, c, d], peer_e, producers, {[], %{}})
        ended = dispatched(producers)
        # Still running after the last fault: then stopped.
        ExAtlas.Test.FlyEnv.eventually(fn -> dispatched(producers) > ended end, 10_000)
        for pid <- producers, do: send(pid, :stop)

        produced =
          for node <- checked do
            assert_receive {:produced, ^node, count, us}, 300_000
            {node, count, us}
          end

        # Everyone connected again, then every queue drained.
        for x <- [b, c, d], y <- [b, c, d], x < y, do: :erpc.call(x, Peers, :connect, [y])

        for node <- checked do
          eventually(fn -> Enum.all?(Map.values(stats_on(node)), &(&1.queued == 0)) end, 60_000)
        end

        IO.puts(
          "\nchaos: dispatched and slowest dispatch (us) per node: " <>
            inspect(for {node, count, us} <- produced, do: {node, count, us})
        )

        {faults, Map.new(produced, fn {node, count, _} -> {node, count} end)}
      end)

    # The faults hit traffic: dispatches went on while each kind of fault lasted, and
    # while most of the faults did (a fault undone at once may see none).
    overlapped = Enum.filter(faults, fn {_kind, during} -> during > 0 end)
    kinds = faults |> Enum.map(&elem(&1, 0)) |> Enum.uniq()

    for kind <- kinds,
        do: assert(Enum.any?(overlapped, &(elem(&1, 0) == kind)), "no #{kind} overlapped traffic")

    assert length(overlapped) * 2 >= length(faults),
           "only #{length(overlapped)} of #{length(faults)} faults overlapped traffic"

    IO.puts(
      "chaos: #{length(faults)} faults (#{inspect(Enum.frequencies_by(faults, &elem(&1, 0)))}), " <>
        "#{length(overlapped)} with dispatches while they lasted"
    )

    for from <- checked, to <- checked, from != to do
      seqs = for {:p, ^from, seq} <- Peers.report(subs[to]), do: seq
      dropped = dropped_on(from)[to] - Map.get(before[from], to, 0)
      assert seqs == Enum.sort(seqs) and seqs == Enum.uniq(seqs), "#{from} -> #{to}: order"

      assert length(seqs) + dropped == counts[from],
             "#{from} -> #{to}: #{length(seqs)} delivered + #{dropped} dropped"

      IO.puts("#{from} -> #{to}: delivered #{length(seqs)}, dropped #{dropped}")
    end
  end

  defp dispatched(producers), do: producers |> Enum.map(&Peers.progress/1) |> Enum.sum()

  # Returns each fault as {kind, dispatches made while it lasted}.
  defp chaos(deadline, nodes, peer_e, producers, {faults, killed}) do
    if System.monotonic_time(:millisecond) >= deadline do
      Enum.reverse(faults)
    else
      Process.sleep(Enum.random(10..150))
      {fault, killed} = fault(nodes, peer_e, producers, killed)
      faults = if fault, do: [fault | faults], else: faults
      chaos(deadline, nodes, peer_e, producers, {faults, killed})
    end
  end

  defp fault(nodes, peer_e, producers, killed) do
    case Enum.random([:cut, :cut, :suspend, :suspend, :stop, :kill, :kill, :kill]) do
      :cut ->
        [x, y] = Enum.take_random(nodes, 2)
        :erpc.call(x, :erlang, :disconnect_node, [y])
        during = during(producers, fn -> Process.sleep(Enum.random(0..300)) end)
        :erpc.call(x, Peers, :connect, [y])
        {{:cut, during}, killed}

      :suspend ->
        relay = :erpc.call(Enum.random(nodes), Process, :whereis, [Cluster.Relay])
        holder = Peers.suspend(relay)
        during = during(producers, fn -> Process.sleep(Enum.random(0..500)) end)
        Peers.resume(holder)
        {{:suspend, during}, killed}

      :stop ->
        # Once only: e stays stopped.
        if Process.alive?(peer_e),
          do: {{:stop, during(producers, fn -> stop_peer(peer_e) end)}, killed},
          else: {nil, killed}

      :kill ->
        kill(nodes, producers, killed)
    end
  end

  # One of our processes on a node that has had none die for @kill_every_ms: a link to
  # another node, the relay or the scope, killed or crashed. The fault lasts until its
  # successor runs.
  defp kill(nodes, producers, killed) do
    now = System.monotonic_time(:millisecond)

    case Enum.filter(nodes, &(killed[&1] == nil or now - killed[&1] >= @kill_every_ms)) do
      [] ->
        {nil, killed}

      ready ->
        x = Enum.random(ready)
        target = Enum.random([{:link, Enum.random(nodes -- [x])}, :relay, :scope])
        how = Enum.random([:kill, :crash])

        during =
          during(producers, fn ->
            victim = :erpc.call(x, Peers, :kill_cluster_process, [target, how])

            eventually(
              fn -> :erpc.call(x, Peers, :cluster_process, [target]) not in [nil, victim] end,
              10_000
            )
          end)

        kind = if is_tuple(target), do: :"#{how}_link", else: :"#{how}_#{target}"
        {{kind, during}, Map.put(killed, x, now)}
    end
  end

  # Dispatches made by all producers while `fun` ran.
  defp during(producers, fun) do
    started = dispatched(producers)
    fun.()
    dispatched(producers) - started
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
