defmodule ExAtlas.Fly.Dispatcher.Supervisor do
  @moduledoc false
  # What `ExAtlas.Fly.Dispatcher.child_spec/1` starts, in the `:ex_atlas` application's tree
  # or in a host's: the registry (`Server`) and, after it, the slow-consumer `Watchdog`, so
  # the watchdog runs wherever the registry runs.
  #
  # `:rest_for_one`: a restarted registry is a new, empty one, so the watches of the old
  # one are restarted (emptied) with it; a watchdog crash leaves the registry alone.

  use Supervisor

  alias ExAtlas.Fly.Dispatcher.{Server, Watchdog}

  @doc """
  Starts the registry and the watchdog; `:ignore` when they already run (a host that lists
  `ExAtlas.Fly.Dispatcher` while the `:ex_atlas` application started it keeps the running
  one).
  """
  @spec start_link(keyword()) :: Supervisor.on_start() | :ignore
  def start_link(opts) do
    case Supervisor.start_link(__MODULE__, opts, name: __MODULE__) do
      {:error, {:already_started, _pid}} -> :ignore
      other -> other
    end
  end

  @impl true
  def init(opts) do
    children = [
      %{id: Server, start: {Server, :start_link, [opts]}, type: :worker, shutdown: 10_000},
      %{id: Watchdog, start: {Watchdog, :start_link, [[]]}, type: :worker}
    ]

    Supervisor.init(children, strategy: :rest_for_one)
  end
end
