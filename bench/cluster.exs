# Cluster benchmark (issue 10): one producer, three nodes of N subscribers each, on this
# machine (peers on 127.0.0.1 through OTP's :peer; epmd started when needed).
#
#     MIX_ENV=prod mix run bench/cluster.exs            # N = 10 000, writes bench/results/cluster.md
#     MIX_ENV=prod mix run bench/cluster.exs --quick    # N = 1 000, seconds; temp dir (CI)
#
# Options: --subscribers N  --reps R  --out DIR
#
# Contenders, on the same subscriber processes (each subscribes to all three):
#   * ours: ExAtlas in cluster mode; dispatch/2 fans out locally and sends once to each
#     other node whose relay is in the topic's :pg group;
#   * :pg send: every subscriber joins a :pg group; the producer sends to each member,
#     local and remote (one inter-node message per remote subscriber);
#   * forward + Registry: Phoenix.PubSub's way: one message to a forwarder process on
#     each other node, which runs Registry.dispatch/3 there; Registry.dispatch/3 here.
# Measured per dispatch: how long the caller is blocked, end to end until the last
# subscriber on any node has the message (wall clock, comparable: one machine), and the
# inter-node messages, counted where they arrive (relays, forwarders) or by
# construction (:pg). The message is the fanout benchmark's: 20 small log maps.

{:ok, _modules, _warnings} =
  __DIR__
  |> Path.join("support/{stats,machine}.ex")
  |> Path.wildcard()
  |> Kernel.ParallelCompiler.require()

{:module, _, node_code, _} =
  defmodule ClusterBench.Node do
    @moduledoc false
    # Runs on every node (loaded on the peers as a binary): subscribers, their completion
    # signal, the forwarder of the forward contender.

    alias ExAtlas.Fly.Dispatcher

    @key {__MODULE__, :round}

    def setup(n, topic, controller) do
      # Owned by a process that stays: :erpc's own process exits with a reason that
      # would take linked processes (and, through the Registry's links, the
      # subscribers) along.
      parent = self()

      spawn(fn ->
        {:ok, _} = Registry.start_link(keys: :duplicate, name: ClusterBench.Registry)
        {:ok, _} = :pg.start_link(ClusterBench.PG)
        send(parent, :started)
        receive do: (:never -> :ok)
      end)

      receive do: (:started -> :ok)
      :persistent_term.put(@key, {:atomics.new(1, signed: false), 0, controller})
      spawn(fn -> forwarder() end) |> Process.register(ClusterBench.Forwarder)
      pids = for _ <- 1..n, do: spawn(fn -> subscriber(parent, topic) end)
      for _ <- pids, do: receive(do: (:subscribed -> :ok))
      :ok
    end

    def progress do
      {counter, target, _} = :persistent_term.get(@key)
      {:atomics.get(counter, 1), target}
    end

    # The next `target` deliveries complete a round.
    def arm(target) do
      {counter, _, controller} = :persistent_term.get(@key)
      :atomics.put(counter, 1, 0)
      :persistent_term.put(@key, {counter, target, controller})
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
          {counter, target, controller} = :persistent_term.get(@key)

          if :atomics.add_get(counter, 1, 1) == target,
            do: send(controller, {:done, node(), round, System.os_time(:microsecond)})

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
    # (the node's interest changes twice a cycle), else one topic another process keeps.
    def churn(cycles, fresh) do
      kept = "churn:kept:#{System.unique_integer([:positive])}"

      keeper =
        spawn(fn ->
          :ok = Dispatcher.subscribe(kept)
          receive do: (:never -> :ok)
        end)

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

      Process.exit(keeper, :kill)
      us
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
  alias FanoutBench.{Machine, Stats}

  def main(argv, node_code) do
    {opts, _, _} =
      OptionParser.parse(argv,
        strict: [
          quick: :boolean,
          subscribers: :integer,
          reps: :integer,
          out: :string,
          lanes: :integer
        ]
      )

    quick = Keyword.get(opts, :quick, false)
    n = Keyword.get(opts, :subscribers, if(quick, do: 1_000, else: 10_000))
    reps = Keyword.get(opts, :reps, if(quick, do: 5, else: 30))

    out =
      Keyword.get(
        opts,
        :out,
        if(quick, do: System.tmp_dir!(), else: Path.join(__DIR__, "results"))
      )

    start_distribution()
    Application.stop(:ex_atlas)
    fly = [cluster: true] ++ Keyword.take(opts, [:lanes])
    Application.put_env(:ex_atlas, :fly, fly)
    {:ok, _} = Application.ensure_all_started(:ex_atlas)
    nodes = [node() | for(name <- ["bench_b", "bench_c"], do: start_peer(name, fly))]
    IO.puts("nodes: #{inspect(nodes)}; #{n} subscribers each; #{reps} repetitions")

    for node <- tl(nodes),
        do:
          {:module, _} =
            :erpc.call(node, :code, :load_binary, [ClusterBench.Node, ~c"nofile", node_code])

    all = "bench:all"
    one = "bench:one"
    [_, b, c] = nodes

    for node <- nodes,
        do: :ok = :erpc.call(node, ClusterBench.Node, :setup, [n, all, self()], 120_000)

    await_visible(all, [b, c])

    message =
      {:bench, 0,
       for(i <- 1..20, do: %{"i" => i, "line" => "GET /api #{i} 200", "level" => "info"})}

    contenders = contenders()

    rows =
      for {name, fun} <- contenders do
        samples =
          for round <- 1..(reps + 3), do: round(fun, all, put_elem(message, 1, round), nodes, n)

        {call, e2e} = samples |> Enum.drop(3) |> Enum.unzip()
        {name, Stats.summarize(call), Stats.summarize(e2e)}
      end

    # Inter-node messages per dispatch: subscribers on every node, then on b only.
    counts = [
      {"subscribers on every node", message_counts(all, nodes, [b, c], message, n)},
      {"subscribers on one other node only", setup_one_and_count(one, b, c, message, n)}
    ]

    interest = interest(b, if(quick, do: 20, else: 100), if(quick, do: 500, else: 5_000))
    report(rows, counts, interest, n, reps, out)
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

    %{
      visible: Stats.summarize(windows),
      samples: samples,
      cycles: cycles,
      kept_us: kept / cycles,
      fresh_us: fresh / cycles
    }
  end

  defp setup_one_and_count(topic, b, c, message, n) do
    :ok = :erpc.call(b, ClusterBench.Node, :setup_one, [n, topic], 120_000)
    await_visible(topic, [b])
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
    for node <- with_subscribers, do: :erpc.call(node, ClusterBench.Node, :arm, [n * @k])
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

  defp start_distribution do
    :ok = :application.set_env(:kernel, :prevent_overlapping_partitions, false)

    case System.cmd("epmd", ["-names"], stderr_to_stdout: true) do
      {_, 0} -> :ok
      _ -> {_, 0} = System.cmd("epmd", ["-daemon"])
    end

    {:ok, _} = Node.start(:"bench_a_#{System.unique_integer([:positive])}@127.0.0.1", :longnames)
  end

  defp start_peer(name, fly) do
    paths = Enum.flat_map(:code.get_path(), &[~c"-pa", &1])

    args =
      [~c"-setcookie", Atom.to_charlist(Node.get_cookie()), ~c"+P", ~c"1000000"] ++
        [~c"-kernel", ~c"prevent_overlapping_partitions", ~c"false" | paths]

    {:ok, _peer, node} =
      :peer.start_link(%{
        name: :"#{name}_#{System.unique_integer([:positive])}",
        host: ~c"127.0.0.1",
        longnames: true,
        args: args
      })

    :ok = :erpc.call(node, Application, :put_env, [:ex_atlas, :fly, fly])
    {:ok, _} = :erpc.call(node, Application, :ensure_all_started, [:ex_atlas])
    node
  end

  defp await_visible(topic, nodes, tries \\ 1_000) do
    seen = MapSet.new(:pg.get_members(Cluster.scope(), topic), &node/1)

    cond do
      Enum.all?(nodes, &MapSet.member?(seen, &1)) -> :ok
      tries == 0 -> raise "#{topic}: never saw #{inspect(nodes)}"
      true -> Process.sleep(10) && await_visible(topic, nodes, tries - 1)
    end
  end

  defp report(rows, counts, interest, n, reps, out) do
    [{_, ours_call, ours_e2e}, _pg, {_, fwd_call, fwd_e2e}] = rows
    one = counts |> List.last() |> elem(1)

    targets = [
      {"caller blocked <= 1/100 of forward + Registry",
       "1/#{round(fwd_call.median / ours_call.median)}",
       ours_call.median * 100 <= fwd_call.median},
      {"end to end >= 1.0x forward + Registry", Stats.ratio(fwd_e2e.median, ours_e2e.median),
       fwd_e2e.median >= ours_e2e.median},
      {"subscribers on one other node: inter-node messages per dispatch 1 (forward: 2)",
       "#{Stats.sig(one.ours_data)} (+#{Stats.sig(one.ours_acks)} acks) vs #{Stats.sig(one.forward)}",
       one.ours_data == 1.0 and one.forward == 2.0}
    ]

    md =
      [
        "# Cluster benchmark\n",
        Enum.map(Machine.info(), fn {k, v} -> "- #{k}: #{v}\n" end),
        "- nodes: 3 on this machine (:peer, 127.0.0.1), #{n} subscribers each; one producer; " <>
          "#{reps} repetitions after 3 warm-up; medians and p99\n\n",
        "| contender | caller blocked (median / p99) | end to end (median / p99) |\n|---|---:|---:|\n",
        for {name, call, e2e} <- rows do
          "| #{name} | #{Stats.duration(call.median)} / #{Stats.duration(call.p99)} | " <>
            "#{Stats.duration(e2e.median)} / #{Stats.duration(e2e.p99)} |\n"
        end,
        "\nInter-node messages per dispatch (#{@k} dispatches; acknowledgements of ours " <>
          "separately: they go back after 64 messages or 500 ms):\n\n",
        "| subscribers | ExAtlas (data + acks) | :pg send | forward + Registry |\n|---|---:|---:|---:|\n",
        for {label, c} <- counts do
          "| #{label} | #{Stats.sig(c.ours_data)} + #{Stats.sig(c.ours_acks)} | #{c.pg} | #{Stats.sig(c.forward)} |\n"
        end,
        "\nInterest (subscriptions on a peer, seen from the dispatching node):\n\n",
        "- visibility window, from `subscribe/1` on the peer to its relay in the topic's " <>
          ":pg group here (#{interest.samples} new topics): median " <>
          "#{Stats.duration(interest.visible.median)}, p99 #{Stats.duration(interest.visible.p99)}\n",
        "- subscribe + unsubscribe, #{interest.cycles} cycles on the peer: to a topic the " <>
          "node already has (no interest change) #{Stats.sig(interest.kept_us)} us a cycle; " <>
          "to a new topic each time (the node joins and leaves the group: a :pg join and " <>
          "leave to each other node) #{Stats.sig(interest.fresh_us)} us a cycle, the " <>
          "relay's work included\n",
        "\n| target | measured | verdict |\n|---|---|---|\n",
        for {target, measured, ok} <- targets do
          "| #{target} | #{measured} | #{if ok, do: "PASS", else: "**MISS**"} |\n"
        end
      ]
      |> IO.iodata_to_binary()

    IO.puts("\n" <> md)
    File.mkdir_p!(out)
    path = Path.join(out, "cluster.md")
    File.write!(path, md)
    IO.puts("written: #{path}")
  end

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
        do: :ok = :erpc.call(node, ClusterBench.Node, :arm, [n]) |> then(fn _ -> :ok end)

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
                    {node, :erpc.call(node, ClusterBench.Node, :progress, []),
                     :erpc.call(node, Dispatcher, :count, [topic]),
                     :erpc.call(node, Registry, :count, [ClusterBench.Registry])}

            raise "round #{round}: a node did not finish: #{inspect(seen)}"
        end
      end

    {call_us * 1_000, (Enum.max(done) - t0) * 1_000}
  end
end

ClusterBench.main(System.argv(), node_code)
