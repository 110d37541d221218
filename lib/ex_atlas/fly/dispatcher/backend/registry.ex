defmodule ExAtlas.Fly.Dispatcher.Backend.Registry do
  @moduledoc false
  # The default mode: the Rust NIF registry with fan-out on its own sender threads.

  @behaviour ExAtlas.Fly.Dispatcher.Backend

  alias ExAtlas.Fly.Dispatcher.{Native, Server}

  @sync_tag :"$ex_atlas_fly_dispatcher_synced"

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
    settle(Native.dispatch(dispatcher!(), topic, message))
  end

  @impl true
  def sync(_arg) do
    ref = make_ref()
    settle(Native.sync(dispatcher!(), {@sync_tag, ref}))

    receive do
      {@sync_tag, ^ref} -> :ok
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
    Server.lookup() || raise not_started()
  end

  # A full queue hands back the jobs that did not fit: push them from a dirty I/O
  # scheduler, where waiting for room blocks only this caller.
  defp settle(:ok), do: :ok
  defp settle({:full, pending}), do: settle(Native.push_pending(pending))
  defp settle(:closed), do: raise(not_started())

  defp not_started do
    ArgumentError.exception(
      "the ExAtlas.Fly.Dispatcher registry is not running: start the :ex_atlas " <>
        "application (and leave `config :ex_atlas, :fly, enabled: false` unset), or add " <>
        "ExAtlas.Fly.Dispatcher to your supervision tree"
    )
  end
end
