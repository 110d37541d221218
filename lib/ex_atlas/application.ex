defmodule ExAtlas.Application do
  @moduledoc false
  use Application

  alias ExAtlas.Fly.Dispatcher.Config

  @impl true
  def start(_type, _args) do
    children = if Config.start_registry?(), do: [ExAtlas.Fly.Dispatcher], else: []
    Supervisor.start_link(children, strategy: :one_for_one, name: ExAtlas.Supervisor)
  end

  # A registry whose server died for good (its supervisor gave up restarting it) is still
  # published; close it so its subscribers and waiting producers are told.
  @impl true
  def stop(_state), do: ExAtlas.Fly.Dispatcher.Server.close_orphan()
end
