defmodule ExAtlas.Fly.Dispatcher.Cluster.Switch do
  @moduledoc false
  # Turns forwarding on when cluster mode starts: the first child of its supervisor.
  #
  # Nothing turns it off while the dispatcher runs: when this process, or any other of
  # cluster mode, dies (killed, crashed, or stopped by its supervisor's restart), the
  # dispatches meanwhile go on to the links' rows, and the links that take the dead
  # ones' places settle them (delivered or counted as dropped). A dispatcher that starts
  # again begins with forwarding off (`ExAtlas.Fly.Dispatcher.Supervisor`), and its
  # fresh registry has no relay until cluster mode's relay sets itself.

  use GenServer

  alias ExAtlas.Fly.Dispatcher.{Cluster, Server}

  @spec start_link(keyword()) :: GenServer.on_start()
  def start_link(opts), do: GenServer.start_link(__MODULE__, opts)

  @impl true
  def init(opts) do
    dispatcher = Server.lookup() || raise ArgumentError, "no registry runs"
    Cluster.enable(Keyword.fetch!(opts, :cluster_queue), Keyword.get(opts, :replay, 0) > 0)
    {:ok, dispatcher}
  end
end
