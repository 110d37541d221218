defmodule ExAtlas.Fly.Dispatcher.Cluster.Switch do
  @moduledoc false
  # Forwarding is on while cluster mode's supervisor runs: the first child, so it stops
  # last and turns forwarding (and the NIF's relay) off only when all of cluster mode
  # stops, never while the relay or the scope restarts.

  use GenServer

  alias ExAtlas.Fly.Dispatcher.{Cluster, Native, Server}

  @spec start_link(keyword()) :: GenServer.on_start()
  def start_link(opts), do: GenServer.start_link(__MODULE__, opts)

  @impl true
  def init(opts) do
    Process.flag(:trap_exit, true)
    dispatcher = Server.lookup() || raise ArgumentError, "no registry runs"
    Cluster.enable(Keyword.fetch!(opts, :cluster_queue), Keyword.get(opts, :replay, 0) > 0)
    {:ok, dispatcher}
  end

  # Off only when cluster mode stops (its supervisor shuts this down): crashed, this is
  # restarted at once, and dispatches meanwhile still go to the links.
  @impl true
  def terminate(reason, dispatcher) when reason == :shutdown or elem(reason, 0) == :shutdown do
    Cluster.disable()
    if Server.lookup() == dispatcher, do: Native.set_relay(dispatcher, :undefined)
  end

  def terminate(_reason, _dispatcher), do: :ok
end
