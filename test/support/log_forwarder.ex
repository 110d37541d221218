defmodule ExAtlas.Test.LogForwarder do
  @moduledoc """
  A `:logger` handler that sends every event it gets to a process, as `{:log, event}`:
  for tests that must see what is logged in another process or on another node (a peer
  started by `ExAtlas.Test.Cluster`, which has this module on its code path).

      :logger.add_handler(:id, ExAtlas.Test.LogForwarder, %{level: :error, config: %{to: self()}})
  """

  @doc false
  @spec log(:logger.log_event(), :logger.handler_config()) :: term()
  def log(event, %{config: %{to: pid}}), do: send(pid, {:log, event})
end
