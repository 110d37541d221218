defmodule ExAtlas.Fly.Dispatcher.Cluster.Relay do
  @moduledoc false
  # This node's end of cluster mode, one process per node:
  #
  #   * interest: it is a member of the `:pg` group of every topic with a local
  #     subscriber, in our own scope, so other nodes know where to send. The NIF tells
  #     it about topics created or emptied on this node (`{:"$ex_atlas_interest", topic}`,
  #     a hint it checks against `wanted/2`), and it reads every topic when it starts;
  #   * receiving: dispatches from other nodes' links arrive in order per sender and go
  #     through the local fan-out (`Backend.Registry.dispatch_local/2`, with its bounds
  #     and the local watchdog). It counts them per sending node (over that node's
  #     links, so a link that takes a dead one's place settles what that one sent) in an
  #     ETS table that outlives it, and counts one only once it is in the local lanes (a
  #     relay killed mid-dispatch has it counted as dropped by the sender). It
  #     acknowledges in batches with that count, which opens the link's window again and
  #     tells a link that greets it after a cut or a restart (`hello`) what arrived;
  #   * links: it starts one `Link` per connected node (`:net_kernel.monitor_nodes/1`),
  #     under cluster mode's link supervisor, watches them (a link that dies with no
  #     successor, as its supervisor stops, gets one from here), and reaps a node's link
  #     once the node has been away for twice the link's hold time.
  #
  # Everything it sends to other nodes (acknowledgements, answers to greetings, pings
  # and syncs) goes with `:nosuspend`: a busy distribution buffer to one node must not
  # stop this process, which every other node's traffic goes through. What does not go
  # out waits in an outbox, in order per node, and is tried again shortly; what is for a
  # node no longer connected is dropped (its link greets us again when it is back).

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
  @retry_ms 5

  @spec start_link(keyword()) :: GenServer.on_start()
  def start_link(opts), do: GenServer.start_link(__MODULE__, opts, name: __MODULE__)

  @impl true
  def init(opts) do
    Process.flag(:trap_exit, true)
    bound = Keyword.fetch!(opts, :cluster_queue)
    dispatcher = Server.lookup() || raise ArgumentError, "no registry runs"
    :ok = :net_kernel.monitor_nodes(true)

    state = %{
      dispatcher: dispatcher,
      # The scope it joins groups in: started just before it.
      scope: Process.whereis(Cluster.scope()),
      bound: bound,
      joined: MapSet.new(),
      acks: %{},
      # The links it watches: pid => node.
      links: %{},
      ack_timer: nil,
      outbox: :queue.new(),
      retry: nil,
      received: 0,
      acks_sent: 0
    }

    # Links outlive a restart of this process: start the missing ones, and reap later
    # those whose node is away.
    connected = Node.list()
    state = Enum.reduce(connected, state, &start_link_to(&2, &1))

    for {node, _} <- :ets.tab2list(Cluster.links_table()),
        node not in connected,
        do: schedule_reap(node)

    :ok = Native.set_relay(dispatcher, self())
    state = Enum.reduce(Native.topics(dispatcher), state, &reconcile(&2, &1))
    {:ok, state}
  end

  @impl true
  def handle_call(:counts, _from, state),
    do: {:reply, %{received: state.received, acks: state.acks_sent}, state}

  @impl true
  def handle_info({:"$ex_atlas_remote", link, topic, message}, state) do
    try do
      RegistryBackend.dispatch_local(topic, message)
    rescue
      # The local registry is closing; the sender counts nothing lost here.
      ArgumentError -> :ok
    end

    _ = :ets.update_counter(Cluster.seen_table(), node(link), 1, {node(link), 0})
    {:noreply, count_ack(%{state | received: state.received + 1}, link)}
  end

  def handle_info({:"$ex_atlas_interest", topic}, state), do: {:noreply, reconcile(state, topic)}

  def handle_info({:"$ex_atlas_sync", reply_to, ref}, state) do
    # Everything this relay dispatched before is delivered once this returns.
    _ = RegistryBackend.sync(nil)
    {:noreply, deliver(state, reply_to, {Cluster.synced_tag(), ref, node()})}
  end

  def handle_info({:"$ex_atlas_hello", link, ref}, state) do
    # Everything the link sent before it greeted us came before this: the count is final.
    state = flush_ack(state, link)
    tag = welcome_tag(ref)
    welcome = {:"$ex_atlas_welcome", tag, self(), seen(link), MapSet.to_list(state.joined)}
    {:noreply, deliver(state, link, welcome)}
  end

  # A pong tells the link that this relay's leaves before the ping were its own. Not when
  # its scope died: the other nodes then saw it leave every group, and it stops shortly
  # (restarted with a new scope); the link's monitor tells it so.
  def handle_info({:"$ex_atlas_ping", link, ref}, state) do
    if Process.whereis(Cluster.scope()) == state.scope,
      do: {:noreply, deliver(state, link, {:"$ex_atlas_pong", ref})},
      else: {:noreply, state}
  end

  def handle_info(:ack, state), do: {:noreply, flush_acks(%{state | ack_timer: nil})}

  def handle_info(:retry, state), do: {:noreply, flush_outbox(%{state | retry: nil})}

  def handle_info({:nodeup, node}, state), do: {:noreply, start_link_to(state, node)}

  def handle_info({:nodedown, node}, state) do
    schedule_reap(node)
    {:noreply, state}
  end

  def handle_info({:reap, node}, state) do
    if node not in Node.list(), do: reap(node)
    {:noreply, state}
  end

  def handle_info({:DOWN, _ref, :process, pid, _reason}, %{links: links} = state)
      when is_map_key(links, pid) do
    {node, links} = Map.pop(links, pid)
    state = %{state | links: links}
    if node in Node.list(), do: {:noreply, start_link_to(state, node)}, else: {:noreply, state}
  end

  def handle_info(_other, state), do: {:noreply, state}

  # Stops the link of `node`, which stayed away (a dead one's row is settled here).
  defp reap(node) do
    with [{^node, {pid, _counts}}] <- :ets.lookup(Cluster.links_table(), node),
         false <- Link.retire(node) do
      send(pid, :reap)
    end

    # The count of that node's links: they will not greet us again.
    :ets.delete(Cluster.seen_table(), node)
    :ok
  end

  defp schedule_reap(node), do: Process.send_after(self(), {:reap, node}, 2 * Link.hold_ms())

  # Starts the link of `node` unless one runs, and watches it: a link that dies with no
  # successor (it was stopping with its supervisor when this started) gets one here.
  defp start_link_to(state, node) do
    unless linked?(node) do
      case DynamicSupervisor.start_child(Cluster.link_supervisor(), {Link, {node, state.bound}}) do
        {:ok, _pid} ->
          :ok

        :ignore ->
          :ok

        other ->
          Logger.error(
            "[ExAtlas.Fly.Dispatcher] could not start the link to #{inspect(node)}: " <>
              inspect(other),
            node: node
          )
      end
    end

    watch_link(state, node)
  end

  defp watch_link(state, node) do
    case :ets.lookup(Cluster.links_table(), node) do
      [{^node, {pid, _counts}}] when not is_map_key(state.links, pid) ->
        _ = Process.monitor(pid)
        %{state | links: Map.put(state.links, pid, node)}

      _ ->
        state
    end
  end

  # A link of protocol 2 or later greets with its version, and is answered with this
  # relay's; one of protocol 1 with a plain reference, which it ignores in the answer.
  defp welcome_tag({:ex_atlas_link, _version, ref}), do: {:ex_atlas_relay, Link.protocol(), ref}
  defp welcome_tag(ref), do: ref

  # A link runs for `node`. A dead link's row waits for its successor: the link
  # supervisor's restart, or this one when that supervisor restarted empty.
  defp linked?(node) do
    case :ets.lookup(Cluster.links_table(), node) do
      [{^node, {pid, _counts}}] -> Process.alive?(pid)
      [] -> false
    end
  end

  # Joins or leaves the topic's group as the local registry says now, whatever order the
  # hints came in.
  defp reconcile(state, topic) do
    wanted = Native.wanted(state.dispatcher, topic)
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

  # The dispatches received from the links of `link`'s node, this one and those before
  # it: a link that takes a dead one's place settles what that one sent on it.
  defp seen(link) do
    node = node(link)

    case :ets.lookup(Cluster.seen_table(), node) do
      [{^node, n}] -> n
      [] -> 0
    end
  end

  ## Acknowledgements

  defp count_ack(state, link) do
    n = Map.get(state.acks, link, 0) + 1

    cond do
      n >= @ack_every ->
        flush_ack(state, link)

      state.ack_timer == nil ->
        %{state | acks: Map.put(state.acks, link, n), ack_timer: ack_timer()}

      true ->
        %{state | acks: Map.put(state.acks, link, n)}
    end
  end

  defp ack_timer, do: Process.send_after(self(), :ack, @ack_ms)

  defp flush_acks(state), do: Enum.reduce(Map.keys(state.acks), state, &flush_ack(&2, &1))

  # An acknowledgement carries the count so far: a later one covers an earlier one.
  defp flush_ack(state, link) do
    if Map.has_key?(state.acks, link) do
      state = %{state | acks: Map.delete(state.acks, link), acks_sent: state.acks_sent + 1}
      deliver(state, link, {:"$ex_atlas_ack", self(), seen(link)})
    else
      state
    end
  end

  ## Sending to other nodes without ever being suspended

  defp deliver(state, to, message) do
    if blocked?(state.outbox, node(to)) do
      %{state | outbox: :queue.in({to, message}, state.outbox)}
    else
      case :erlang.send(to, message, [:nosuspend, :noconnect]) do
        :ok -> state
        :noconnect -> state
        :nosuspend -> retry(%{state | outbox: :queue.in({to, message}, state.outbox)})
      end
    end
  end

  defp blocked?(outbox, node),
    do: Enum.any?(:queue.to_list(outbox), fn {to, _} -> node(to) == node end)

  # Tries the outbox in order; a node whose buffer is still busy keeps its messages, in
  # order, and holds up no other node's.
  defp flush_outbox(state) do
    {kept, _busy} =
      Enum.reduce(:queue.to_list(state.outbox), {[], MapSet.new()}, fn {to, message} = out,
                                                                       {kept, busy} ->
        cond do
          MapSet.member?(busy, node(to)) ->
            {[out | kept], busy}

          :erlang.send(to, message, [:nosuspend, :noconnect]) == :nosuspend ->
            {[out | kept], MapSet.put(busy, node(to))}

          true ->
            {kept, busy}
        end
      end)

    state = %{state | outbox: kept |> Enum.reverse() |> :queue.from_list()}
    if :queue.is_empty(state.outbox), do: state, else: retry(state)
  end

  defp retry(%{retry: nil} = state),
    do: %{state | retry: Process.send_after(self(), :retry, @retry_ms)}

  defp retry(state), do: state
end
