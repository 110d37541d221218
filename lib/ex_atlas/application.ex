defmodule ExAtlas.Application do
  @moduledoc false
  use Application

  alias ExAtlas.Fly.Dispatcher.Config
  alias ExAtlas.Fly.Dispatcher.Server

  # How long `stop/1` lets the dispatcher's tree finish its own shutdown: the server's
  # shutdown time (10 s) plus the watchdog's (5 s) and a margin.
  @tree_shutdown_ms 20_000

  @impl true
  def start(_type, _args) do
    children = if Config.start_registry?(), do: [ExAtlas.Fly.Dispatcher], else: []
    Supervisor.start_link(children, strategy: :one_for_one, name: ExAtlas.Supervisor)
  end

  # OTP calls this on every path by which the application stops. After Application.stop/1
  # or the top supervisor giving up, the tree is down already. But when the top
  # supervisor is killed, the application master calls this at once, while the
  # dispatcher's supervisor is still shutting its children down, and kills every process
  # of the application as soon as it returns: a server killed there closes nothing, and
  # its subscribers are never told, its waiting producers never woken. So let the tree
  # finish first, then close whatever registry is left without a server.
  @impl true
  def stop(_state) do
    case await_tree() do
      :down -> Server.close_orphan()
      # Still shutting down after the bound: it is about to be killed; close for it.
      :stuck -> Server.close_published()
    end
  end

  defp await_tree do
    with pid when is_pid(pid) <- Process.whereis(ExAtlas.Fly.Dispatcher.Supervisor),
         # Only our own tree: a host that runs the registry in its tree keeps it.
         {:ok, :ex_atlas} <- :application.get_application(pid) do
      ref = Process.monitor(pid)

      receive do
        {:DOWN, ^ref, :process, ^pid, _reason} -> :down
      after
        @tree_shutdown_ms ->
          Process.demonitor(ref, [:flush])
          :stuck
      end
    else
      _ -> :down
    end
  end
end
