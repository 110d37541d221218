defmodule ExAtlas.Fly.Dispatcher.Cluster.Link.Transport do
  @moduledoc false
  # The link's way out to the node's relay: the dispatches (and sync requests) for the
  # node, queued in order and sent over distribution without ever suspending anyone,
  # within two bounds:
  #
  #   * a window of @window messages sent and not yet acknowledged by the remote relay
  #     (it acknowledges in batches, with the count of our messages it has received so
  #     far), so a slow, overloaded or suspended relay holds at most @window of ours;
  #   * the node's queue: queued plus unacknowledged messages are counted in an :atomics
  #     that callers of dispatch/2 check before they send to the link (`reserve/2`). At
  #     the bound (`cluster_queue`, default 10 000) a dispatch is dropped for this node
  #     alone.
  #
  # Every dispatch handed to the link is delivered to the node's relay or counted here as
  # dropped for the node: by the callers at the bound, by the link otherwise (`lost`).
  # Runs in the link's process: `pump/2` sends as it, and asks it for a `:retry` message
  # when the distribution buffer is busy.

  @window 256
  @retry_ms 5

  # The counts shared with the callers are two :atomics. One per link (its generation):
  # queued (unacknowledged included), and the link's `sent` and `acked`, written as they
  # change, so that the link's successor can settle what it left. One per node (the
  # ledger), which outlives every link of the node: dropped, and dropped reported.
  @queued 1
  @sent 2
  @acked 3
  @dropped 1
  @reported 2

  # What `seal/1` adds to a dead link's queued count: every reserve on it then fails, and
  # counts its dispatch as dropped, so nothing is ever handed to a link that is gone.
  @seal 1_099_511_627_776

  @enforce_keys [:counters, :queue]
  defstruct [:counters, :queue, sent: 0, acked: 0, retry: nil, lost: 0]

  @typedoc """
  The counts shared with the callers: the link's (queued, sent, acked) and its node's
  (dropped, reported).
  """
  @type counters :: {:atomics.atomics_ref(), :atomics.atomics_ref()}

  @typedoc "What goes to the relay, in order."
  @type item :: {:dispatch, binary(), term()} | {:sync, pid() | reference(), reference()}

  # `sent` and `acked` count dispatches on the relay's count since it welcomed the link:
  # sent to it, and acknowledged by it. `lost`: dropped by the link, not at the bound.
  @type t :: %__MODULE__{
          counters: counters(),
          queue: :queue.queue(item()),
          sent: non_neg_integer(),
          acked: non_neg_integer(),
          retry: reference() | nil,
          lost: non_neg_integer()
        }

  @doc "A new node ledger: what is dropped for the node, over all its links."
  @spec ledger() :: :atomics.atomics_ref()
  def ledger, do: :atomics.new(2, signed: true)

  @doc "An empty queue, with counts of its own and the node's `ledger`."
  @spec new(:atomics.atomics_ref()) :: t()
  def new(ledger),
    do: %__MODULE__{counters: {:atomics.new(3, signed: true), ledger}, queue: :queue.new()}

  @doc """
  Takes over from a dead link of the same node, whose `counters` are sealed here first
  (`seal/1`): what it had sent and not had acknowledged stays in flight here, to be
  settled on the relay's count when one welcomes this link (`resume/2`); the rest it
  held (its queue, and the dispatches in its mailbox or sent to it after it died) is
  counted as dropped.
  """
  @spec inherit(t(), counters()) :: t()
  def inherit(%__MODULE__{counters: {gen, _}} = t, {old, _ledger} = dead) do
    held = seal(dead)
    sent = :atomics.get(old, @sent)
    acked = :atomics.get(old, @acked)
    in_flight = min(sent - acked, held)
    :atomics.add(gen, @queued, in_flight)
    :atomics.put(gen, @sent, sent)
    :atomics.put(gen, @acked, acked)
    lose_unlinked(%{t | sent: sent, acked: acked}, held - in_flight)
  end

  @doc """
  Seals the counters of a link that is gone and answers what it held then (queued,
  unacknowledged included): from now on every reserve on them fails, and its dispatch
  is counted as dropped for the node.
  """
  @spec seal(counters()) :: non_neg_integer()
  def seal({gen, _ledger}) do
    case :atomics.add_get(gen, @queued, @seal) - @seal do
      # Sealed before: it held nothing more.
      held when held >= @seal -> 0
      held -> max(held, 0)
    end
  end

  @doc """
  Seals the counters of a link that is gone with no successor (`seal/1`) and counts
  what it held as dropped for the node.
  """
  @spec drop_sealed(counters()) :: non_neg_integer()
  def drop_sealed({_gen, ledger} = counters) do
    held = seal(counters)
    :atomics.add(ledger, @dropped, held)
    held
  end

  @doc "The counts shared with the callers."
  @spec counters(t()) :: counters()
  def counters(%__MODULE__{counters: counters}), do: counters

  @doc """
  In the caller: takes a place in the node's queue, or, when it holds `bound` already
  (or the link is gone), counts the dispatch as dropped and answers false.
  """
  @spec reserve(counters(), pos_integer()) :: boolean()
  def reserve({gen, ledger}, bound) do
    if :atomics.add_get(gen, @queued, 1) > bound do
      :atomics.sub(gen, @queued, 1)
      :atomics.add(ledger, @dropped, 1)
      false
    else
      true
    end
  end

  @doc "Queued (including unacknowledged) and dropped messages."
  @spec counts(counters()) :: %{queued: non_neg_integer(), dropped: non_neg_integer()}
  def counts({gen, ledger}) do
    queued = :atomics.get(gen, @queued)
    # A sealed link's (for the moment its successor takes its place) holds nothing.
    queued = if queued >= @seal, do: 0, else: queued
    %{queued: queued, dropped: :atomics.get(ledger, @dropped)}
  end

  @doc "Every dispatch dropped for the node so far."
  @spec dropped(t()) :: non_neg_integer()
  def dropped(%__MODULE__{counters: {_, ledger}}), do: :atomics.get(ledger, @dropped)

  @doc "Of `dropped/1`, those reported (logged) so far, by this link or one before it."
  @spec reported(t()) :: non_neg_integer()
  def reported(%__MODULE__{counters: {_, ledger}}), do: :atomics.get(ledger, @reported)

  @doc "Marks `n` of `dropped/1` reported."
  @spec report(t(), non_neg_integer()) :: t()
  def report(%__MODULE__{counters: {_, ledger}} = t, n) do
    :atomics.put(ledger, @reported, n)
    t
  end

  @doc "Those of `dropped/1` the link dropped (not the callers at the bound)."
  @spec lost(t()) :: non_neg_integer()
  def lost(%__MODULE__{lost: lost}), do: lost

  @doc "Puts `item` at the end of the queue."
  @spec enqueue(t(), item()) :: t()
  def enqueue(%__MODULE__{} = t, item), do: %{t | queue: :queue.in(item, t.queue)}

  @doc """
  Sends from the head of the queue to `relay` while there is one, the window has room
  and the distribution buffer takes them.
  """
  @spec pump(t(), pid() | nil) :: t()
  def pump(%__MODULE__{} = t, nil), do: t
  def pump(%__MODULE__{retry: retry} = t, _relay) when retry != nil, do: t

  def pump(%__MODULE__{} = t, relay) do
    case :queue.peek(t.queue) do
      :empty ->
        t

      {:value, {:dispatch, _topic, _message}} when t.sent - t.acked >= @window ->
        t

      {:value, item} ->
        # `sent` is shared before the send: a link killed between the two is taken to
        # have sent it, and the relay's count tells its successor whether it arrived.
        dispatch? = elem(item, 0) == :dispatch
        if dispatch?, do: put_sent(t, t.sent + 1)

        case :erlang.send(relay, wire(item), [:nosuspend, :noconnect]) do
          :ok ->
            t = %{t | queue: :queue.drop(t.queue)}
            t = if dispatch?, do: %{t | sent: t.sent + 1}, else: t
            pump(t, relay)

          # Busy distribution buffer; or the node is gone, and the relay's monitor says
          # so shortly. Either way the message stays first in the queue.
          _ ->
            if dispatch?, do: put_sent(t, t.sent)
            %{t | retry: Process.send_after(self(), :retry, @retry_ms)}
        end
    end
  end

  defp put_sent(%__MODULE__{counters: {gen, _}}, sent), do: :atomics.put(gen, @sent, sent)

  defp wire({:dispatch, topic, message}), do: {:"$ex_atlas_remote", self(), topic, message}
  defp wire({:sync, reply_to, ref}), do: {:"$ex_atlas_sync", reply_to, ref}

  @doc "The link's `:retry` message: sends to `relay` again."
  @spec retry(t(), pid() | nil) :: t()
  def retry(%__MODULE__{} = t, relay), do: pump(%{t | retry: nil}, relay)

  @doc "The relay acknowledged `n` dispatches in all (a later count covers an earlier one)."
  @spec ack(t(), non_neg_integer()) :: t()
  def ack(%__MODULE__{} = t, n) do
    n = min(n, t.sent)

    if n > t.acked do
      {gen, _} = t.counters
      :atomics.put(gen, @acked, n)
      :atomics.sub(gen, @queued, n - t.acked)
      %{t | acked: n}
    else
      t
    end
  end

  @doc """
  A relay welcomed the link with its count of the link's dispatches it received: those
  sent and not received are dropped, and the counting starts again from its count.
  """
  @spec resume(t(), non_neg_integer()) :: t()
  def resume(%__MODULE__{} = t, received) do
    # A relay whose count is below what it acknowledged belongs to a new cluster mode
    # there (its node restarted): of ours it has nothing beyond what it acknowledged.
    delivered = if received >= t.acked, do: min(received, t.sent), else: t.acked
    {gen, _} = t.counters
    :atomics.sub(gen, @queued, delivered - t.acked)
    t = lose(t, t.sent - delivered)
    :atomics.put(gen, @acked, received)
    :atomics.put(gen, @sent, received)
    %{t | sent: received, acked: received}
  end

  @doc "The relay departed: nothing goes out until a relay welcomes the link again."
  @spec pause(t()) :: t()
  def pause(%__MODULE__{retry: nil} = t), do: t

  def pause(%__MODULE__{retry: retry} = t) do
    _ = Process.cancel_timer(retry)
    %{t | retry: nil}
  end

  @doc "Drops every dispatch queued or sent and not acknowledged."
  @spec drop_all(t()) :: t()
  def drop_all(%__MODULE__{} = t) do
    queued = t.queue |> :queue.to_list() |> Enum.count(&(elem(&1, 0) == :dispatch))
    t = lose(t, t.sent - t.acked + queued)
    put_sent(t, t.acked)
    %{t | queue: :queue.new(), sent: t.acked}
  end

  @doc "Counts `n` dispatches the link held as dropped."
  @spec lose(t(), non_neg_integer()) :: t()
  def lose(%__MODULE__{counters: {gen, _}} = t, n) do
    :atomics.sub(gen, @queued, n)
    lose_unlinked(t, n)
  end

  @doc "Counts `n` dispatches for the node dropped before the link ran (never queued)."
  @spec lose_unlinked(t(), non_neg_integer()) :: t()
  def lose_unlinked(%__MODULE__{} = t, 0), do: t

  def lose_unlinked(%__MODULE__{counters: {_, ledger}} = t, n) do
    :atomics.add(ledger, @dropped, n)
    %{t | lost: t.lost + n}
  end
end
