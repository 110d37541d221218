defmodule ExAtlas.Fly.Dispatcher.Cluster.Supervisor do
  @moduledoc false
  # Runs cluster mode (see `Cluster`). Its children, `:rest_for_one`:
  #
  #   * `Switch` turns forwarding on; no death or restart of cluster mode's processes
  #     turns it off, so nothing is skipped uncounted meanwhile;
  #   * the links' supervisor: one `Link` per other node, which outlives restarts of
  #     the scope and of the relay, so that what it holds is never lost uncounted;
  #   * the `:pg` scope, and the relay (a new scope needs a relay that joins again).
  #
  # The ETS tables of cluster mode (described in `Cluster`) belong to the dispatcher's
  # supervisor, above this one (`Cluster.create_tables/0`), so that a restarted child,
  # or this supervisor restarted, finds them: a link that takes a dead one's place
  # settles what that one held from its row.

  use Supervisor

  alias ExAtlas.Fly.Dispatcher.Cluster
  alias ExAtlas.Fly.Dispatcher.Cluster.{Relay, Switch}

  @doc """
  Starts cluster mode; `opts`: `cluster_queue` (messages queued per node at most) and
  `replay` (this node's `replay`).
  """
  @spec start_link(keyword()) :: Supervisor.on_start()
  def start_link(opts), do: Supervisor.start_link(__MODULE__, opts, name: __MODULE__)

  @impl true
  def init(opts) do
    # A supervisor before this one that was killed leaves its named children stopping
    # (they trap exits): their names are free once they are gone.
    Enum.each([Relay, Cluster.scope(), Cluster.link_supervisor()], &await_gone/1)

    children = [
      {Switch, opts},
      {DynamicSupervisor, name: Cluster.link_supervisor(), strategy: :one_for_one},
      %{id: :pg, start: {:pg, :start_link, [Cluster.scope()]}},
      {Relay, opts}
    ]

    Supervisor.init(children, strategy: :rest_for_one)
  end

  @await_gone_ms 5_000

  defp await_gone(name) do
    with pid when is_pid(pid) <- Process.whereis(name) do
      ref = Process.monitor(pid)

      receive do
        {:DOWN, ^ref, :process, ^pid, _reason} -> :ok
      after
        @await_gone_ms -> Process.demonitor(ref, [:flush])
      end
    end

    :ok
  end
end
