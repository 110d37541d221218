defmodule ExAtlas.Fly.Dispatcher.Server do
  @moduledoc false
  # Owns the NIF dispatcher: creates it, publishes it in :persistent_term so callers reach
  # it without a message round trip, and closes it (threads stop, monitors go) on exit.

  use GenServer

  alias ExAtlas.Fly.Dispatcher.{Config, Native}

  @key {__MODULE__, :dispatcher}

  @spec start_link(keyword()) :: GenServer.on_start() | :ignore
  def start_link(opts) do
    name = Keyword.get(opts, :name, ExAtlas.Fly.Dispatcher.registry_name())

    case GenServer.start_link(__MODULE__, opts, name: name) do
      # A host that also lists the dispatcher in its own tree while `:ex_atlas` started
      # one keeps running on the existing registry.
      {:error, {:already_started, _pid}} -> :ignore
      other -> other
    end
  end

  @doc "The running dispatcher resource, or nil."
  @spec lookup() :: Native.dispatcher() | nil
  def lookup, do: :persistent_term.get(@key, nil)

  @impl true
  def init(opts) do
    Process.flag(:trap_exit, true)
    threads = Keyword.get_lazy(opts, :sender_threads, &Config.sender_threads/0)
    capacity = Keyword.get_lazy(opts, :queue_capacity, &Config.queue_capacity/0)
    dispatcher = Native.new(threads, capacity)
    :persistent_term.put(@key, dispatcher)
    {:ok, dispatcher}
  end

  @impl true
  def handle_call(:dispatcher, _from, dispatcher), do: {:reply, dispatcher, dispatcher}

  @impl true
  def terminate(_reason, dispatcher) do
    if lookup() == dispatcher, do: :persistent_term.erase(@key)
    Native.close(dispatcher)
  end
end
