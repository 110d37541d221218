defmodule ExAtlas.Fly.Dispatcher.Cluster.Watch do
  @moduledoc false
  # This node's one watch of cluster mode's `:pg` scope (`:pg.monitor_scope/1`), for the
  # links. Each link follows the members of its own node only: a join or a leave anywhere
  # in the cluster costs one notification here and one message to the link of the
  # member's node, where a watch per link cost one notification to every link (N - 1 on
  # each of N nodes, so N (N - 1) in the cluster per change).
  #
  # A link follows by sending `{:follow, node, link, ref}` (`ref`: its monitor of this
  # process). It gets `{ref, :groups, groups}`, the groups its node's members are in now,
  # as `:pg.monitor_scope/1` would have given it, and from then on `{ref, :join, group,
  # pids}` and `{ref, :leave, group, pids}` with its node's pids only, in the scope's
  # order. A later follow for the same node (a link that took a dead one's place) takes
  # over. Nobody waits for this process: a link that finds it missing, or sees it die
  # (it is started after the scope under cluster mode's `:rest_for_one` supervisor, so a
  # new scope brings a new watch), follows again shortly and keeps the interest it has
  # meanwhile, as it did when it watched the scope itself.

  use GenServer

  alias ExAtlas.Fly.Dispatcher.Cluster

  @spec start_link(term()) :: GenServer.on_start()
  def start_link(_arg), do: GenServer.start_link(__MODULE__, [], name: __MODULE__)

  @impl true
  def init([]) do
    {ref, groups} = :pg.monitor_scope(Cluster.scope())
    {:ok, %{scope: ref, members: Map.new(groups), followers: %{}}}
  end

  @impl true
  def handle_info({:follow, node, link, ref}, state) do
    state = unfollow(state, node)
    monitor = Process.monitor(link)
    groups = for {group, pids} <- state.members, Enum.any?(pids, &(node(&1) == node)), do: group
    send(link, {ref, :groups, groups})
    {:noreply, put_in(state.followers[node], {link, ref, monitor})}
  end

  def handle_info({ref, :join, group, pids}, %{scope: ref} = state) do
    state = update_in(state.members, &Map.update(&1, group, pids, fn had -> pids ++ had end))
    {:noreply, tell(state, :join, group, pids)}
  end

  def handle_info({ref, :leave, group, pids}, %{scope: ref} = state) do
    members =
      case Map.get(state.members, group, []) -- pids do
        [] -> Map.delete(state.members, group)
        left -> Map.put(state.members, group, left)
      end

    {:noreply, tell(%{state | members: members}, :leave, group, pids)}
  end

  # A link gone (its successor follows again).
  def handle_info({:DOWN, monitor, :process, _link, _reason}, state) do
    followers =
      :maps.filter(fn _node, {_, _, followed} -> followed != monitor end, state.followers)

    {:noreply, %{state | followers: followers}}
  end

  def handle_info(_other, state), do: {:noreply, state}

  # Hands each follower the pids of its node among `pids`.
  defp tell(state, event, group, pids) do
    pids
    |> Enum.group_by(&node/1)
    |> Enum.each(fn {node, of_node} ->
      case state.followers do
        %{^node => {link, ref, _monitor}} -> send(link, {ref, event, group, of_node})
        %{} -> :ok
      end
    end)

    state
  end

  defp unfollow(state, node) do
    case Map.pop(state.followers, node) do
      {nil, _} ->
        state

      {{_link, _ref, monitor}, followers} ->
        Process.demonitor(monitor, [:flush])
        %{state | followers: followers}
    end
  end
end
