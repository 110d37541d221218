defmodule ExAtlas.Fly.Dispatcher.Warnings do
  @moduledoc false
  # Warnings about settings and options that do nothing where they are used (`replay:` in
  # the `{:mfa, _}` mode, `subscribe_with_backpressure/2` outside `:registry` mode, ...)
  # are logged once per start of the `:ex_atlas` application, not once per call: a host
  # that subscribes from every LiveView mount would otherwise log one per mount.
  #
  # The keys already warned about live in a public ETS table owned by this process, the
  # first child of the application's top supervisor: a new start of the application is a
  # new table, so each warning comes again once. `:ets.insert_new/2` makes "once" exact
  # under concurrent first calls. Without the application (`mix run --no-start`) there
  # is no table, and every call warns.

  use Agent

  @table __MODULE__

  @doc "Starts the owner of the table, linked to the caller."
  @spec start_link(keyword()) :: Agent.on_start()
  def start_link(_opts) do
    Agent.start_link(
      fn -> :ets.new(@table, [:named_table, :public, :set, read_concurrency: true]) end,
      name: __MODULE__
    )
  end

  @doc """
  Calls `log` (which logs the warning) unless a warning under `key` was logged since the
  application started; returns `:ok`.
  """
  @spec once(term(), (() -> any())) :: :ok
  def once(key, log) do
    first? =
      try do
        :ets.lookup(@table, key) == [] and :ets.insert_new(@table, {key})
      rescue
        # No table: the application is not running.
        ArgumentError -> true
      end

    if first?, do: log.()
    :ok
  end
end
