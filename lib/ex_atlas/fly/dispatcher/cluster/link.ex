defmodule ExAtlas.Fly.Dispatcher.Cluster.Link do
  @moduledoc false
  # The way from this node to one other node (cluster mode): dispatches for that node's
  # relay queue here, in order, and go out over distribution without ever suspending
  # anyone, within two bounds:
  #
  #   * a window of @window messages sent and not yet acknowledged by the remote relay
  #     (it acknowledges in batches once it has handed them to its own fan-out), so a
  #     slow, overloaded or suspended relay holds at most @window of ours in its mailbox;
  #   * the node's queue: queued plus unacknowledged messages are counted in an :atomics
  #     that callers of dispatch/2 check before they send here. At the bound
  #     (`cluster_queue`, default 10 000) a dispatch is dropped for this node alone:
  #     counted (`Cluster.stats/0`), logged at warning level and reported to telemetry
  #     (`[:ex_atlas, :fly, :dispatcher, :cluster, :drop]`), both at most once a second
  #     from here: never in the dispatching process, which only bumps the counter.
  #
  # Sends use `:nosuspend`: when the distribution buffer is busy the message stays queued
  # and the link tries again shortly; `dispatch/2` and the other links go on. What was
  # unacknowledged when the remote relay (or its node) went down is counted as dropped.

  use GenServer

  require Logger

  alias ExAtlas.Fly.Dispatcher.Telemetry

  @window 256
  @retry_ms 5
  @report_ms 1_000

  # Slots of the :atomics shared with the callers.
  @queued 1
  @dropped 2

  @typedoc "What callers need to forward through a link."
  @type handle :: {pid(), :atomics.atomics_ref()}

  @spec start_link({node(), pos_integer()}) :: GenServer.on_start()
  def start_link({node, bound}), do: GenServer.start_link(__MODULE__, {node, bound})

  @doc """
  Queues `message` for `topic` on `relay` (a remote relay pid) unless the node's queue is
  at `bound`; then counts the drop. Never blocks, never suspends.
  """
  @spec push(handle(), pos_integer(), pid(), binary(), term()) :: :ok | :dropped
  def push({link, counts}, bound, relay, topic, message) do
    if :atomics.add_get(counts, @queued, 1) > bound do
      :atomics.sub(counts, @queued, 1)
      :atomics.add(counts, @dropped, 1)
      :dropped
    else
      send(link, {:forward, relay, topic, message})
      :ok
    end
  end

  @doc "Queues a cluster sync request behind everything queued before."
  @spec push_sync(handle(), pid(), pid(), reference()) :: :ok
  def push_sync({link, _counts}, relay, from, ref) do
    send(link, {:sync, relay, from, ref})
    :ok
  end

  @doc "Queued (including unacknowledged) and dropped messages."
  @spec counts(handle()) :: %{queued: non_neg_integer(), dropped: non_neg_integer()}
  def counts({_link, counts}) do
    %{queued: :atomics.get(counts, @queued), dropped: :atomics.get(counts, @dropped)}
  end

  @impl true
  def init({node, bound}) do
    counts = :atomics.new(2, signed: true)
    Process.send_after(self(), :report, @report_ms)

    {:ok,
     %{
       node: node,
       bound: bound,
       counts: counts,
       queue: :queue.new(),
       # relay pid => {monitor, unacknowledged}
       relays: %{},
       unacked: 0,
       retry: nil,
       reported: 0
     }}
  end

  @impl true
  def handle_call(:counts, _from, state), do: {:reply, state.counts, state}

  @impl true
  def handle_info({:forward, relay, topic, message}, state) do
    out = {relay, {:"$ex_atlas_remote", self(), topic, message}}
    {:noreply, pump(%{state | queue: :queue.in(out, state.queue)})}
  end

  def handle_info({:sync, relay, from, ref}, state) do
    out = {relay, {:"$ex_atlas_sync", from, ref}}
    {:noreply, pump(%{state | queue: :queue.in(out, state.queue)})}
  end

  def handle_info({:"$ex_atlas_ack", relay, n}, state) do
    state =
      case state.relays do
        %{^relay => {ref, unacked}} ->
          :atomics.sub(state.counts, @queued, min(n, unacked))
          relays = Map.put(state.relays, relay, {ref, max(unacked - n, 0)})
          %{state | relays: relays, unacked: max(state.unacked - n, 0)}

        _ ->
          state
      end

    {:noreply, pump(state)}
  end

  def handle_info(:retry, state), do: {:noreply, pump(%{state | retry: nil})}

  def handle_info({:DOWN, ref, :process, relay, _reason}, state) do
    case state.relays do
      %{^relay => {^ref, unacked}} ->
        # What it had not acknowledged is gone with it; so is what still waits for it.
        {waiting, queue} = split(state.queue, relay)
        lost = unacked + waiting
        :atomics.sub(state.counts, @queued, lost)
        :atomics.add(state.counts, @dropped, lost)
        relays = Map.delete(state.relays, relay)

        {:noreply,
         pump(%{state | relays: relays, unacked: state.unacked - unacked, queue: queue})}

      _ ->
        {:noreply, state}
    end
  end

  def handle_info(:report, state) do
    dropped = :atomics.get(state.counts, @dropped)

    if dropped > state.reported do
      Logger.warning(
        "[ExAtlas.Fly.Dispatcher] dropped #{dropped - state.reported} dispatches for node " <>
          "#{inspect(state.node)}: its queue was full (#{state.bound} messages) or its " <>
          "relay went down (#{dropped} in all)",
        node: state.node,
        dropped: dropped - state.reported
      )

      Telemetry.cluster_drop(state.node, dropped - state.reported)
    end

    Process.send_after(self(), :report, @report_ms)
    {:noreply, %{state | reported: dropped}}
  end

  def handle_info(_other, state), do: {:noreply, state}

  # Sends from the head of the queue while the window has room and the distribution
  # buffer takes them.
  defp pump(%{retry: nil, unacked: unacked} = state) when unacked < @window do
    case :queue.out(state.queue) do
      {:empty, _} ->
        state

      {{:value, {relay, message} = out}, rest} ->
        case :erlang.send(relay, message, [:nosuspend, :noconnect]) do
          :ok ->
            state |> sent(relay, message) |> Map.put(:queue, rest) |> pump()

          :nosuspend ->
            %{state | queue: :queue.in_r(out, rest), retry: retry()}

          :noconnect ->
            # The node is gone: the monitor's :DOWN (noconnection) counts what waits for it.
            %{watch(state, relay) | queue: :queue.in_r(out, rest), retry: retry()}
        end
    end
  end

  defp pump(state), do: state

  defp retry, do: Process.send_after(self(), :retry, @retry_ms)

  # A sync request is no dispatch: it takes no room in the window or the queue count.
  defp sent(state, relay, {:"$ex_atlas_sync", _from, _ref}), do: watch(state, relay)

  defp sent(state, relay, _dispatch) do
    state = watch(state, relay)
    {ref, unacked} = Map.fetch!(state.relays, relay)

    %{
      state
      | relays: Map.put(state.relays, relay, {ref, unacked + 1}),
        unacked: state.unacked + 1
    }
  end

  defp watch(state, relay) do
    if Map.has_key?(state.relays, relay),
      do: state,
      else: %{state | relays: Map.put(state.relays, relay, {Process.monitor(relay), 0})}
  end

  # Dispatches queued for `relay` (counted) and the queue without them; sync requests
  # for it are dropped too (their caller's monitor of the node answers them).
  defp split(queue, relay) do
    {mine, rest} = queue |> :queue.to_list() |> Enum.split_with(fn {to, _} -> to == relay end)
    dispatches = Enum.count(mine, fn {_, message} -> elem(message, 0) == :"$ex_atlas_remote" end)
    {dispatches, :queue.from_list(rest)}
  end
end
