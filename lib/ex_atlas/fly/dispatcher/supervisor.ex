defmodule ExAtlas.Fly.Dispatcher.Supervisor do
  @moduledoc false
  # What `ExAtlas.Fly.Dispatcher.child_spec/1` starts, in the `:ex_atlas` application's tree
  # or in a host's: the registry (`Server`) and the slow-consumer `Watchdog`, so the
  # watchdog runs wherever the registry runs.
  #
  # `:one_for_one`: each survives the other's crash. The registry outlives a crash of the
  # server (a restarted one adopts it), and the watches live in an ETS table owned by
  # this supervisor, so a restarted watchdog resumes them. If this supervisor dies, the
  # server closes the registry (telling every subscriber) and the table goes with it:
  # the next start is a fresh, empty registry. If it gives up restarting a crashing
  # server (restart intensity), the `Closer`, started first and so stopped last, closes
  # the registry the dead server left: registry and watches end together, and the
  # subscribers are told, rather than a restarted tree adopting subscriptions whose
  # watches are gone.

  use Supervisor

  require Logger

  alias ExAtlas.Fly.Dispatcher.{Closer, Cluster, Config, Server, Watchdog}

  @doc """
  Starts the registry and the watchdog; `:ignore` when they already run (a host that lists
  `ExAtlas.Fly.Dispatcher` while the `:ex_atlas` application started it keeps the running
  one). Options given then cannot take effect: a warning names them.
  """
  @spec start_link(keyword()) :: Supervisor.on_start() | :ignore
  def start_link(opts) do
    case Supervisor.start_link(__MODULE__, opts, name: __MODULE__) do
      {:error, {:already_started, pid}} ->
        warn_ignored(opts, pid)
        :ignore

      other ->
        other
    end
  end

  defp warn_ignored([], _pid), do: :ok

  defp warn_ignored(opts, pid) do
    owner =
      case :application.get_application(pid) do
        {:ok, :ex_atlas} ->
          "the :ex_atlas application's (set `config :ex_atlas, :fly, enabled: false` to " <>
            "run the registry in your own tree with these options, or move them to " <>
            "`config :ex_atlas, :fly`)"

        _ ->
          "the one started earlier (#{inspect(pid)})"
      end

    Logger.warning(
      "[ExAtlas.Fly.Dispatcher] a registry already runs, so the child options " <>
        "#{inspect(opts)} are ignored and it keeps its own settings: it is #{owner}"
    )
  end

  @impl true
  def init(opts) do
    :ok = Watchdog.create_table()
    # Forwarding as a cluster mode before this start left it (see `Cluster.Switch`).
    :ok = Cluster.disable()

    children = [
      %{id: Closer, start: {Closer, :start_link, [[]]}, type: :worker},
      %{id: Server, start: {Server, :start_link, [opts]}, type: :worker, shutdown: 10_000},
      %{id: Watchdog, start: {Watchdog, :start_link, [[]]}, type: :worker}
    ]

    # Cluster mode, read when the registry starts: the :pg scope and this node's relay.
    # With replay on here, every dispatch goes to every node that runs cluster mode, so
    # that each node's history has it.
    children =
      if Keyword.get_lazy(opts, :cluster, &Config.cluster?/0) do
        :ok = Cluster.create_tables()
        queue = Keyword.get_lazy(opts, :cluster_queue, &Config.cluster_queue/0)
        replay = Config.replay(opts)

        children ++
          [
            %{
              id: Cluster.Supervisor,
              start: {Cluster.Supervisor, :start_link, [[cluster_queue: queue, replay: replay]]},
              type: :supervisor
            }
          ]
      else
        children
      end

    Supervisor.init(children, strategy: :one_for_one)
  end
end
