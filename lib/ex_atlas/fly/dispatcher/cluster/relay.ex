defmodule ExAtlas.Fly.Dispatcher.Cluster.Relay do
  @moduledoc false
  # This node's end of cluster mode, one process per node:
  #
  #   * interest: it is a member of the `:pg` group of every topic with a local
  #     subscriber, in our own scope, so other nodes know where to send. The NIF tells
  #     it about topics created or emptied on this node (`{:"$ex_atlas_interest", topic}`,
  #     a hint it checks against `count/2`), and it reads every topic when it starts;
  #   * receiving: dispatches from other nodes' links arrive in order per sender and go
  #     through the local fan-out (`Backend.Registry.dispatch_local/2`, with its bounds
  #     and the local watchdog), then are acknowledged in batches, which opens the
  #     sending link's window again;
  #   * sending: it starts one `Link` per connected node (`:net_kernel.monitor_nodes/1`)
  #     and publishes them in an ETS table for callers of dispatch/2.

  use GenServer

  require Logger

  alias ExAtlas.Fly.Dispatcher.{Cluster, Native, Server}
  alias ExAtlas.Fly.Dispatcher.Backend.Registry, as: RegistryBackend
  alias ExAtlas.Fly.Dispatcher.Cluster.Link

  # Acknowledge after this many dispatches from one link (the window is 256), or after
  # @ack_ms: acknowledgements are needed only to open the window again, so under light
  # load they cost about two messages a second per node, not one per dispatch.
  @ack_every 64
  @ack_ms 500

  @spec start_link(keyword()) :: GenServer.on_start()
  def start_link(opts), do: GenServer.start_link(__MODULE__, opts, name: __MODULE__)

  @doc "The link to `node`, started now if the node is connected but has none yet."
  @spec ensure_link(node()) :: Link.handle() | nil
  def ensure_link(node) do
    GenServer.call(__MODULE__, {:ensure_link, node})
  catch
    :exit, _ -> nil
  end

  @impl true
  def init(opts) do
    Process.flag(:trap_exit, true)
    bound = Keyword.fetch!(opts, :cluster_queue)
    dispatcher = Server.lookup() || raise ArgumentError, "no registry runs"
    :ets.new(Cluster.links_table(), [:named_table, :protected, read_concurrency: true])
    :ok = :net_kernel.monitor_nodes(true)

    state = %{
      dispatcher: dispatcher,
      bound: bound,
      joined: MapSet.new(),
      links: %{},
      acks: %{},
      received: 0,
      acks_sent: 0
    }

    state = Enum.reduce(Node.list(), state, &start_link_to(&2, &1))
    :ok = Native.set_relay(dispatcher, self())
    state = Enum.reduce(Native.topics(dispatcher), state, &reconcile(&2, &1))
    Cluster.enable(bound)
    {:ok, state}
  end

  @impl true
  def handle_call(:counts, _from, state),
    do: {:reply, %{received: state.received, acks: state.acks_sent}, state}

  def handle_call({:ensure_link, node}, _from, state) do
    state = if node in Node.list(), do: start_link_to(state, node), else: state

    case state.links do
      %{^node => handle} -> {:reply, handle, state}
      _ -> {:reply, nil, state}
    end
  end

  @impl true
  def handle_info({:"$ex_atlas_remote", link, topic, message}, state) do
    try do
      RegistryBackend.dispatch_local(topic, message)
    rescue
      # The local registry is closing; the sender counts nothing lost here.
      ArgumentError -> :ok
    end

    {:noreply, count_ack(%{state | received: state.received + 1}, link)}
  end

  def handle_info({:"$ex_atlas_interest", topic}, state), do: {:noreply, reconcile(state, topic)}

  def handle_info({:"$ex_atlas_sync", from, ref}, state) do
    # Everything this relay dispatched before is delivered once this returns.
    _ = RegistryBackend.sync(nil)
    send(from, {:"$ex_atlas_cluster_synced", ref, node()})
    {:noreply, state}
  end

  def handle_info(:ack, state), do: {:noreply, flush_acks(state)}

  def handle_info({:nodeup, node}, state), do: {:noreply, start_link_to(state, node)}

  def handle_info({:nodedown, node}, state) do
    case state.links do
      %{^node => {pid, _counts}} ->
        :ets.delete(Cluster.links_table(), node)
        Process.unlink(pid)
        Process.exit(pid, :shutdown)
        {:noreply, %{state | links: Map.delete(state.links, node)}}

      _ ->
        {:noreply, state}
    end
  end

  def handle_info({:EXIT, pid, reason}, state) do
    case Enum.find(state.links, fn {_node, {link, _}} -> link == pid end) do
      {node, _} ->
        Logger.warning(
          "[ExAtlas.Fly.Dispatcher] the link to #{inspect(node)} exited (#{inspect(reason)})",
          node: node
        )

        :ets.delete(Cluster.links_table(), node)
        state = %{state | links: Map.delete(state.links, node)}
        {:noreply, if(node in Node.list(), do: start_link_to(state, node), else: state)}

      nil ->
        {:noreply, state}
    end
  end

  def handle_info(_other, state), do: {:noreply, state}

  @impl true
  def terminate(_reason, state) do
    Cluster.disable()

    if Server.lookup() == state.dispatcher do
      Native.set_relay(state.dispatcher, :undefined)
    end
  end

  defp start_link_to(%{links: links} = state, node) when is_map_key(links, node), do: state

  defp start_link_to(state, node) do
    {:ok, pid} = Link.start_link({node, state.bound})
    handle = {pid, GenServer.call(pid, :counts)}
    :ets.insert(Cluster.links_table(), {node, handle})
    %{state | links: Map.put(state.links, node, handle)}
  end

  # Joins or leaves the topic's group as the local registry says now, whatever order the
  # hints came in.
  defp reconcile(state, topic) do
    wanted = Native.count(state.dispatcher, topic) > 0
    joined = MapSet.member?(state.joined, topic)

    cond do
      wanted and not joined ->
        :ok = :pg.join(Cluster.scope(), topic, self())
        %{state | joined: MapSet.put(state.joined, topic)}

      joined and not wanted ->
        :ok = :pg.leave(Cluster.scope(), topic, self())
        %{state | joined: MapSet.delete(state.joined, topic)}

      true ->
        state
    end
  end

  defp count_ack(state, link) do
    n = Map.get(state.acks, link, 0) + 1

    cond do
      n >= @ack_every ->
        send(link, {:"$ex_atlas_ack", self(), n})
        %{state | acks: Map.delete(state.acks, link), acks_sent: state.acks_sent + 1}

      map_size(state.acks) == 0 ->
        Process.send_after(self(), :ack, @ack_ms)
        %{state | acks: %{link => n}}

      true ->
        %{state | acks: Map.put(state.acks, link, n)}
    end
  end

  defp flush_acks(state) do
    Enum.each(state.acks, fn {link, n} -> send(link, {:"$ex_atlas_ack", self(), n}) end)
    %{state | acks: %{}, acks_sent: state.acks_sent + map_size(state.acks)}
  end
end
