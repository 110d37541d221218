{:module, _, round_code, _} =
  defmodule Bench.Peers.Round do
    @moduledoc false
    # Loaded on every peer by `Bench.Peers.start/3`: counts the deliveries of a run on
    # this node and tells the controller once it has them all.

    @key {__MODULE__, :round}

    # Starts `start` (which returns `:ok`) in a process that stays, and returns once it
    # ran: what it starts and links outlives the caller (an :erpc call's own process exits
    # with a reason that would take linked processes along). Then the counter, reporting
    # to `controller`.
    def init(controller, start \\ fn -> :ok end) do
      parent = self()

      spawn(fn ->
        send(parent, {:started, start.()})
        receive do: (:never -> :ok)
      end)

      receive do: ({:started, result} -> :ok = result)
      :persistent_term.put(@key, {:atomics.new(1, signed: false), 0, controller})
    end

    # The next `target` deliveries on this node complete a run.
    def arm(target) do
      {counter, _, controller} = :persistent_term.get(@key)
      :atomics.put(counter, 1, 0)
      :persistent_term.put(@key, {counter, target, controller})
    end

    # `{deliveries so far, target}`.
    def progress do
      {counter, target, _} = :persistent_term.get(@key)
      {:atomics.get(counter, 1), target}
    end

    # Counts one delivery; the last of the run sends `{:done, node, tag, os_time_us}` to
    # the controller.
    def delivered(tag) do
      {counter, target, controller} = :persistent_term.get(@key)

      if :atomics.add_get(counter, 1, 1) == target,
        do: send(controller, {:done, node(), tag, System.os_time(:microsecond)})

      :ok
    end
  end

:persistent_term.put({Bench.Peers, Bench.Peers.Round}, round_code)

defmodule Bench.Peers do
  @moduledoc false
  # Distribution and `:peer` nodes on 127.0.0.1 for the cluster benchmarks
  # (bench/cluster.exs, bench/cluster_scale.exs). A script loads it with
  # `Code.require_file("support/peers.ex", __DIR__)`.

  # Makes this VM a node named `prefix_N@127.0.0.1` (long names), starting `epmd` when
  # none runs. `hidden: true` keeps it out of the peers' view (`:erlang.nodes/0`,
  # `:net_kernel.monitor_nodes/1`, `global`'s mesh): a controller that drives a cluster
  # without being one of its nodes.
  def start_distribution(prefix, opts \\ []) do
    :ok = :application.set_env(:kernel, :prevent_overlapping_partitions, false)

    case System.cmd("epmd", ["-names"], stderr_to_stdout: true) do
      {_, 0} -> :ok
      _ -> {_, 0} = System.cmd("epmd", ["-daemon"])
    end

    name = :"#{prefix}_#{System.unique_integer([:positive])}@127.0.0.1"
    options = %{name_domain: :longnames, hidden: Keyword.get(opts, :hidden, false)}
    {:ok, _} = :net_kernel.start(name, options)
    :ok
  end

  # Starts a peer named `name_N` on 127.0.0.1 with this VM's code path and cookie and the
  # emulator flags `vm_args` (charlists), sets `config :ex_atlas, :fly` to `fly` there and
  # starts `:ex_atlas`; loads `Bench.Peers.Round` there. Returns the node.
  def start(name, fly, vm_args \\ []) do
    paths = Enum.flat_map(:code.get_path(), &[~c"-pa", &1])

    args =
      [~c"-setcookie", Atom.to_charlist(Node.get_cookie())] ++
        [~c"-kernel", ~c"prevent_overlapping_partitions", ~c"false"] ++ vm_args ++ paths

    {:ok, _peer, node} =
      :peer.start_link(%{
        name: :"#{name}_#{System.unique_integer([:positive])}",
        host: ~c"127.0.0.1",
        longnames: true,
        args: args
      })

    :ok = :erpc.call(node, Application, :put_env, [:ex_atlas, :fly, fly])
    {:ok, _} = :erpc.call(node, Application, :ensure_all_started, [:ex_atlas])
    round = :persistent_term.get({__MODULE__, Bench.Peers.Round})
    :ok = load([node], Bench.Peers.Round, round)
    node
  end

  # Loads the module `module` (its object code `binary`, from `defmodule`) on `nodes`.
  def load(nodes, module, binary) do
    for node <- nodes,
        do: {:module, _} = :erpc.call(node, :code, :load_binary, [module, ~c"nofile", binary])

    :ok
  end
end
