defmodule ExAtlas.Fly.Dispatcher.Closer do
  @moduledoc false
  # The first child of `ExAtlas.Fly.Dispatcher.Supervisor`, so the last one it stops.
  #
  # A crashed server leaves its dispatcher published for the next server to adopt. When
  # the supervisor gives up restarting it (restart intensity), no server of this tree
  # will: the supervisor stops its other children and exits, and whatever restarts the
  # tree must start from a clean state, as OTP's escalation means. The watchdog's table
  # goes with the supervisor too. So, stopped with the tree, this closes a dispatcher
  # that no server owns any more: every subscriber gets the exit signal
  # `Server.closed_reason/0` and every waiting producer raises `ArgumentError`, instead
  # of a later tree adopting the subscriptions without their watches.
  #
  # On the other paths it finds nothing to do: a server stopped on purpose, or outliving
  # its supervisor, has closed the dispatcher itself.

  use GenServer

  alias ExAtlas.Fly.Dispatcher.Server

  @doc "Starts the closer, linked to the caller (the dispatcher's supervisor)."
  @spec start_link(keyword()) :: GenServer.on_start()
  def start_link(opts), do: GenServer.start_link(__MODULE__, opts)

  @impl true
  def init(_opts) do
    # terminate/2 runs when the supervisor stops us, and when it is killed.
    Process.flag(:trap_exit, true)
    {:ok, nil}
  end

  @impl true
  def handle_info(_message, state), do: {:noreply, state}

  @impl true
  def terminate(_reason, _state), do: Server.close_published(:orphan)
end
