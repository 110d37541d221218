defmodule ExAtlas.Fly.Dispatcher.Cluster do
  @moduledoc false
  # Cluster mode (`config :ex_atlas, :fly, cluster: true`): every node keeps its own NIF
  # registry, and a dispatch goes, once, to each other node that has subscribers to the
  # topic, whose relay runs it through its own local fan-out.
  #
  # Built on what OTP has: distributed Erlang (connecting the nodes is the host's
  # business: dns_cluster, libcluster, ...) and `:pg`, in a scope of our own, where each
  # node's relay is a member of the group of every topic it has local subscribers to.
  # No membership protocol of our own.
  #
  # This module is the supervisor of the `:pg` scope and the relay (`:rest_for_one`: a
  # new scope needs a relay that joins again), and the functions callers use. Nothing of
  # it runs unless cluster mode is on: a dispatch calls `forward/2` only when the NIF
  # answers `:forward` (a relay is set) or after it waited for room, and `forward/2` is
  # then one :persistent_term read.

  use Supervisor

  alias ExAtlas.Fly.Dispatcher.Backend.Registry, as: RegistryBackend
  alias ExAtlas.Fly.Dispatcher.Cluster.{Link, Relay}

  @scope ExAtlas.Fly.Dispatcher.PG
  @links ExAtlas.Fly.Dispatcher.Cluster.Links
  @bound_key {__MODULE__, :bound}

  @spec start_link(keyword()) :: Supervisor.on_start()
  def start_link(opts), do: Supervisor.start_link(__MODULE__, opts, name: __MODULE__)

  @impl true
  def init(opts) do
    children = [
      %{id: :pg, start: {:pg, :start_link, [@scope]}},
      {Relay, opts}
    ]

    Supervisor.init(children, strategy: :rest_for_one)
  end

  @doc "The `:pg` scope of cluster mode."
  @spec scope() :: atom()
  def scope, do: @scope

  @doc false
  @spec links_table() :: atom()
  def links_table, do: @links

  @doc false
  @spec enable(pos_integer()) :: :ok
  def enable(bound) do
    if :persistent_term.get(@bound_key, nil) != bound, do: :persistent_term.put(@bound_key, bound)
    :ok
  end

  @doc false
  @spec disable() :: :ok
  def disable do
    :persistent_term.erase(@bound_key)
    :ok
  end

  @doc """
  Sends `message` for `topic` once to each other node whose relay is in the topic's
  group, through that node's link. Never blocks: a node whose queue is full has the
  dispatch dropped (counted, logged by its link).
  """
  @spec forward(binary(), term()) :: :ok
  def forward(topic, message) do
    case :persistent_term.get(@bound_key, nil) do
      nil -> :ok
      bound -> forward(members(topic), bound, topic, message)
    end
  end

  defp forward([], _bound, _topic, _message), do: :ok

  defp forward([relay | rest], bound, topic, message) do
    if node(relay) != node() do
      case link(node(relay)) do
        nil -> :ok
        handle -> Link.push(handle, bound, relay, topic, message)
      end
    end

    forward(rest, bound, topic, message)
  end

  defp members(topic) do
    :pg.get_members(@scope, topic)
  rescue
    # The scope is being restarted.
    ArgumentError -> []
  end

  defp link(node) do
    case :ets.lookup(@links, node) do
      [{^node, handle}] -> handle
      [] -> Relay.ensure_link(node)
    end
  rescue
    ArgumentError -> nil
  end

  @doc """
  Returns once everything the caller dispatched before is in its subscribers' mailboxes
  on this node and on every other connected node, or `{:error, {:no_answer, nodes}}`
  when some nodes did not answer within `timeout` ms.
  """
  @spec sync(timeout()) :: :ok | {:error, {:no_answer, [node()]}}
  def sync(timeout) do
    :ok = RegistryBackend.sync(nil)

    waits =
      for {node, handle} <- links(), into: %{} do
        ref = make_ref()
        :ok = Link.push_sync(handle, {Relay, node}, self(), ref)
        {ref, node}
      end

    deadline = System.monotonic_time(:millisecond) + timeout
    await_synced(waits, deadline)
  end

  defp await_synced(waits, _deadline) when map_size(waits) == 0, do: :ok

  defp await_synced(waits, deadline) do
    left = max(deadline - System.monotonic_time(:millisecond), 0)

    receive do
      {:"$ex_atlas_cluster_synced", ref, _node} when is_map_key(waits, ref) ->
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

  @doc "Per connected node: messages queued for it (sent and unacknowledged included) and dropped."
  @spec stats() :: %{node() => %{queued: non_neg_integer(), dropped: non_neg_integer()}}
  def stats, do: Map.new(links(), fn {node, handle} -> {node, Link.counts(handle)} end)
end
