defmodule ExAtlas.Fly.Dispatcher.Server do
  @moduledoc false
  # Owns the NIF dispatcher and its sender processes: creates them, publishes them in
  # :persistent_term so callers reach them without a message round trip, and closes the
  # dispatcher (monitors released, waiting dispatchers woken) when it stops.

  use GenServer

  alias ExAtlas.Fly.Dispatcher.{Config, Native, Sender}

  @key {__MODULE__, :dispatcher}

  @spec start_link(keyword()) :: GenServer.on_start() | :ignore
  def start_link(opts) do
    case GenServer.start_link(__MODULE__, opts, name: ExAtlas.Fly.Dispatcher.registry_name()) do
      # A host that also lists the dispatcher in its own tree while `:ex_atlas` started
      # one keeps running on the existing registry.
      {:error, {:already_started, _pid}} -> :ignore
      other -> other
    end
  end

  @doc "The running dispatcher and its senders (a tuple, one per lane), or nil."
  @spec lookup() :: {Native.dispatcher(), tuple()} | nil
  def lookup, do: :persistent_term.get(@key, nil)

  @impl true
  def init(opts) do
    Process.flag(:trap_exit, true)
    lanes = Keyword.get_lazy(opts, :sender_threads, &Config.sender_threads/0)
    capacity = Keyword.get_lazy(opts, :queue_capacity, &Config.queue_capacity/0)
    delivery = Keyword.get_lazy(opts, :delivery, &Config.delivery/0)
    dispatcher = Native.new(lanes, capacity)

    senders =
      for _ <- 1..lanes do
        {:ok, pid} = Sender.start_link({dispatcher, delivery})
        pid
      end

    :ok = Native.set_senders(dispatcher, senders)
    published = {dispatcher, List.to_tuple(senders)}
    :persistent_term.put(@key, published)
    {:ok, published}
  end

  @impl true
  def handle_info({:EXIT, _pid, reason}, state), do: {:stop, reason, state}

  @impl true
  def terminate(_reason, {dispatcher, _senders} = published) do
    if lookup() == published, do: :persistent_term.erase(@key)
    Native.close(dispatcher)
  end
end
