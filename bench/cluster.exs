# Cluster benchmark: one producer, three nodes of N subscribers each on this machine
# (:peer on 127.0.0.1): ExAtlas cluster mode, :pg send to every member, and forward +
# Registry.dispatch (Phoenix.PubSub's way). What it measures and the targets: bench/README.md.
#
#     MIX_ENV=prod mix run bench/cluster.exs [--quick] [--subscribers N] [--reps R] [--lanes L]
#                                            [--out DIR]

Code.require_file("support/bench.ex", __DIR__)
Code.require_file("support/peers.ex", __DIR__)

{:module, _, node_code, _} =
  defmodule ClusterBench.Node do
    @moduledoc false
    # Runs on every node (loaded on the peers as a binary): subscribers, their completion
    # signal, the forwarder of the forward contender.

    alias Bench.Peers.Round
    alias ExAtlas.Fly.Dispatcher

    def setup(n, topic, controller) do
      # Owned by a process that stays (through the Registry's links, the subscribers
      # would go with an :erpc call's process).
      :ok =
        Round.init(controller, fn ->
          {:ok, _} = Registry.start_link(keys: :duplicate, name: ClusterBench.Registry)
          {:ok, _} = :pg.start_link(ClusterBench.PG)
          :ok
        end)

      parent = self()
      spawn(fn -> forwarder() end) |> Process.register(ClusterBench.Forwarder)
      pids = for _ <- 1..n, do: spawn(fn -> subscriber(parent, topic) end)
      for _ <- pids, do: receive(do: (:subscribed -> :ok))
      :ok
    end

    defp subscriber(parent, topic) do
      :ok = Dispatcher.subscribe(topic)
      :ok = :pg.join(ClusterBench.PG, topic, self())
      {:ok, _} = Registry.register(ClusterBench.Registry, topic, nil)
      send(parent, :subscribed)
      count()
    end

    defp count do
      receive do
        {:bench, round, _entries} ->
          :ok = Round.delivered(round)
          count()
      end
    end

    defp forwarder(received \\ 0) do
      receive do
        {:fwd, topic, message} ->
          Registry.dispatch(ClusterBench.Registry, topic, &send_all(&1, message))
          forwarder(received + 1)

        {:received, from} ->
          send(from, {:forwarded, node(), received})
          forwarder(received)
      end
    end

    def send_all(entries, message), do: for({pid, _} <- entries, do: send(pid, message))

    # Subscribes a new process to `topic`; returns the wall-clock time just before.
    def subscribe_at(topic) do
      parent = self()
      at = System.os_time(:microsecond)

      spawn(fn ->
        :ok = Dispatcher.subscribe(topic)
        send(parent, :subscribed)
        receive do: (:never -> :ok)
      end)

      receive do: (:subscribed -> at)
    end

    # `cycles` subscribe + unsubscribe of this process; `fresh`: a new topic each time
    # (the node's interest changes twice a cycle), else one topic that other processes
    # keep. A lane's registry hints the relay when its part of a topic is created or
    # emptied, and this process's lane comes from its pid: keepers in every lane (16 per
    # scheduler make one missing a lane vanishingly rare) keep that out of the figure.
    def churn(cycles, fresh) do
      kept = "churn:kept:#{System.unique_integer([:positive])}"

      keepers =
        for _ <- 1..(16 * System.schedulers_online()) do
          spawn(fn ->
            :ok = Dispatcher.subscribe(kept)
            receive do: (:never -> :ok)
          end)
        end

      Process.sleep(50)

      {us, :ok} =
        :timer.tc(fn ->
          for i <- 1..cycles do
            topic = if fresh, do: "churn:#{i}:#{System.unique_integer([:positive])}", else: kept
            :ok = Dispatcher.subscribe(topic)
            :ok = Dispatcher.unsubscribe(topic)
          end

          # The relay joins and leaves the groups after the calls return: a call to it
          # returns once it has handled every hint before.
          _ = ExAtlas.Fly.Dispatcher.Cluster.relay_counts()
          :ok
        end)

      Enum.each(keepers, &Process.exit(&1, :kill))
      us
    end

    # A subscriber of `topic` that drops whatever it gets; returns once it is subscribed.
    def sink(topic) do
      parent = self()

      spawn(fn ->
        :ok = Dispatcher.subscribe(topic)
        send(parent, :subscribed)
        drop()
      end)

      receive do: (:subscribed -> :ok)
    end

    defp drop do
      receive do
        _ -> drop()
      end
    end

    # Suspends this node's relay from a process that resumes it on `:resume`; returns
    # that process. (`:erlang.resume_process/1` must come from the suspending process.)
    def suspend_relay do
      parent = self()

      holder =
        spawn(fn ->
          true = :erlang.suspend_process(Process.whereis(ExAtlas.Fly.Dispatcher.Cluster.Relay))
          send(parent, :suspended)

          receive do
            :resume ->
              :erlang.resume_process(Process.whereis(ExAtlas.Fly.Dispatcher.Cluster.Relay))
          end
        end)

      receive do: (:suspended -> holder)
    end

    # `n` more subscribers here, of `topic` only (the one-node scenario).
    def setup_one(n, topic) do
      parent = self()
      for _ <- 1..n, do: spawn(fn -> subscriber(parent, topic) end)
      for _ <- 1..n, do: receive(do: (:subscribed -> :ok))
      :ok
    end
  end

defmodule ClusterBench do
  @moduledoc false
  alias ExAtlas.Fly.Dispatcher
  alias ExAtlas.Fly.Dispatcher.Cluster

  @warmup 5
  # A million processes on each peer (the subscribers).
  @vm_args [~c"+P", ~c"1000000"]

  def main(argv, node_code) do
    opts =
      Bench.options(
        argv,
        "cluster",
        [subscribers: :integer, reps: :integer, lanes: :integer],
        fn quick ->
          if quick, do: %{subscribers: 1_000, reps: 5}, else: %{subscribers: 10_000, reps: 30}
        end
      )

    %{quick: quick, subscribers: n, reps: reps, out: out} = opts
    machine = Bench.machine()
    :ok = Bench.Peers.start_distribution("bench_a")
    fly = [cluster: true] ++ if(opts[:lanes], do: [lanes: opts.lanes], else: [])
    :ok = Bench.restart(fly)

    nodes = [
      node() | for(name <- ["bench_b", "bench_c"], do: Bench.Peers.start(name, fly, @vm_args))
    ]

    IO.puts("nodes: #{inspect(nodes)}; #{n} subscribers each; #{reps} repetitions")

    :ok = Bench.Peers.load(tl(nodes), ClusterBench.Node, node_code)

    all = "bench:all"
    one = "bench:one"
    [_, b, c] = nodes

    for node <- nodes,
        do: :ok = :erpc.call(node, ClusterBench.Node, :setup, [n, all, self()], 120_000)

    await_visible(all, [b, c])
    # The :pg contender sends to the members this node sees: wait for all of them, so
    # that it never runs before the peers' 2 x N joins have arrived.
    await_members(all, 3 * n)

    entries = for i <- 1..20, do: %{"i" => i, "line" => "GET /api #{i} 200", "level" => "info"}
    message = {:bench, 0, entries}

    # Contenders take turns within each repetition, starting one further along each
    # time, so that what the machine does meanwhile (the setup's garbage collections,
    # other load) hits them alike; the first @warmup repetitions are not counted.
    contenders = contenders()

    samples =
      for rep <- 1..(reps + @warmup), {name, fun} <- rotate(contenders, rep), reduce: %{} do
        acc ->
          round = System.unique_integer([:positive, :monotonic])
          sample = round(fun, all, put_elem(message, 1, round), nodes, n)
          if rep > @warmup, do: Map.update(acc, name, [sample], &[sample | &1]), else: acc
      end

    rows =
      for {name, _} <- contenders do
        {call, e2e} = samples |> Map.fetch!(name) |> Enum.unzip()
        {name, Bench.summary(call), Bench.summary(e2e)}
      end

    # Inter-node messages per dispatch: subscribers on every node, then on b only.
    counts = [
      {"subscribers on every node", message_counts(all, nodes, [b, c], message, n)},
      {"subscribers on one other node only", setup_one_and_count(one, b, c, message, n)}
    ]

    interest = interest(b, if(quick, do: 20, else: 100), if(quick, do: 500, else: 5_000))
    stalled = stalled_node(nodes, message, if(quick, do: 2_000, else: 12_000))
    report(rows, counts, interest, stalled, {n, reps, quick}, machine, out)
  end

  # How long until a subscription on b is visible to dispatches here (b's relay in the
  # topic's group as this node's :pg sees it), and what interest costs under churn.
  defp interest(b, samples, cycles) do
    windows =
      for i <- 1..samples do
        topic = "visible:#{i}:#{System.unique_integer([:positive])}"
        {ref, []} = :pg.monitor(Cluster.scope(), topic)
        at = :erpc.call(b, ClusterBench.Node, :subscribe_at, [topic])

        seen =
          receive do
            {^ref, :join, ^topic, _pids} -> System.os_time(:microsecond)
          after
            10_000 -> raise "#{topic} never became visible"
          end

        :pg.demonitor(Cluster.scope(), ref)
        (seen - at) * 1_000
      end

    kept = :erpc.call(b, ClusterBench.Node, :churn, [cycles, false], 120_000)
    fresh = :erpc.call(b, ClusterBench.Node, :churn, [cycles, true], 120_000)

    %{visible: Bench.summary(windows), samples: samples, cycles: cycles}
    |> Map.merge(%{kept_us: kept / cycles, fresh_us: fresh / cycles})
  end

  defp setup_one_and_count(topic, b, c, message, n) do
    :ok = :erpc.call(b, ClusterBench.Node, :setup_one, [n, topic], 120_000)
    await_visible(topic, [b])
    await_members(topic, n)
    message_counts(topic, [b], [b, c], message, n)
  end

  @k 100

  # Dispatches @k messages with each contender; counts what the other nodes received.
  defp message_counts(topic, with_subscribers, others, message, n) do
    ours =
      measure_k(topic, with_subscribers, n, message, &Dispatcher.dispatch/2, fn ->
        # Acknowledgements go out after 64 messages or 500 ms.
        Process.sleep(600)

        Enum.reduce(others, %{data: 0, acks: 0}, fn node, acc ->
          %{received: r, acks: a} = :erpc.call(node, Cluster, :relay_counts, [])
          %{data: acc.data + r, acks: acc.acks + a}
        end)
      end)

    forward =
      measure_k(topic, with_subscribers, n, message, &forward/2, fn ->
        for node <- others, reduce: 0 do
          acc ->
            send({ClusterBench.Forwarder, node}, {:received, self()})
            acc + receive(do: ({:forwarded, ^node, count} -> count))
        end
      end)

    remote_members = Enum.count(:pg.get_members(ClusterBench.PG, topic), &(node(&1) != node()))

    %{
      ours_data: ours.data / @k,
      ours_acks: ours.acks / @k,
      forward: forward / @k,
      pg: remote_members
    }
  end

  # Runs `dispatch` @k times and returns the difference of `counts` around it.
  defp measure_k(topic, with_subscribers, n, message, dispatch, counts) do
    before = counts.()
    for node <- with_subscribers, do: :erpc.call(node, Bench.Peers.Round, :arm, [n * @k])
    for round <- 1..@k, do: dispatch.(topic, put_elem(message, 1, -round))

    for _ <- with_subscribers do
      receive do
        {:done, _node, _round, _at} -> :ok
      after
        60_000 -> raise "message count: a node did not finish"
      end
    end

    diff(counts.(), before)
  end

  defp diff(%{} = a, %{} = b), do: Map.new(a, fn {k, v} -> {k, v - b[k]} end)
  defp diff(a, b), do: a - b

  defp await_visible(topic, nodes, tries \\ 1_000) do
    seen = MapSet.new(:pg.get_members(Cluster.scope(), topic), &node/1)

    cond do
      Enum.all?(nodes, &MapSet.member?(seen, &1)) -> :ok
      tries == 0 -> raise "#{topic}: never saw #{inspect(nodes)}"
      true -> Process.sleep(10) && await_visible(topic, nodes, tries - 1)
    end
  end

  # A node whose relay is suspended (`:erlang.suspend_process/1`): how long dispatch/2
  # blocks its caller, `k` dispatches to a topic with one subscriber on each node, first
  # with every node draining, then with c's relay suspended; meanwhile, the most c's
  # link held (queued + unacknowledged; the bound is `cluster_queue`, 10 000) and what it
  # dropped, and the link's memory at the end. Dispatches go in chunks of 100, each once
  # b (draining in both phases) has caught up, so that only c's suspension differs: one
  # producer dispatching flat out outruns any node's relay, and the link then drops at
  # its bound whatever the node does. c's relay is resumed and its link drained after.
  defp stalled_node([_, b, c] = nodes, message, k) do
    topic = "bench:stalled"
    for node <- nodes, do: :ok = :erpc.call(node, ClusterBench.Node, :sink, [topic])
    await_visible(topic, [b, c])
    [{^c, {link, _}}] = :ets.lookup(Cluster.links_table(), c)
    normal = timed_dispatches(topic, message, k, b, c)
    drained(c)
    holder = :erpc.call(c, ClusterBench.Node, :suspend_relay, [])
    suspended = timed_dispatches(topic, message, k, b, c)
    {:memory, link_bytes} = Process.info(link, :memory)
    send(holder, :resume)
    drained(c)

    %{
      k: k,
      normal: normal,
      suspended: suspended,
      link_bytes: link_bytes,
      message_bytes: :erts_debug.flat_size(message) * :erlang.system_info(:wordsize)
    }
  end

  # Caller-blocked times of `k` dispatches, paced by `pace`'s link, with the most
  # `node`'s link held meanwhile and what it dropped.
  defp timed_dispatches(topic, message, k, pace, node) do
    dropped = Cluster.stats()[node].dropped

    {times, most} =
      1..k
      |> Enum.chunk_every(100)
      |> Enum.flat_map_reduce(0, fn chunk, most ->
        times =
          for i <- chunk do
            t0 = System.monotonic_time(:nanosecond)
            :ok = Dispatcher.dispatch(topic, put_elem(message, 1, -i))
            System.monotonic_time(:nanosecond) - t0
          end

        most = max(most, Cluster.stats()[node].queued)
        drained(pace)
        {times, most}
      end)

    %{
      summary: Bench.summary(times),
      most_queued: max(most, Cluster.stats()[node].queued),
      dropped: Cluster.stats()[node].dropped - dropped
    }
  end

  defp drained(node, tries \\ 3_000) do
    cond do
      Cluster.stats()[node].queued == 0 -> :ok
      tries == 0 -> raise "the link to #{node} never drained"
      true -> Process.sleep(10) && drained(node, tries - 1)
    end
  end

  defp await_members(topic, count, tries \\ 3_000) do
    cond do
      length(:pg.get_members(ClusterBench.PG, topic)) == count -> :ok
      tries == 0 -> raise "#{topic}: never saw #{count} :pg members"
      true -> Process.sleep(10) && await_members(topic, count, tries - 1)
    end
  end

  defp report(rows, counts, interest, stalled, {n, reps, _quick}, machine, out) do
    [{_, ours_call, ours_e2e}, _pg, {_, fwd_call, fwd_e2e}] = rows
    one = counts |> List.last() |> elem(1)
    command = Bench.command("cluster.exs")
    both = &"#{Bench.dur(&1.median)} / #{Bench.dur(&1.p99)}"

    Bench.write(out, "cluster.md", [
      Bench.header("Cluster benchmark", command, machine),
      Bench.table(
        "One dispatch to 3 nodes of #{n} subscribers (#{@warmup} warm-up + #{reps} repetitions, contenders in turn)",
        ["contender", "caller blocked (median / p99)", "end to end (median / p99)"],
        for({name, call, e2e} <- rows, do: [name, both.(call), both.(e2e)]),
        note: "nodes: 3 on this machine (:peer, 127.0.0.1); one producer"
      ),
      Bench.table(
        "Inter-node messages per dispatch (#{@k} dispatches)",
        ["subscribers", "ExAtlas (data + acks)", ":pg send", "forward + Registry"],
        for {label, c} <- counts do
          [label, "#{Bench.sig(c.ours_data)} + #{Bench.sig(c.ours_acks)}", c.pg] ++
            [Bench.sig(c.forward)]
        end,
        note: "ExAtlas's acknowledgements go back after 64 messages or 500 ms"
      ),
      Bench.table(
        "Interest: subscriptions on a peer, seen from the dispatching node",
        ["measure", "value"],
        [
          [
            "visibility: subscribe/1 on the peer until its relay is in the topic's :pg group " <>
              "here (#{interest.samples} new topics), median / p99",
            both.(interest.visible)
          ],
          [
            "subscribe + unsubscribe on the peer, topic the node already has (no interest " <>
              "change), per cycle (#{interest.cycles} cycles)",
            "#{Bench.sig(interest.kept_us)} us"
          ],
          [
            "the same, a new topic each cycle (a :pg join and leave to each other node, the " <>
              "relay's work included)",
            "#{Bench.sig(interest.fresh_us)} us"
          ]
        ]
      ),
      Bench.table(
        "A node whose relay is suspended: #{stalled.k} dispatches to one subscriber on each " <>
          "node, in chunks of 100 paced by a draining node",
        ["", "caller blocked (median / p99)", "most queued for the node", "dropped for it"],
        [
          [
            "every node draining",
            both.(stalled.normal.summary),
            "#{stalled.normal.most_queued}",
            "#{stalled.normal.dropped}"
          ],
          [
            "the relay of one node suspended",
            both.(stalled.suspended.summary),
            "#{stalled.suspended.most_queued}",
            "#{stalled.suspended.dropped}"
          ]
        ],
        note:
          "bound: cluster_queue 10 000 messages of #{Bench.bytes(stalled.message_bytes)} " <>
            "(#{Bench.bytes(10_000 * stalled.message_bytes)}); the link to the suspended " <>
            "node held #{Bench.bytes(stalled.link_bytes)} at the end"
      ),
      Bench.targets("Targets", [
        {"caller blocked <= 1/100 of forward + Registry",
         "1/#{round(fwd_call.median / ours_call.median)}",
         ours_call.median * 100 <= fwd_call.median},
        {"end to end >= 1.0x forward + Registry", Bench.ratio(fwd_e2e.median, ours_e2e.median),
         fwd_e2e.median >= ours_e2e.median},
        {"subscribers on one other node: inter-node messages per dispatch 1 (forward: 2)",
         "#{Bench.sig(one.ours_data)} (+#{Bench.sig(one.ours_acks)} acks) vs #{Bench.sig(one.forward)}",
         one.ours_data == 1.0 and one.forward == 2.0},
        {"a node's relay suspended: caller blocked (median) <= 1.25x with every node draining",
         Bench.ratio(stalled.suspended.summary.median, stalled.normal.summary.median),
         stalled.suspended.summary.median <= 1.25 * stalled.normal.summary.median},
        {"a node's relay suspended: its queue <= cluster_queue (10 000)",
         "#{stalled.suspended.most_queued}", stalled.suspended.most_queued <= 10_000}
      ])
    ])
  end

  defp rotate(list, rep),
    do: Enum.drop(list, rem(rep, length(list))) ++ Enum.take(list, rem(rep, length(list)))

  defp contenders do
    [
      {"ExAtlas cluster mode", fn topic, msg -> Dispatcher.dispatch(topic, msg) end},
      {":pg, send to every member",
       fn topic, msg -> for pid <- :pg.get_members(ClusterBench.PG, topic), do: send(pid, msg) end},
      {"forward + Registry.dispatch", &forward/2}
    ]
  end

  defp forward(topic, msg) do
    for node <- Node.list(), do: send({ClusterBench.Forwarder, node}, {:fwd, topic, msg})
    Registry.dispatch(ClusterBench.Registry, topic, &ClusterBench.Node.send_all(&1, msg))
  end

  # One dispatch: arm every node, time the call, wait for each node's last subscriber.
  defp round(fun, topic, message, nodes, n) do
    for node <- nodes,
        do: :ok = :erpc.call(node, Bench.Peers.Round, :arm, [n]) |> then(fn _ -> :ok end)

    round = elem(message, 1)
    t0 = System.os_time(:microsecond)
    {call_us, _} = :timer.tc(fn -> fun.(topic, message) end)

    done =
      for _ <- nodes do
        receive do
          {:done, _node, ^round, at} -> at
        after
          30_000 ->
            seen =
              for node <- nodes,
                  do:
                    {node, :erpc.call(node, Bench.Peers.Round, :progress, []),
                     :erpc.call(node, Dispatcher, :count, [topic]),
                     :erpc.call(node, Registry, :count, [ClusterBench.Registry]),
                     :erpc.call(node, Dispatcher, :stats, []),
                     :erpc.call(node, Cluster, :relay_counts, [])}

            raise "round #{round}: a node did not finish: #{inspect(seen)}"
        end
      end

    {call_us * 1_000, (Enum.max(done) - t0) * 1_000}
  end
end

ClusterBench.main(System.argv(), node_code)
