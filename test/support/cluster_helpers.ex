defmodule ExAtlas.Test.Cluster do
  @moduledoc """
  Peer nodes for cluster-mode tests: distribution on 127.0.0.1 only (`epmd` started when
  it is not running), peers started with OTP's `:peer` on this node's code path, and
  small processes to run on them (functions of this module, which the peers load from
  the same build).
  """

  import ExUnit.Assertions, only: [assert_receive: 2, flunk: 1]

  alias ExAtlas.Fly.Dispatcher

  @doc """
  Starts epmd if needed and makes this node alive on 127.0.0.1. `global`'s prevention of
  overlapping partitions (OTP 25) is turned off here and on the peers: stopping a peer
  on purpose would otherwise make it disconnect healthy nodes mid-test.
  """
  @spec ensure_distribution() :: :ok
  def ensure_distribution do
    :ok = :application.set_env(:kernel, :prevent_overlapping_partitions, false)

    unless Node.alive?() do
      case System.cmd("epmd", ["-names"], stderr_to_stdout: true) do
        {_, 0} -> :ok
        _ -> {_, 0} = System.cmd("epmd", ["-daemon"])
      end

      name = :"ex_atlas_test_#{System.unique_integer([:positive])}@127.0.0.1"
      {:ok, _} = wait_for_epmd(fn -> Node.start(name, :longnames) end, 50)
    end

    :ok
  end

  defp wait_for_epmd(start, 0), do: start.()

  defp wait_for_epmd(start, tries) do
    case start.() do
      {:ok, _} = ok ->
        ok

      {:error, _} ->
        Process.sleep(100)
        wait_for_epmd(start, tries - 1)
    end
  end

  @doc """
  For a test module's `setup_all`: starts distribution, then one peer per name in `names`
  (named `prefix_name_N`) with `config :ex_atlas, :fly` set to `fly` (cluster mode by
  default), stopped when the module's tests are done. Returns their node names, in order.
  """
  @spec start_peers(String.t(), [atom()], keyword()) :: [node()]
  def start_peers(prefix, names, fly \\ [cluster: true]) do
    :ok = ensure_distribution()

    peers =
      for name <- names,
          do: start_peer("#{prefix}_#{name}_#{System.unique_integer([:positive])}", fly)

    ExUnit.Callbacks.on_exit(fn ->
      for {peer, _node} <- peers do
        try do
          :peer.stop(peer)
        catch
          :exit, _ -> :ok
        end
      end
    end)

    Enum.map(peers, &elem(&1, 1))
  end

  @doc """
  Starts a peer named `name` on 127.0.0.1 with this node's code path and cookie, and the
  emulator flags `vm_args` (charlists), sets `config :ex_atlas, :fly` to `fly` there and
  starts `:ex_atlas`. Returns `{peer, node}`.
  """
  @spec start_peer(String.t(), keyword(), [charlist()]) :: {pid(), node()}
  def start_peer(name, fly, vm_args \\ []) do
    paths = Enum.flat_map(:code.get_path(), &[~c"-pa", &1])
    cookie = Atom.to_charlist(Node.get_cookie())

    {:ok, peer, node} =
      :peer.start_link(%{
        name: String.to_atom(name),
        host: ~c"127.0.0.1",
        longnames: true,
        args:
          [~c"-setcookie", cookie, ~c"-kernel", ~c"logger_level", ~c"error"] ++
            [~c"-kernel", ~c"prevent_overlapping_partitions", ~c"false"] ++ vm_args ++ paths
      })

    :ok = :erpc.call(node, Application, :put_env, [:ex_atlas, :fly, fly])
    {:ok, _} = :erpc.call(node, Application, :ensure_all_started, [:ex_atlas])
    {peer, node}
  end

  @doc """
  Spawns, on `node`, a subscriber of `topic` that records every message it gets; returns
  its pid once subscribed.
  """
  @spec subscriber(node(), binary()) :: pid()
  def subscriber(node, topic), do: replay_subscriber(node, topic, 0)

  @doc """
  Spawns, on `node`, a subscriber of `topic` through `subscribe(topic, replay: replay)`
  that records every message it gets (its history first); returns its pid once
  subscribed.
  """
  @spec replay_subscriber(node(), binary(), non_neg_integer()) :: pid()
  def replay_subscriber(node, topic, replay) do
    pid = Node.spawn(node, __MODULE__, :subscriber_init, [self(), topic, replay])

    receive do
      {:subscribed, ^pid} -> pid
    after
      10_000 -> raise "subscriber on #{node} did not subscribe"
    end
  end

  @doc false
  def subscriber_init(parent, topic, replay) do
    :ok = Dispatcher.subscribe(topic, replay: replay)
    send(parent, {:subscribed, self()})
    record(parent, [])
  end

  defp record(parent, seen) do
    receive do
      {:report, from, ref} ->
        send(from, {ref, self(), Enum.reverse(seen)})
        record(parent, seen)

      {:unsubscribe, topic, from, ref} ->
        :ok = Dispatcher.unsubscribe(topic)
        send(from, {ref, :unsubscribed})
        record(parent, seen)

      :stop ->
        :ok

      message ->
        record(parent, [message | seen])
    end
  end

  @doc """
  Spawns, on `node`, a subscriber of `topic` through `subscribe_with_backpressure/2` with
  `opts` that never reads its mailbox; returns its pid once subscribed.
  """
  @spec stalled_subscriber(node(), binary(), keyword()) :: pid()
  def stalled_subscriber(node, topic, opts) do
    pid = Node.spawn(node, __MODULE__, :stalled_init, [self(), topic, opts])

    receive do
      {:subscribed, ^pid} -> pid
    after
      10_000 -> raise "stalled subscriber on #{node} did not subscribe"
    end
  end

  @doc false
  def stalled_init(parent, topic, opts) do
    :ok = Dispatcher.subscribe_with_backpressure(topic, opts)
    send(parent, {:subscribed, self()})
    receive do: (:never_sent -> :ok)
  end

  @doc "What the subscriber `pid` has recorded, in arrival order."
  @spec report(pid()) :: [term()]
  def report(pid) do
    ref = make_ref()
    send(pid, {:report, self(), ref})

    receive do
      {^ref, ^pid, seen} -> seen
    after
      10_000 -> raise "no report from #{inspect(pid)}"
    end
  end

  @doc """
  Spawns, on `node`, a producer that dispatches `{:p, id, seq}` to `topic` for seq
  1..count (sleeping `pause_ms` every 50), then calls `sync(:cluster)` and sends
  `{:produced, id, sync_result}` to the caller.
  """
  @spec producer(node(), binary(), term(), pos_integer(), non_neg_integer()) :: pid()
  def producer(node, topic, id, count, pause_ms \\ 0) do
    Node.spawn(node, __MODULE__, :produce, [self(), topic, id, count, pause_ms])
  end

  @doc false
  def produce(parent, topic, id, count, pause_ms) do
    for seq <- 1..count do
      :ok = Dispatcher.dispatch(topic, {:p, id, seq})
      if pause_ms > 0 and rem(seq, 50) == 0, do: Process.sleep(pause_ms)
    end

    send(parent, {:produced, id, Dispatcher.sync(:cluster)})
  end

  @doc """
  Spawns, on `node`, a producer that dispatches `{:p, id, seq}` to `topic` for seq
  1..count and applies `fault` (`{module, function, args}`: the peers do not have the test
  modules) on `node` right after dispatch `at`. Once done it waits
  until `node` is connected to each of `reconnect` (connecting it), calls
  `sync(:cluster)` and sends `{:produced, id, sync_result}` to the caller.
  """
  @spec producer_with_fault(
          node(),
          binary(),
          term(),
          pos_integer(),
          pos_integer(),
          {module(), atom(), list()},
          [
            node()
          ]
        ) :: pid()
  def producer_with_fault(node, topic, id, count, at, fault, reconnect \\ []) do
    Node.spawn(node, __MODULE__, :produce_with_fault, [
      self(),
      {topic, id, count},
      at,
      fault,
      reconnect
    ])
  end

  @doc false
  def produce_with_fault(parent, {topic, id, count}, at, fault, reconnect) do
    for seq <- 1..count do
      :ok = Dispatcher.dispatch(topic, {:p, id, seq})
      if seq == at, do: apply_fault(fault)
    end

    Enum.each(reconnect, &connect/1)
    send(parent, {:produced, id, Dispatcher.sync(:cluster)})
  end

  defp apply_fault({module, function, args}), do: apply(module, function, args)

  @doc """
  Spawns, on `node`, a producer that dispatches `{:p, id, seq}` to `topic` for seq
  1..count, sleeping 1 ms every `every` dispatches, and sends
  `{:produced, id, slowest_dispatch_us}` to the caller.
  """
  @spec timed_producer(node(), binary(), term(), pos_integer(), pos_integer()) :: pid()
  def timed_producer(node, topic, id, count, every) do
    Node.spawn(node, __MODULE__, :produce_timed, [self(), topic, id, count, every])
  end

  @doc false
  def produce_timed(parent, topic, id, count, every) do
    slowest =
      Enum.reduce(1..count, 0, fn seq, slowest ->
        {us, :ok} = :timer.tc(Dispatcher, :dispatch, [topic, {:p, id, seq}])
        if rem(seq, every) == 0, do: Process.sleep(1)
        max(us, slowest)
      end)

    send(parent, {:produced, id, slowest})
  end

  @doc """
  Spawns, on `node`, a producer that dispatches `{:p, id, seq}` to `topic` for seq 1, 2,
  ... until it gets `:stop`, sleeping 1 ms every `every` dispatches, and then sends
  `{:produced, id, dispatched, slowest_dispatch_us}` to the caller. `progress/1` asks it
  how many it dispatched so far.
  """
  @spec endless_producer(node(), binary(), term(), pos_integer()) :: pid()
  def endless_producer(node, topic, id, every) do
    Node.spawn(node, __MODULE__, :produce_until_stopped, [self(), {topic, id, every}, 0, 0])
  end

  @doc false
  def produce_until_stopped(parent, {topic, id, every} = how, seq, slowest) do
    receive do
      {:progress, from, ref} ->
        send(from, {ref, seq})
        produce_until_stopped(parent, how, seq, slowest)

      :stop ->
        send(parent, {:produced, id, seq, slowest})
    after
      0 ->
        seq = seq + 1
        {us, :ok} = :timer.tc(Dispatcher, :dispatch, [topic, {:p, id, seq}])
        if rem(seq, every) == 0, do: Process.sleep(1)
        produce_until_stopped(parent, how, seq, max(us, slowest))
    end
  end

  @doc "How many dispatches the `endless_producer/4` `pid` made so far."
  @spec progress(pid()) :: non_neg_integer()
  def progress(pid) do
    ref = make_ref()
    send(pid, {:progress, self(), ref})

    receive do
      {^ref, seq} -> seq
    after
      10_000 -> raise "no progress report from #{inspect(pid)}"
    end
  end

  @doc "Connects this node to `node`, trying again until it is connected."
  @spec connect(node(), non_neg_integer()) :: :ok
  def connect(node, tries \\ 500) do
    cond do
      node in Node.list() -> :ok
      Node.connect(node) == true -> :ok
      tries == 0 -> raise "could not connect to #{node}"
      true -> retry_connect(node, tries)
    end
  end

  defp retry_connect(node, tries) do
    Process.sleep(10)
    connect(node, tries - 1)
  end

  @doc "Spawns, on `node`, a process that subscribes to and leaves `topic` until `:stop`."
  @spec churner(node(), binary()) :: pid()
  def churner(node, topic), do: Node.spawn(node, __MODULE__, :churn, [topic, 0])

  @doc false
  def churn(topic, rounds) do
    receive do
      :stop -> :ok
    after
      0 ->
        :ok = Dispatcher.subscribe(topic)
        Process.sleep(1)
        :ok = Dispatcher.unsubscribe(topic)
        flush()
        churn(topic, rounds + 1)
    end
  end

  defp flush do
    receive do
      {:p, _, _} -> flush()
    after
      0 -> :ok
    end
  end

  @doc "Waits until `node` sees a relay of each of `nodes` in `topic`'s group."
  @spec await_visible(node(), binary(), [node()]) :: :ok
  def await_visible(node, topic, nodes, tries \\ 500) do
    members = :erpc.call(node, :pg, :get_members, [Dispatcher.Cluster.scope(), topic])
    seen = members |> Enum.map(&node/1) |> MapSet.new()

    cond do
      MapSet.subset?(MapSet.new(nodes), seen) ->
        :ok

      tries == 0 ->
        raise "#{node} never saw #{inspect(nodes)} in #{topic}: #{inspect(seen)}"

      true ->
        Process.sleep(10)
        await_visible(node, topic, nodes, tries - 1)
    end
  end

  @doc """
  Suspends `pid` (on its node) from a process there until `resume/1` is called with the
  returned handle: `:erlang.resume_process/1` must come from the suspending process.
  """
  @spec suspend(pid()) :: pid()
  def suspend(pid) do
    holder = Node.spawn(node(pid), __MODULE__, :hold_suspended, [self(), pid])

    receive do
      {:suspended, ^holder} -> holder
    after
      10_000 -> raise "could not suspend #{inspect(pid)}"
    end
  end

  @doc "Resumes what `suspend/1` suspended."
  @spec resume(pid()) :: :ok
  def resume(holder) do
    send(holder, :resume)
    :ok
  end

  @doc """
  Kills what `suspend/1` suspended, still suspended (nothing in its mailbox is handled
  first), and returns once it is dead.
  """
  @spec kill_suspended(pid()) :: :ok
  def kill_suspended(holder) do
    ref = make_ref()
    send(holder, {:kill, self(), ref})

    receive do
      {^ref, :killed} -> :ok
    after
      10_000 -> raise "could not kill the process #{inspect(holder)} holds"
    end
  end

  @doc false
  def hold_suspended(parent, pid) do
    true = :erlang.suspend_process(pid)
    send(parent, {:suspended, self()})

    receive do
      :resume ->
        :erlang.resume_process(pid)

      {:kill, from, ref} ->
        monitor = Process.monitor(pid)
        Process.exit(pid, :kill)
        receive do: ({:DOWN, ^monitor, :process, ^pid, _} -> send(from, {ref, :killed}))
    end
  end

  @doc """
  Spawns, on `node`, a producer for `topic` that waits for `drive/2`'s commands, so that
  one process dispatches every phase of a test (order is per dispatching process).
  """
  @spec driven_producer(node(), binary(), term()) :: pid()
  def driven_producer(node, topic, id), do: Node.spawn(node, __MODULE__, :driven, [topic, id])

  @doc """
  Has the producer `pid` of `driven_producer/3` run `command` and returns its answer:
  `{:dispatch, range}` dispatches `{:p, id, seq}` for each seq (`:ok`), `:sync` calls
  `sync(:cluster)`, `:stop` ends it.
  """
  @spec drive(pid(), {:dispatch, Range.t()} | :sync | :stop) :: term()
  def drive(pid, command) do
    ref = make_ref()
    send(pid, {:drive, command, self(), ref})

    receive do
      {^ref, answer} -> answer
    after
      60_000 -> raise "the producer #{inspect(pid)} did not carry out #{inspect(command)}"
    end
  end

  @doc false
  def driven(topic, id) do
    receive do
      {:drive, {:dispatch, range}, from, ref} ->
        for seq <- range, do: :ok = Dispatcher.dispatch(topic, {:p, id, seq})
        send(from, {ref, :ok})
        driven(topic, id)

      {:drive, :sync, from, ref} ->
        send(from, {ref, Dispatcher.sync(:cluster)})
        driven(topic, id)

      {:drive, :stop, from, ref} ->
        send(from, {ref, :ok})
    end
  end

  @doc "`ExAtlas.Fly.Dispatcher.Cluster.stats/0` on `node`."
  @spec stats_on(node()) :: map()
  def stats_on(node), do: :erpc.call(node, Dispatcher.Cluster, :stats, [])

  @doc "The dispatches `node` counted as dropped for `other` (0 without a link)."
  @spec dropped_on(node(), node()) :: non_neg_integer()
  def dropped_on(node, other), do: (stats_on(node)[other] || %{dropped: 0}).dropped

  @doc """
  On `b`, dispatches `count` messages `{:p, id, n}` to `topic`; right after dispatch `at`
  `b` cuts itself off from `c` (`:erlang.disconnect_node/1`), goes on, and connects again
  once done. Returns, once `b`'s queue for `c` is empty, the dispatches `b` counted as
  dropped for `c` meanwhile. `b`'s drop warnings are captured.
  """
  @spec produce_with_cut(node(), node(), binary(), atom(), pos_integer(), pos_integer()) ::
          non_neg_integer()
  def produce_with_cut(b, c, topic, id, count, at) do
    before = dropped_on(b, c)

    ExUnit.CaptureLog.capture_log(fn ->
      producer_with_fault(b, topic, id, count, at, {:erlang, :disconnect_node, [c]}, [c])
      assert_receive {:produced, ^id, :ok}, 60_000

      ExAtlas.Test.FlyEnv.eventually(fn -> stats_on(b)[c].queued == 0 end, 10_000)
    end)

    dropped_on(b, c) - before
  end

  @doc """
  On this node: kills the cluster-mode process `target` (`{:link, node}`: the link to
  `node`; `:relay`, `:scope`, `:switch`, `:link_supervisor`, `:cluster_supervisor`) with
  `how`: `:kill` (no terminate runs) or `:crash` (it stops with reason `:crash`, as after
  an exception; `:sys.terminate/3`, which returns once it is gone). Returns its pid.
  """
  @spec kill_cluster_process(term(), :kill | :crash) :: pid()
  def kill_cluster_process(target, how) do
    pid = cluster_process(target)
    monitor = Process.monitor(pid)

    case how do
      :kill -> Process.exit(pid, :kill)
      :crash -> :sys.terminate(pid, :crash, :infinity)
    end

    receive do: ({:DOWN, ^monitor, :process, ^pid, _} -> pid)
  end

  @doc "The pid of the cluster-mode process `target` on this node (see `kill_cluster_process/2`)."
  @spec cluster_process(term()) :: pid()
  def cluster_process({:link, node}) do
    [{^node, {pid, _counters}}] = :ets.lookup(Dispatcher.Cluster.links_table(), node)
    pid
  end

  def cluster_process(:relay), do: Process.whereis(Dispatcher.Cluster.Relay)
  def cluster_process(:scope), do: Process.whereis(Dispatcher.Cluster.scope())
  def cluster_process(:link_supervisor), do: Process.whereis(Dispatcher.Cluster.link_supervisor())
  def cluster_process(:cluster_supervisor), do: Process.whereis(Dispatcher.Cluster.Supervisor)

  def cluster_process(:switch) do
    children = Supervisor.which_children(Dispatcher.Cluster.Supervisor)
    hd(for {Dispatcher.Cluster.Switch, pid, _, _} <- children, do: pid)
  end

  @doc "Restarts the `:ex_atlas` application on `node` (its settings as they are)."
  @spec restart_app_on(node()) :: :ok
  def restart_app_on(node) do
    :ok = :erpc.call(node, Application, :stop, [:ex_atlas])
    {:ok, _} = :erpc.call(node, Application, :ensure_all_started, [:ex_atlas])
    :ok
  end

  @doc """
  Has `producer` (of `driven_producer/3`) dispatch `range` paced: one dispatch every
  `every_ms`, from one process, so that per-producer order holds.
  """
  @spec drive_paced(pid(), Range.t(), pos_integer()) :: :ok
  def drive_paced(producer, range, every_ms) do
    Enum.each(range, fn seq ->
      :ok = drive(producer, {:dispatch, seq..seq})
      Process.sleep(every_ms)
    end)
  end
end
