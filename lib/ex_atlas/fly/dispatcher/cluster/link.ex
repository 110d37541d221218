defmodule ExAtlas.Fly.Dispatcher.Cluster.Link do
  @moduledoc false
  # The way from this node to one other node (cluster mode): which topics that node wants,
  # and the dispatches for it. This process does the I/O; the rest is in two modules:
  #
  #   * `Link.Transport`: the queue for the node and its window, sent to the node's relay
  #     without ever suspending anyone, and the counts of what is queued and dropped;
  #   * `Link.Presence`: whether the relay is there, away (the link holds what the node
  #     had) or not back in time, as plain data: this process hands it every event and
  #     carries out the actions it answers (`run/2`).
  #
  # Here: the mirroring of the node's `:pg` groups (`:pg.monitor_scope/1`) into events
  # for `Presence`, whose actions write the interest table that `Cluster.forward/2`
  # reads; greeting, pinging and monitoring the relay; and drop reporting. Every dispatch
  # handed to a link is delivered to the node's relay or counted as dropped for the node
  # (`Cluster.stats/0`), logged at warning level and reported to telemetry (`[:ex_atlas,
  # :fly, :dispatcher, :cluster, :drop]`), both at most once a second from here, never
  # from the dispatching process, which only bumps a counter.
  #
  # Greeting. While no relay is there, the link greets the node's relay by its registered
  # name (`hello`) whenever the node is connected, again every @hello_ms, until a relay
  # answers (`welcome`) with the count of this link's messages it (or the relay before
  # it: the count lives in an ETS table of cluster mode's supervisor) received, and the
  # groups it is in now. A node whose relay is not back after @hold_ms has everything
  # queued for it counted as dropped, and dispatches for it are counted as dropped as
  # they come until the relay reaps the link (`Relay`).
  #
  # Peers. A relay's first welcome tells that the node runs cluster mode: the link puts
  # it in `Cluster.peers_table/0`, which `Cluster.forward/2` sends every dispatch to when
  # replay is on. The node stays there while it is away, so that what it misses then is
  # queued or counted as above, and leaves it when its link is reaped, or when it is
  # connected and still has no relay after @hold_ms (cluster mode stopped there: nothing
  # more is forwarded to it until a relay welcomes the link again).

  use GenServer

  require Logger

  alias ExAtlas.Fly.Dispatcher.{Cluster, Telemetry}
  alias ExAtlas.Fly.Dispatcher.Cluster.Link.{Presence, Transport}

  @retry_ms 5
  # The link/relay protocol: 2 since the relay counts what it receives per node (so that
  # a link that takes a dead one's place settles what that one sent). The greeting and
  # the welcome carry it where a node of protocol 1 (no version) takes a reference and
  # ignores it, so the two exchange dispatches (see `protocol/0`).
  @protocol 2
  @hello_ms 200
  @report_ms 1_000
  @hold_ms 10_000

  @typedoc "What callers need to forward through a link."
  @type handle :: {pid(), Transport.counters()}

  @doc "How long a departed node's interest and queue are kept (ms)."
  @spec hold_ms() :: pos_integer()
  def hold_ms, do: Application.get_env(:ex_atlas, :cluster_hold_ms, @hold_ms)

  @doc """
  The link/relay protocol of this build. A node of protocol 1 (before it had one) greets
  with a plain reference and is welcomed as before; a relay of protocol 1 echoes the
  greeting's tag instead of its own. Against such a relay a link that took a dead one's
  place cannot tell what that one's messages in flight did, and counts them as dropped
  (`Transport.resume/2`); it warns once that the node runs the earlier protocol.
  """
  @spec protocol() :: pos_integer()
  def protocol, do: @protocol

  @doc false
  @spec child_spec({node(), pos_integer()}) :: Supervisor.child_spec()
  def child_spec(arg) do
    %{id: __MODULE__, start: {__MODULE__, :start_link, [arg]}, restart: :transient}
  end

  @spec start_link({node(), pos_integer()}) :: GenServer.on_start()
  def start_link({node, bound}), do: GenServer.start_link(__MODULE__, {node, bound})

  @doc """
  Queues `message` for `topic` unless the node's queue is at `bound`; then counts the
  drop. Never blocks, never suspends.
  """
  @spec push(handle(), pos_integer(), binary(), term()) :: :ok | :dropped
  def push({link, counters}, bound, topic, message) do
    if Transport.reserve(counters, bound) do
      send(link, {:forward, topic, message})
      :ok
    else
      :dropped
    end
  end

  @doc """
  Queues a cluster sync request behind everything queued before; the relay answers
  `{Cluster.synced_tag(), ref, node}` to `reply_to` (a pid or an alias).
  """
  @spec push_sync(handle(), pid() | reference(), reference()) :: :ok
  def push_sync({link, _counters}, reply_to, ref) do
    send(link, {:sync, reply_to, ref})
    :ok
  end

  @doc "Queued (including unacknowledged) and dropped messages."
  @spec counts(handle()) :: %{queued: non_neg_integer(), dropped: non_neg_integer()}
  def counts({_link, counters}), do: Transport.counts(counters)

  @impl true
  def init({node, bound}) do
    case :ets.lookup(Cluster.links_table(), node) do
      # Started twice (the relay and the supervisor's restart both): the first runs.
      # Links of one supervisor start one at a time, so only one finds the row dead.
      [{^node, {pid, _counters}}] when pid != self() and is_pid(pid) ->
        if Process.alive?(pid), do: :ignore, else: start(node, bound)

      _ ->
        start(node, bound)
    end
  end

  defp start(node, bound) do
    Process.flag(:trap_exit, true)
    :ok = :net_kernel.monitor_nodes(true)
    Process.send_after(self(), :report, @report_ms)
    {transport, inherited} = take_over(node)
    {presence, greet} = Presence.new(inherited)

    state = %{
      node: node,
      bound: bound,
      transport: transport,
      presence: presence,
      # The monitor of the relay that welcomed us.
      monitor: nil,
      # `:pg.monitor_scope/1`'s reference, and the scope process's monitor.
      scope: nil,
      scope_monitor: nil,
      # Warned that the node's relay runs an earlier protocol.
      warned: false
    }

    # Greets first, with `presence` as it starts, then mirrors the scope into it: the
    # snapshot's changes to it must not be written over by the start's.
    {:ok, state |> run({presence, greet}) |> watch_scope()}
  end

  # Takes the node's row in the links table, and the place of the link before (dead by
  # now, killed or crashed: its row stays until a successor or the relay settles it):
  # its counts (`Transport.inherit/2`) and the node's interest rows it wrote, which are
  # held here until the node's relay or `:pg` tells which still hold.
  defp take_over(node) do
    case :ets.lookup(Cluster.links_table(), node) do
      [{^node, {_dead, {_gen, ledger} = counters}}] ->
        transport = Transport.new(ledger)
        # Dispatches for the node go to this link from here on, and every one that
        # still finds the dead link's counts is counted as dropped once they are sealed.
        true = :ets.insert(Cluster.links_table(), {node, {self(), Transport.counters(transport)}})
        {Transport.inherit(transport, counters), interest_of(node)}

      [] ->
        transport = Transport.new(Transport.ledger())
        true = :ets.insert(Cluster.links_table(), {node, {self(), Transport.counters(transport)}})
        {transport, interest_of(node)}
    end
  end

  defp interest_of(node),
    do: :ets.select(Cluster.interest_table(), [{{:"$1", node}, [], [:"$1"]}])

  @doc """
  Settles the row of `node`'s link when that link is dead and no successor will take
  its place (the relay reaps the node): everything it held is counted as dropped for
  the node, and its rows go. Answers false when the link is alive.
  """
  @spec retire(node()) :: boolean()
  def retire(node) do
    case :ets.lookup(Cluster.links_table(), node) do
      [{^node, {pid, counters}}] ->
        if Process.alive?(pid) do
          false
        else
          _ = Transport.drop_sealed(counters)
          forget(node)
          true
        end

      [] ->
        true
    end
  end

  # The rows of `node` in the tables of cluster mode.
  defp forget(node) do
    :ets.delete(Cluster.peers_table(), node)
    :ets.match_delete(Cluster.interest_table(), {:_, node})
    :ets.delete(Cluster.links_table(), node)
  end

  @impl true
  def handle_call(:counts, _from, state),
    do: {:reply, Transport.counters(state.transport), state}

  @impl true
  def handle_info({:forward, topic, message}, state) do
    if Presence.expired?(state.presence),
      do: {:noreply, transport(state, &Transport.lose(&1, 1))},
      else: {:noreply, enqueue(state, {:dispatch, topic, message})}
  end

  def handle_info({:sync, reply_to, ref}, state),
    do: {:noreply, enqueue(state, {:sync, reply_to, ref})}

  def handle_info({:"$ex_atlas_ack", relay, n}, state) do
    case Presence.relay(state.presence) do
      ^relay -> {:noreply, transport(state, &(&1 |> Transport.ack(n) |> Transport.pump(relay)))}
      # From a relay before this one.
      _ -> {:noreply, state}
    end
  end

  def handle_info(:retry, state) do
    relay = Presence.relay(state.presence)
    {:noreply, transport(state, &Transport.retry(&1, relay))}
  end

  def handle_info({:"$ex_atlas_welcome", tag, relay, received, wanted}, state) do
    state = check_protocol(state, tag)
    {:noreply, run(state, Presence.welcome(state.presence, relay, received, wanted))}
  end

  def handle_info({:hello_again, token}, state),
    do: {:noreply, run(state, Presence.hello_again(state.presence, token))}

  def handle_info({:nodeup, node}, %{node: node} = state),
    do: {:noreply, run(state, Presence.nodeup(state.presence))}

  def handle_info({:DOWN, ref, :process, _relay, _reason}, %{monitor: ref} = state) do
    state = %{state | monitor: nil}
    {:noreply, run(state, Presence.departed(state.presence))}
  end

  def handle_info({:DOWN, ref, :process, _scope, _reason}, %{scope_monitor: ref} = state) do
    # The scope restarts (with the relay); the interest kept meanwhile is as it was.
    Process.send_after(self(), :watch_scope, @retry_ms)
    {:noreply, %{state | scope: nil, scope_monitor: nil}}
  end

  def handle_info(:watch_scope, state), do: {:noreply, watch_scope(state)}

  def handle_info({ref, :join, group, pids}, %{scope: ref} = state) do
    if Enum.any?(pids, &(node(&1) == state.node)),
      do: {:noreply, run(state, Presence.joined(state.presence, group))},
      else: {:noreply, state}
  end

  def handle_info({ref, :leave, group, pids}, %{scope: ref} = state) do
    case Enum.find(pids, &(node(&1) == state.node)) do
      nil -> {:noreply, state}
      pid -> {:noreply, left(state, group, pid)}
    end
  end

  def handle_info({:"$ex_atlas_pong", ref}, state),
    do: {:noreply, run(state, Presence.pong(state.presence, ref))}

  def handle_info(:ping, state),
    do: {:noreply, run(state, Presence.retry_ping(state.presence))}

  def handle_info({:hold_over, token}, state) do
    connected? = state.node in Node.list()
    {:noreply, run(state, Presence.hold_over(state.presence, token, connected?))}
  end

  def handle_info(:report, state) do
    Process.send_after(self(), :report, @report_ms)
    {:noreply, report(state)}
  end

  # The relay reaps the link: its node stayed away.
  def handle_info(:reap, state), do: {:stop, {:shutdown, :reaped}, state}

  def handle_info(_other, state), do: {:noreply, state}

  @impl true
  def terminate({:shutdown, :reaped}, state) do
    # The node stayed away: what is left is dropped, with the node's rows.
    state = transport(state, &Transport.drop_all/1)
    _ = Transport.drop_sealed(Transport.counters(state.transport))
    forget(state.node)
    report(state)
  end

  def terminate(_reason, state) do
    # Crashed, or stopped with cluster mode or its link supervisor: the rows stay, and the
    # link that takes this one's place (the relay starts one for every connected node)
    # settles what this one held, as it would after a kill, when this does not run.
    report(state)
  end

  # A relay of protocol 2 or later answers with its version; one of protocol 1 echoes the
  # greeting's tag. Warns once per link about a relay of an earlier protocol.
  defp check_protocol(%{warned: true} = state, _tag), do: state

  defp check_protocol(state, {:ex_atlas_relay, version, _ref})
       when is_integer(version) and version >= @protocol,
       do: state

  defp check_protocol(state, tag) do
    version =
      case tag do
        {:ex_atlas_relay, version, _ref} -> version
        _ -> 1
      end

    Logger.warning(
      "[ExAtlas.Fly.Dispatcher] node #{inspect(state.node)} runs cluster protocol " <>
        "#{inspect(version)}, this node #{@protocol} (a rolling deploy?): dispatches are " <>
        "exchanged, and what a restarted link here had in flight to it is counted as dropped",
      node: state.node
    )

    %{state | warned: true}
  end

  defp transport(state, fun), do: %{state | transport: fun.(state.transport)}

  defp enqueue(state, item) do
    relay = Presence.relay(state.presence)
    transport(state, &(&1 |> Transport.enqueue(item) |> Transport.pump(relay)))
  end

  ## Interest

  defp watch_scope(state) do
    case Process.whereis(Cluster.scope()) do
      nil ->
        Process.send_after(self(), :watch_scope, @retry_ms)
        state

      scope ->
        monitor = Process.monitor(scope)
        {ref, groups} = :pg.monitor_scope(Cluster.scope())

        topics =
          for {group, pids} <- groups, Enum.any?(pids, &(node(&1) == state.node)), do: group

        state = %{state | scope: ref, scope_monitor: monitor}
        run(state, Presence.snapshot(state.presence, topics))
    end
  end

  # `pid` of the node left `group`: the node left it unless it has another member there.
  defp left(state, group, pid) do
    members = :pg.get_members(Cluster.scope(), group)

    if Enum.any?(members, &(node(&1) == state.node and &1 != pid)) do
      state
    else
      connected? = state.node in Node.list()
      run(state, Presence.left(state.presence, group, pid, connected?))
    end
  end

  ## Carrying out `Presence`'s actions

  defp run(state, {presence, actions}),
    do: Enum.reduce(actions, %{state | presence: presence}, &act(&2, &1))

  # Greets the node's relay by its registered name (a restarting relay is not registered
  # yet, hence the greeting again).
  defp act(state, {:greet, token}) do
    to = {Cluster.Relay, state.node}
    hello = {:"$ex_atlas_hello", self(), {:ex_atlas_link, @protocol, make_ref()}}
    _ = :erlang.send(to, hello, [:nosuspend, :noconnect])
    Process.send_after(self(), {:hello_again, token}, @hello_ms)
    state
  end

  defp act(state, {:hold, token}) do
    Process.send_after(self(), {:hold_over, token}, hold_ms())
    state
  end

  defp act(state, :ping) do
    ref = make_ref()
    relay = Presence.relay(state.presence)

    case :erlang.send(relay, {:"$ex_atlas_ping", self(), ref}, [:nosuspend, :noconnect]) do
      :ok ->
        %{state | presence: Presence.pinged(state.presence, ref)}

      :nosuspend ->
        Process.send_after(self(), :ping, @retry_ms)
        state

      :noconnect ->
        # Gone: its monitor fires shortly, and the groups are kept.
        state
    end
  end

  defp act(state, {:resume, relay, received}) do
    state = %{state | monitor: Process.monitor(relay)}
    transport(state, &(&1 |> Transport.resume(received) |> Transport.pump(relay)))
  end

  defp act(state, :pause), do: transport(state, &Transport.pause/1)
  defp act(state, :expire), do: transport(state, &Transport.drop_all/1)

  defp act(state, :add_peer) do
    :ets.insert(Cluster.peers_table(), {state.node})
    state
  end

  defp act(state, :remove_peer) do
    :ets.delete(Cluster.peers_table(), state.node)
    state
  end

  defp act(state, {:add_interest, topic}) do
    :ets.insert(Cluster.interest_table(), {topic, state.node})
    state
  end

  defp act(state, {:remove_interest, topic}) do
    :ets.delete_object(Cluster.interest_table(), {topic, state.node})
    state
  end

  ## Reporting

  defp report(state) do
    # What was dispatched for the node before this link ran is counted as dropped here.
    state = transport(state, &Transport.lose_unlinked(&1, Cluster.take_unlinked(state.node)))
    dropped = Transport.dropped(state.transport)
    new = dropped - Transport.reported(state.transport)

    if new > 0 do
      lost = Transport.lost(state.transport)
      full = dropped - lost

      Logger.warning(
        "[ExAtlas.Fly.Dispatcher] dropped #{new} dispatches for node #{inspect(state.node)} " <>
          "(#{dropped} in all: #{full} because its queue was full (#{state.bound} " <>
          "messages), #{lost} lost with its connection or its relay, before its " <>
          "link ran, or not back within #{hold_ms()} ms)",
        node: state.node,
        dropped: new
      )

      Telemetry.cluster_drop(state.node, new)
    end

    transport(state, &Transport.report(&1, dropped))
  end
end
