defmodule ExAtlas.Test.LogForwarder do
  @moduledoc """
  A `:logger` handler that sends every event it gets to a process, as `{:log, event}`:
  for tests that must see what is logged in another process or on another node (a peer
  started by `ExAtlas.Test.Cluster`, which has this module on its code path).

      :logger.add_handler(:id, ExAtlas.Test.LogForwarder, %{level: :error, config: %{to: self()}})
  """

  @doc """
  For the current test: forwards every event at `level` or above, logged by any process
  of this VM, to the test process; the handler goes when the test exits.
  """
  @spec forward_to_test(:logger.level()) :: :ok
  def forward_to_test(level \\ :all) do
    id = :"log_forwarder_#{System.unique_integer([:positive])}"
    :ok = :logger.add_handler(id, __MODULE__, %{level: level, config: %{to: self()}})
    ExUnit.Callbacks.on_exit(fn -> :logger.remove_handler(id) end)
  end

  @doc false
  @spec log(:logger.log_event(), :logger.handler_config()) :: term()
  def log(event, %{config: %{to: pid}}), do: send(pid, {:log, event})
end
