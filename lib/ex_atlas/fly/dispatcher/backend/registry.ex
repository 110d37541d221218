defmodule ExAtlas.Fly.Dispatcher.Backend.Registry do
  @moduledoc false
  # The default mode: the Rust NIF registry, with fan-out by one sender process per lane.

  @behaviour ExAtlas.Fly.Dispatcher.Backend

  alias ExAtlas.Fly.Dispatcher.{Native, Sender, Server}

  @impl true
  def subscribe(topic, _arg) do
    case Native.subscribe(dispatcher!(), topic) do
      :ok -> :ok
      :closed -> raise not_started()
      :too_many_topics -> raise ArgumentError, "the registry holds too many topics (2^32)"
    end
  end

  @impl true
  def unsubscribe(topic, _arg) do
    :ok = Native.unsubscribe(dispatcher!(), topic)
  end

  @impl true
  def dispatch(topic, message, _arg) do
    dispatcher = dispatcher!()

    case Native.dispatch(dispatcher, topic, message) do
      :ok ->
        :ok

      # A full lane hands back the batches that did not fit: hand them over from a
      # dirty I/O scheduler, where waiting for room blocks only this caller.
      {:full, pending} ->
        settle(Native.push_pending(dispatcher, pending, message))

      :closed ->
        raise not_started()
    end
  end

  # Every sender handles a caller's requests in the order the caller made them, so once
  # each has answered, everything the caller dispatched before is delivered.
  @impl true
  def sync(_arg) do
    {_dispatcher, senders} = running!()
    tag = Sender.synced_tag()

    # One ref and one monitor per sender, matched exactly: the caller's own messages
    # (a host's :DOWN messages included) stay in its mailbox untouched.
    waits =
      for sender <- Tuple.to_list(senders) do
        ref = make_ref()
        monitor = Process.monitor(sender)
        :ok = Sender.request_sync(sender, ref)
        {ref, monitor}
      end

    try do
      Enum.each(waits, fn {ref, monitor} ->
        receive do
          {^tag, ^ref} -> :ok
          {:DOWN, ^monitor, :process, _, _} -> raise not_started()
        end
      end)
    after
      Enum.each(waits, fn {_ref, monitor} -> Process.demonitor(monitor, [:flush]) end)
    end
  end

  @impl true
  def count(topic, _arg), do: Native.count(dispatcher!(), topic)

  @impl true
  def subscribers(topic, _arg), do: Native.subscribers(dispatcher!(), topic)

  @doc """
  Removes every subscription of `pid` to `topic`; returns how many went.
  """
  @spec evict(binary(), pid()) :: non_neg_integer()
  def evict(topic, pid), do: Native.unsubscribe_pid(dispatcher!(), topic, pid)

  @doc "Registry and queue figures reported by the NIF."
  @spec stats() :: %{atom() => non_neg_integer()}
  def stats, do: Map.new(Native.stats(dispatcher!()))

  @doc "The running dispatcher resource; raises `ArgumentError` when none runs."
  @spec dispatcher!() :: Native.dispatcher()
  def dispatcher! do
    {dispatcher, _senders} = running!()
    dispatcher
  end

  defp running!, do: Server.lookup() || raise(not_started())

  defp settle(:ok), do: :ok
  defp settle(:closed), do: raise(not_started())

  defp not_started do
    ArgumentError.exception(
      "the ExAtlas.Fly.Dispatcher registry is not running: start the :ex_atlas " <>
        "application (and leave `config :ex_atlas, :fly, enabled: false` unset), or add " <>
        "ExAtlas.Fly.Dispatcher to your supervision tree"
    )
  end
end
