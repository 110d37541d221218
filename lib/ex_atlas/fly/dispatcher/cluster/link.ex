defmodule ExAtlas.Fly.Dispatcher.Cluster.Link do
  @moduledoc false
  # The way from this node to one other node (cluster mode): which topics that node wants,
  # and the dispatches for it, queued here in order and sent over distribution without
  # ever suspending anyone, within two bounds:
  #
  #   * a window of @window messages sent and not yet acknowledged by the remote relay
  #     (it acknowledges in batches, with the count of our messages it has received so
  #     far), so a slow, overloaded or suspended relay holds at most @window of ours;
  #   * the node's queue: queued plus unacknowledged messages are counted in an :atomics
  #     that callers of dispatch/2 check before they send here. At the bound
  #     (`cluster_queue`, default 10 000) a dispatch is dropped for this node alone.
  #
  # Every dispatch handed to a link is delivered to the node's relay or counted as
  # dropped for the node (`Cluster.stats/0`), logged at warning level and reported to
  # telemetry (`[:ex_atlas, :fly, :dispatcher, :cluster, :drop]`), both at most once a
  # second from here, never from the dispatching process, which only bumps a counter.
  #
  # Interest. The link mirrors the node's `:pg` groups (`:pg.monitor_scope/1`) into the
  # interest table that `Cluster.forward/2` reads. When the node's relay leaves a group
  # because it went away (its node cut off or stopped, the relay restarted), the link
  # keeps the group, so that what the node misses meanwhile is queued here and then
  # delivered or counted. A leave the link cannot tell apart from a departure yet is
  # kept until the relay answers a ping (it is alive: the leave was its own).
  #
  # Departure and return. When the relay's monitor fires (`noconnection`, or the relay
  # died), the link stops sending and keeps its queue, and greets the node's relay by its
  # registered name (`hello`) whenever the node is connected, until a relay answers
  # (`welcome`) with the count of this link's messages it (or the relay before it: the
  # count lives in an ETS table of cluster mode's supervisor) received, and the groups it
  # is in now. What was sent and not received is then counted as dropped, the queue goes
  # out, and the groups the node no longer wants stop being kept. The rest is kept until
  # `:pg` shows them again, or for @hold_ms in all. A node that is not back after
  # @hold_ms has everything queued for it counted as dropped, and dispatches for it are
  # counted as dropped as they come until the relay reaps the link (`Relay`).
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

  @window 256
  @retry_ms 5
  @hello_ms 200
  @report_ms 1_000
  @hold_ms 10_000

  # Slots of the :atomics shared with the callers.
  @queued 1
  @dropped 2

  @typedoc "What callers need to forward through a link."
  @type handle :: {pid(), :atomics.atomics_ref()}

  @doc "How long a departed node's interest and queue are kept (ms)."
  @spec hold_ms() :: pos_integer()
  def hold_ms, do: Application.get_env(:ex_atlas, :cluster_hold_ms, @hold_ms)

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
  def push({link, counts}, bound, topic, message) do
    if :atomics.add_get(counts, @queued, 1) > bound do
      :atomics.sub(counts, @queued, 1)
      :atomics.add(counts, @dropped, 1)
      :dropped
    else
      send(link, {:forward, topic, message})
      :ok
    end
  end

  @doc """
  Queues a cluster sync request behind everything queued before; the relay answers
  `{Cluster.synced_tag(), ref, node}` to `reply_to` (a pid or an alias).
  """
  @spec push_sync(handle(), pid() | reference(), reference()) :: :ok
  def push_sync({link, _counts}, reply_to, ref) do
    send(link, {:sync, reply_to, ref})
    :ok
  end

  @doc "Queued (including unacknowledged) and dropped messages."
  @spec counts(handle()) :: %{queued: non_neg_integer(), dropped: non_neg_integer()}
  def counts({_link, counts}) do
    %{queued: :atomics.get(counts, @queued), dropped: :atomics.get(counts, @dropped)}
  end

  @impl true
  def init({node, bound}) do
    Process.flag(:trap_exit, true)
    counts = :atomics.new(2, signed: true)
    :ok = :net_kernel.monitor_nodes(true)
    Process.send_after(self(), :report, @report_ms)

    state = %{
      node: node,
      bound: bound,
      counts: counts,
      queue: :queue.new(),
      # The node's relay once it welcomed us; nil while the link waits for one.
      relay: nil,
      monitor: nil,
      hello: nil,
      # Dispatches sent to the relay, and the relay's count of those it received
      # (acknowledged): both on the relay's count since it welcomed us.
      sent: 0,
      acked: 0,
      retry: nil,
      # Interest: the node's groups as `:pg` shows them, groups kept after the relay
      # left them (departed), and leaves waiting for the ping that tells them apart.
      scope: nil,
      scope_monitor: nil,
      topics: MapSet.new(),
      held: MapSet.new(),
      leaving: %{},
      ping: nil,
      gen: 0,
      hold: nil,
      expired: false,
      # Dropped here (not at the queue's bound), and dropped already reported.
      lost: 0,
      reported: 0
    }

    state = watch_scope(state)
    true = :ets.insert_new(Cluster.links_table(), {node, {self(), counts}})
    {:ok, hello(state)}
  end

  @impl true
  def handle_call(:counts, _from, state), do: {:reply, state.counts, state}

  @impl true
  def handle_info({:forward, _topic, _message}, %{expired: true} = state),
    do: {:noreply, lose(state, 1)}

  def handle_info({:forward, topic, message}, state) do
    {:noreply, pump(%{state | queue: :queue.in({:dispatch, topic, message}, state.queue)})}
  end

  def handle_info({:sync, reply_to, ref}, state) do
    {:noreply, pump(%{state | queue: :queue.in({:sync, reply_to, ref}, state.queue)})}
  end

  def handle_info({:"$ex_atlas_ack", relay, n}, %{relay: relay} = state) do
    {:noreply, state |> acked(n) |> pump()}
  end

  def handle_info({:"$ex_atlas_ack", _old_relay, _n}, state), do: {:noreply, state}

  def handle_info(:retry, state), do: {:noreply, pump(%{state | retry: nil})}

  # Any greeting's answer will do: nothing is sent while the link waits for one, so the
  # relay's count cannot have changed since the first.
  def handle_info({:"$ex_atlas_welcome", _ref, relay, received, wanted}, %{relay: nil} = state) do
    {:noreply, welcome(state, relay, received, wanted)}
  end

  def handle_info({:"$ex_atlas_welcome", _ref, _relay, _received, _wanted}, state),
    do: {:noreply, state}

  def handle_info({:hello_again, ref}, %{hello: ref} = state), do: {:noreply, hello(state)}
  def handle_info({:hello_again, _ref}, state), do: {:noreply, state}

  def handle_info({:nodeup, node}, %{node: node, relay: nil} = state),
    do: {:noreply, hello(state)}

  def handle_info({:DOWN, ref, :process, _relay, _reason}, %{monitor: ref} = state) do
    {:noreply, departed(state)}
  end

  def handle_info({:DOWN, ref, :process, _scope, _reason}, %{scope_monitor: ref} = state) do
    # The scope restarts (with the relay); the interest kept meanwhile is as it was.
    Process.send_after(self(), :watch_scope, @retry_ms)
    {:noreply, %{state | scope: nil, scope_monitor: nil}}
  end

  def handle_info(:watch_scope, state), do: {:noreply, watch_scope(state)}

  def handle_info({ref, :join, group, pids}, %{scope: ref} = state) do
    if Enum.any?(pids, &(node(&1) == state.node)),
      do: {:noreply, joined(state, group)},
      else: {:noreply, state}
  end

  def handle_info({ref, :leave, group, pids}, %{scope: ref} = state) do
    case Enum.find(pids, &(node(&1) == state.node)) do
      nil -> {:noreply, state}
      pid -> {:noreply, left(state, group, pid)}
    end
  end

  def handle_info({:"$ex_atlas_pong", ref}, %{ping: {ref, gen}} = state) do
    {released, leaving} = Enum.split_with(state.leaving, fn {_, g} -> g <= gen end)
    state = %{state | leaving: Map.new(leaving), ping: nil}
    state = Enum.reduce(released, state, fn {topic, _}, acc -> release(acc, topic) end)
    {:noreply, if(map_size(state.leaving) > 0, do: ping(state), else: state)}
  end

  def handle_info(:ping, %{ping: nil} = state) when map_size(state.leaving) > 0,
    do: {:noreply, ping(state)}

  def handle_info({:hold_over, ref}, %{hold: ref} = state), do: {:noreply, hold_over(state)}

  def handle_info(:report, state) do
    Process.send_after(self(), :report, @report_ms)
    {:noreply, report(state)}
  end

  def handle_info(_other, state), do: {:noreply, state}

  @impl true
  def terminate(reason, state) do
    # Reaped (the node stayed away) or cluster mode stops: what is left is dropped. A
    # crashed link is restarted: its node still runs cluster mode.
    if shutdown?(reason), do: :ets.delete(Cluster.peers_table(), state.node)
    state = lose(state, in_flight(state) + queued_dispatches(state.queue))
    Enum.each(rows(state), &:ets.delete_object(Cluster.interest_table(), {&1, state.node}))
    :ets.delete(Cluster.links_table(), state.node)
    report(state)
  end

  defp shutdown?(:shutdown), do: true
  defp shutdown?({:shutdown, _}), do: true
  defp shutdown?(_reason), do: false

  ## Sending

  # Sends from the head of the queue while the relay is there, the window has room and
  # the distribution buffer takes them.
  defp pump(%{relay: nil} = state), do: state
  defp pump(%{retry: retry} = state) when retry != nil, do: state

  defp pump(state) do
    case :queue.peek(state.queue) do
      :empty ->
        state

      {:value, {:dispatch, _topic, _message}} when state.sent - state.acked >= @window ->
        state

      {:value, out} ->
        case :erlang.send(state.relay, wire(out), [:nosuspend, :noconnect]) do
          :ok ->
            state = %{state | queue: :queue.drop(state.queue)}
            pump(if elem(out, 0) == :dispatch, do: %{state | sent: state.sent + 1}, else: state)

          # Busy distribution buffer; or the node is gone, and the relay's monitor says
          # so shortly. Either way the message stays first in the queue.
          _ ->
            %{state | retry: Process.send_after(self(), :retry, @retry_ms)}
        end
    end
  end

  defp wire({:dispatch, topic, message}), do: {:"$ex_atlas_remote", self(), topic, message}
  defp wire({:sync, reply_to, ref}), do: {:"$ex_atlas_sync", reply_to, ref}

  defp acked(state, n) do
    n = min(n, state.sent)

    if n > state.acked do
      :atomics.sub(state.counts, @queued, n - state.acked)
      %{state | acked: n}
    else
      state
    end
  end

  defp in_flight(state), do: state.sent - state.acked

  defp queued_dispatches(queue),
    do: queue |> :queue.to_list() |> Enum.count(&(elem(&1, 0) == :dispatch))

  # Counts `n` dispatches this link held as dropped.
  defp lose(state, 0), do: state

  defp lose(state, n) do
    :atomics.sub(state.counts, @queued, n)
    :atomics.add(state.counts, @dropped, n)
    %{state | lost: state.lost + n}
  end

  ## Departure and return

  defp departed(state) do
    if state.retry, do: Process.cancel_timer(state.retry)
    # Groups that the relay left and were waiting for a ping are kept: it is gone.
    held = Enum.reduce(Map.keys(state.leaving), state.held, &MapSet.put(&2, &1))

    %{state | relay: nil, monitor: nil, retry: nil, ping: nil, leaving: %{}, held: held}
    |> start_hold()
    |> hello()
  end

  # Greets the node's relay by its registered name, again every @hello_ms while the node
  # is connected and nobody answered (a restarting relay is not registered yet).
  defp hello(%{relay: nil} = state) do
    ref = make_ref()
    to = {Cluster.Relay, state.node}
    _ = :erlang.send(to, {:"$ex_atlas_hello", self(), ref}, [:nosuspend, :noconnect])
    Process.send_after(self(), {:hello_again, ref}, @hello_ms)
    %{state | hello: ref}
  end

  defp hello(state), do: state

  defp welcome(state, relay, received, wanted) do
    # What the relay received of what we sent is delivered; the rest is lost. A relay
    # whose count is below what it acknowledged belongs to a new cluster mode there (its
    # node restarted): of ours it has nothing beyond what it acknowledged.
    delivered = if received >= state.acked, do: min(received, state.sent), else: state.acked
    :atomics.sub(state.counts, @queued, delivered - state.acked)
    state = lose(state, state.sent - delivered)
    wanted = MapSet.new(wanted)
    :ets.insert(Cluster.peers_table(), {state.node})

    state = %{
      state
      | relay: relay,
        monitor: Process.monitor(relay),
        hello: nil,
        sent: received,
        acked: received,
        expired: false
    }

    state =
      Enum.reduce(state.held, state, fn topic, acc ->
        if MapSet.member?(wanted, topic), do: acc, else: release(acc, topic)
      end)

    state |> stop_hold_if_done() |> pump()
  end

  defp start_hold(%{hold: nil} = state) do
    ref = make_ref()
    Process.send_after(self(), {:hold_over, ref}, hold_ms())
    %{state | hold: ref}
  end

  defp start_hold(state), do: state

  defp stop_hold_if_done(state) do
    if MapSet.size(state.held) == 0 and state.relay != nil,
      do: %{state | hold: nil},
      else: state
  end

  defp hold_over(state) do
    state = %{state | hold: nil}
    state = Enum.reduce(state.held, state, &release(&2, &1))

    if state.relay == nil do
      # Not back in time: everything held for the node is dropped, and so is whatever
      # comes for it until it is back or the relay reaps this link. Connected with no
      # relay, the node no longer runs cluster mode.
      if state.node in Node.list(), do: :ets.delete(Cluster.peers_table(), state.node)
      state = lose(state, in_flight(state) + queued_dispatches(state.queue))
      %{state | queue: :queue.new(), sent: state.acked, expired: true}
    else
      state
    end
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
          for {group, pids} <- groups,
              Enum.any?(pids, &(node(&1) == state.node)),
              into: MapSet.new(),
              do: group

        old = state.topics
        state = %{state | scope: ref, scope_monitor: monitor, topics: topics}
        Enum.each(topics, &:ets.insert(Cluster.interest_table(), {&1, state.node}))
        Enum.reduce(MapSet.difference(old, topics), state, &release(&2, &1))
    end
  end

  defp joined(state, group) do
    :ets.insert(Cluster.interest_table(), {group, state.node})

    %{
      state
      | topics: MapSet.put(state.topics, group),
        held: MapSet.delete(state.held, group),
        leaving: Map.delete(state.leaving, group)
    }
    |> stop_hold_if_done()
  end

  defp left(state, group, pid) do
    still =
      Enum.any?(:pg.get_members(Cluster.scope(), group), &(node(&1) == state.node and &1 != pid))

    cond do
      still ->
        state

      state.relay == pid and state.node in Node.list() ->
        # Most likely the relay's own leave (its last subscriber went); but it may have
        # died, and its monitor has not fired yet. Kept until a ping answers.
        state = %{
          state
          | topics: MapSet.delete(state.topics, group),
            leaving: Map.put(state.leaving, group, state.gen)
        }

        if state.ping == nil, do: ping(state), else: state

      true ->
        %{
          state
          | topics: MapSet.delete(state.topics, group),
            held: MapSet.put(state.held, group)
        }
        |> start_hold()
    end
  end

  defp ping(state) do
    ref = make_ref()

    case :erlang.send(state.relay, {:"$ex_atlas_ping", self(), ref}, [:nosuspend, :noconnect]) do
      :ok ->
        %{state | ping: {ref, state.gen}, gen: state.gen + 1}

      :nosuspend ->
        Process.send_after(self(), :ping, @retry_ms)
        state

      :noconnect ->
        # Gone: its monitor fires shortly and keeps these groups.
        state
    end
  end

  # Stops forwarding `topic` to the node unless the node still has it or it is kept.
  defp release(state, topic) do
    state = %{state | held: MapSet.delete(state.held, topic)}

    unless MapSet.member?(state.topics, topic) or Map.has_key?(state.leaving, topic) do
      :ets.delete_object(Cluster.interest_table(), {topic, state.node})
    end

    stop_hold_if_done(state)
  end

  defp rows(state) do
    state.topics |> MapSet.union(state.held) |> MapSet.union(MapSet.new(Map.keys(state.leaving)))
  end

  ## Reporting

  defp report(state) do
    # What was dispatched for the node before this link ran is counted as dropped here.
    unlinked = Cluster.take_unlinked(state.node)
    if unlinked > 0, do: :atomics.add(state.counts, @dropped, unlinked)
    state = %{state | lost: state.lost + unlinked}
    dropped = :atomics.get(state.counts, @dropped)
    new = dropped - state.reported

    if new > 0 do
      full = dropped - state.lost

      Logger.warning(
        "[ExAtlas.Fly.Dispatcher] dropped #{new} dispatches for node #{inspect(state.node)} " <>
          "(#{dropped} in all: #{full} because its queue was full (#{state.bound} " <>
          "messages), #{state.lost} lost with its connection or its relay, before its " <>
          "link ran, or not back within #{hold_ms()} ms)",
        node: state.node,
        dropped: new
      )

      Telemetry.cluster_drop(state.node, new)
    end

    %{state | reported: dropped}
  end
end
