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
    :ok = Config.warn_unknown_keys()
    :ok = ExAtlas.Fly.Dispatcher.LogFilter.install()
    # The owner of the once-per-start warnings' table first, so it outlives the registry.
    registry = if Config.start_registry?(), do: [ExAtlas.Fly.Dispatcher], else: []
    children = [ExAtlas.Fly.Dispatcher.Warnings | registry]
    Supervisor.start_link(children, strategy: :one_for_one, name: ExAtlas.Supervisor)
  end

  # OTP calls this on every path by which the application stops. After Application.stop/1
  # or the top supervisor giving up, the tree is down already. But when the top
  # supervisor is killed, the application master calls this at once, while the
  # dispatcher's supervisor is still shutting its children down, and kills every process
  # of the application as soon as it returns: a server killed there closes nothing, and
  # its subscribers are never told, its waiting producers never woken. The same goes for
  # a server still closing the registry of a dispatcher supervisor that was killed just
  # before the top one gave up. So let them finish first, then close whatever registry is
  # left without a server.
  @impl true
  def stop(_state) do
    deadline = System.monotonic_time(:millisecond) + @tree_shutdown_ms
    names = [ExAtlas.Fly.Dispatcher.Supervisor, ExAtlas.Fly.Dispatcher.registry_name()]

    if Enum.all?(names, &await_ours(&1, deadline)) do
      Server.close_published(:orphan)
    else
      # Still shutting down after the bound: it is about to be killed; close for it.
      Server.close_published(:any)
    end

    ExAtlas.Fly.Dispatcher.LogFilter.remove()
  end

  # True once the process registered as `name`, if it is ours, is gone.
  defp await_ours(name, deadline) do
    with pid when is_pid(pid) <- Process.whereis(name),
         # Only our own tree: a host that runs the registry in its tree keeps it.
         {:ok, :ex_atlas} <- :application.get_application(pid) do
      ref = Process.monitor(pid)
      wait = max(deadline - System.monotonic_time(:millisecond), 0)

      receive do
        {:DOWN, ^ref, :process, ^pid, _reason} -> true
      after
        wait ->
          Process.demonitor(ref, [:flush])
          false
      end
    else
      _ -> true
    end
  end
end
