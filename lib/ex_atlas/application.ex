defmodule ExAtlas.Application do
  @moduledoc false
  use Application

  alias ExAtlas.Fly.Dispatcher.Config

  @impl true
  def start(_type, _args) do
    children = if Config.start_registry?(), do: [ExAtlas.Fly.Dispatcher], else: []
    Supervisor.start_link(children, strategy: :one_for_one, name: ExAtlas.Supervisor)
  end
end
