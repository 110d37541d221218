defmodule ExAtlas.Fly.Dispatcher.Cluster do
  @moduledoc false
  # Cluster mode (`config :ex_atlas, :fly, cluster: true`): every node keeps its own NIF
  # registry, and a dispatch goes, once, to each other node that has subscribers to the
  # topic, whose relay runs it through its own local fan-out.
  #
  # With replay on (`replay: k`, k > 0, on this node) a dispatch goes, once, to every other
  # node that runs cluster mode, subscribers or not: its relay's local dispatch records it
  # in that node's history, so a subscriber there is replayed what was dispatched on any
  # node. Every node of the cluster should then keep a history (the same `replay`): a node
  # with replay off forwards only to the nodes with subscribers.
  #
  # Built on what OTP has: distributed Erlang (connecting the nodes is the host's
  # business: dns_cluster, libcluster, ...) and `:pg`, in a scope of our own, where each
  # node's relay is a member of the group of every topic it has local subscribers to.
  # No membership protocol of our own.
  #
  # This module is what callers use: forward/2 (the dispatch path), sync/1, stats/0, and
  # the names of cluster mode's scope and tables. `Cluster.Supervisor` runs cluster mode;
  # the tables belong to the dispatcher's supervisor above it, and outlive it:
  #
  #   * @links, `{node, handle}`: the link of each node and its counts, written by the
  #     link itself. A dead link's row stays until the link that takes its place (or the
  #     relay, reaping the node) settles what it held (`Link`);
  #   * @interest, a bag of `{topic, node}`: the topics each node's link forwards, that
  #     is, the node's `:pg` groups as the link learnt them, plus the groups it held
  #     when it went away (until it is back and `:pg` has caught up, or `Link`'s hold
  #     time ran out); written by the links;
  #   * @seen, `{node, count}`: per other node, the dispatches this node's relay has
  #     received from its links (from the one that runs and those before it), so that a
  #     restarted relay answers a link exactly, and a link that takes a dead one's place
  #     settles what that one sent;
  #   * @unlinked, `{node, count}`: dispatches for a node that `:pg` shows with interest
  #     (or, with replay on, a node of @peers) but that has no link yet (the relay has
  #     not started it): counted as dropped here, and taken over by the node's link,
  #     which reports them, once it runs;
  #   * @peers, `{node}`: the nodes that run cluster mode, those whose relay has welcomed
  #     their link once (other connected nodes, a remote shell say, have a link that
  #     gets nothing), written by the links, kept while the node is away until its link
  #     is reaped; a connected node whose relay is gone for the link's hold time leaves
  #     it. With replay on, `forward/2` sends to all of them.
  #
  # Nothing of it runs unless cluster mode is on: a dispatch calls `forward/2` only when
  # the NIF answers `:forward` (a relay is set: then for every dispatch) or after it
  # waited for room, and `forward/2` is then a :persistent_term read and one ETS lookup
  # per interested node (with replay on: a read of @peers, and one lookup per node of
  # it). It never calls or waits for a process.

  alias ExAtlas.Fly.Dispatcher.Backend.Registry, as: RegistryBackend
  alias ExAtlas.Fly.Dispatcher.Cluster.{Link, Relay}
  alias ExAtlas.Fly.Dispatcher.ReplyAlias

  @scope ExAtlas.Fly.Dispatcher.PG
  @links ExAtlas.Fly.Dispatcher.Cluster.Links
  @interest ExAtlas.Fly.Dispatcher.Cluster.Interest
  @seen ExAtlas.Fly.Dispatcher.Cluster.Seen
  @unlinked ExAtlas.Fly.Dispatcher.Cluster.Unlinked
  @peers ExAtlas.Fly.Dispatcher.Cluster.Peers
  @link_sup ExAtlas.Fly.Dispatcher.Cluster.LinkSupervisor
  @bound_key {__MODULE__, :bound}
  @synced :"$ex_atlas_cluster_synced"

  @doc "The `:pg` scope of cluster mode."
  @spec scope() :: atom()
  def scope, do: @scope

  @doc """
  Creates the tables of cluster mode (see the moduledoc), owned by the caller: the
  dispatcher's supervisor, so that they outlive every process of cluster mode.
  """
  @spec create_tables() :: :ok
  def create_tables do
    for table <- [@links, @seen, @unlinked, @peers],
        do: ^table = :ets.new(table, [:named_table, :public, read_concurrency: true])

    @interest = :ets.new(@interest, [:named_table, :public, :bag, read_concurrency: true])
    :ok
  end

  @doc false
  @spec links_table() :: atom()
  def links_table, do: @links

  @doc false
  @spec interest_table() :: atom()
  def interest_table, do: @interest

  @doc false
  @spec seen_table() :: atom()
  def seen_table, do: @seen

  @doc false
  @spec unlinked_table() :: atom()
  def unlinked_table, do: @unlinked

  @doc false
  @spec peers_table() :: atom()
  def peers_table, do: @peers

  @doc """
  The other nodes known to run cluster mode (their relay welcomed this node's link), away
  ones included until their link is reaped.
  """
  @spec peers() :: [node()]
  def peers do
    for {node} <- :ets.tab2list(@peers), do: node
  rescue
    ArgumentError -> []
  end

  @doc false
  @spec link_supervisor() :: atom()
  def link_supervisor, do: @link_sup

  @doc false
  @spec synced_tag() :: atom()
  def synced_tag, do: @synced

  @doc """
  Turns forwarding on, with `bound` messages queued per node at most; with `replay?` to
  every node that runs cluster mode, else to the nodes with interest in the topic.
  """
  @spec enable(pos_integer(), boolean()) :: :ok
  def enable(bound, replay?) when is_integer(bound) and bound > 0 and is_boolean(replay?) do
    # A :persistent_term write is a global GC: done only when the value changes.
    if :persistent_term.get(@bound_key, nil) != {bound, replay?},
      do: :persistent_term.put(@bound_key, {bound, replay?})

    :ok
  end

  @doc false
  @spec disable() :: :ok
  def disable do
    :persistent_term.erase(@bound_key)
    :ok
  end

  @doc """
  Hands `message` for `topic` once to the link of each other node that has interest in
  the topic, or, with replay on, of each other node that runs cluster mode (see the
  moduledoc). Never blocks, never calls a process: a node whose queue is full has the
  dispatch dropped (counted, logged by its link).
  """
  @spec forward(binary(), term()) :: :ok
  def forward(topic, message) do
    case :persistent_term.get(@bound_key, nil) do
      nil -> :ok
      {bound, false} -> forward(interested(topic), bound, topic, message)
      {bound, true} -> forward(everyone(topic), bound, topic, message)
    end
  end

  defp forward([], _bound, _topic, _message), do: :ok

  defp forward([node | rest], bound, topic, message) do
    # `:dropped` at the node's bound: counted by the link (reported there).
    _ =
      case :ets.lookup(@links, node) do
        [{^node, handle}] -> Link.push(handle, bound, topic, message)
        # `:pg` shows the node's interest before its link runs: counted, never skipped.
        [] -> :ets.update_counter(@unlinked, node, 1, {node, 0})
      end

    forward(rest, bound, topic, message)
  end

  # The nodes with interest in `topic`: those whose link forwards it (the node's groups
  # as the link learnt them, departed ones included), and those `:pg` shows in the
  # topic's group before their link has learnt it or before their link runs.
  defp interested(topic) do
    linked = for {_topic, node} <- :ets.lookup(@interest, topic), do: node
    here = node()

    # `:pg.get_members/2` answers [] while the scope restarts: the links' rows hold the
    # nodes' interest meanwhile.
    seen =
      for pid <- :pg.get_members(@scope, topic),
          (remote = node(pid)) != here,
          remote not in linked,
          uniq: true,
          do: remote

    linked ++ seen
  rescue
    # Cluster mode is stopping.
    ArgumentError -> []
  end

  # With replay on: the nodes with interest in `topic` as above (so that none of them is
  # skipped while it is not in @peers yet), and every node that runs cluster mode.
  defp everyone(topic) do
    interested = interested(topic)
    peers = for {node} <- :ets.tab2list(@peers), node not in interested, do: node
    interested ++ peers
  rescue
    # Cluster mode is stopping.
    ArgumentError -> []
  end

  @doc false
  @spec take_unlinked(node()) :: non_neg_integer()
  def take_unlinked(node) do
    case :ets.take(@unlinked, node) do
      [{^node, count}] -> count
      [] -> 0
    end
  rescue
    ArgumentError -> 0
  end

  @doc """
  Returns once everything the caller dispatched before is in its subscribers' mailboxes
  on this node and on every other connected node, or `{:error, {:no_answer, nodes}}`
  when some nodes did not answer within `timeout` ms. The replies come to a process
  alias that is gone when this returns: none reaches the caller later.
  """
  @spec sync(non_neg_integer()) :: :ok | {:error, {:no_answer, [node()]}}
  def sync(timeout) do
    :ok = RegistryBackend.sync(nil)
    connected = Node.list()

    ReplyAlias.within(@synced, fn reply_to ->
      waits =
        for {node, handle} <- links(), node in connected, into: %{} do
          ref = make_ref()
          :ok = Link.push_sync(handle, reply_to, ref)
          {ref, node}
        end

      await_synced(waits, System.monotonic_time(:millisecond) + timeout)
    end)
  end

  defp await_synced(waits, _deadline) when map_size(waits) == 0, do: :ok

  defp await_synced(waits, deadline) do
    left = max(deadline - System.monotonic_time(:millisecond), 0)

    receive do
      {@synced, ref, _node} when is_map_key(waits, ref) ->
        await_synced(Map.delete(waits, ref), deadline)
    after
      left -> {:error, {:no_answer, waits |> Map.values() |> Enum.sort()}}
    end
  end

  defp links do
    :ets.tab2list(@links)
  rescue
    ArgumentError -> []
  end

  @doc """
  What this node's relay has done since it started: dispatches `received` from other
  nodes and acknowledgements (`acks`) sent back for them.
  """
  @spec relay_counts() :: %{received: non_neg_integer(), acks: non_neg_integer()}
  def relay_counts, do: GenServer.call(Relay, :counts)

  @doc """
  Per node with a link (connected, or gone for less than the hold time): messages
  queued for it (sent and unacknowledged included) and dropped for it.
  """
  @spec stats() :: %{node() => %{queued: non_neg_integer(), dropped: non_neg_integer()}}
  def stats do
    linked = Map.new(links(), fn {node, handle} -> {node, Link.counts(handle)} end)

    Enum.reduce(unlinked(), linked, fn {node, count}, acc ->
      Map.update(acc, node, %{queued: 0, dropped: count}, &%{&1 | dropped: &1.dropped + count})
    end)
  end

  defp unlinked do
    :ets.tab2list(@unlinked)
  rescue
    ArgumentError -> []
  end
end
