defmodule ExAtlas.Test.TelemetryStandIn do
  @moduledoc """
  A stand-in for the part of `:telemetry` that ExAtlas and its tests use.

  `:telemetry` cannot be installed here (no hex), so tests define a module named
  `:telemetry` at runtime that delegates to this one (see
  `ExAtlas.Test.FlyEnv.define_telemetry/0`), as they define `Phoenix.PubSub`. The
  functions follow `:telemetry` 1.x:

    * `execute(event, measurements, metadata)` calls every handler attached to `event`,
      in the emitting process, as `handler.(event, measurements, metadata, config)`;
      both maps are required, as `:telemetry.execute/3`'s guard requires them. A handler
      that raises, throws or exits is detached and never reaches the emitter;
    * `attach(id, event, handler, config)` and `attach_many(id, events, handler, config)`
      return `:ok`, or `{:error, :already_exists}` for a used id;
    * `detach(id)` returns `:ok`, or `{:error, :not_found}`.

  Handlers live in a public ETS table owned by the process `start_link/1` starts; with
  no table, `execute/3` does nothing, as `:telemetry` with no handler attached.
  """

  use Agent

  @table __MODULE__

  @doc "Starts the owner of the handler table."
  @spec start_link(keyword()) :: Agent.on_start()
  def start_link(_opts) do
    Agent.start_link(fn -> :ets.new(@table, [:bag, :public, :named_table]) end)
  end

  @doc "`:telemetry.execute/3`."
  @spec execute([atom()], map(), map()) :: :ok
  def execute(event, measurements, metadata)
      when is_list(event) and is_map(measurements) and is_map(metadata) do
    for {^event, id, handler, config} <- handlers(event) do
      try do
        handler.(event, measurements, metadata, config)
      catch
        _kind, _reason -> detach(id)
      end
    end

    :ok
  end

  @doc "`:telemetry.attach/4`."
  @spec attach(term(), [atom()], function(), term()) :: :ok | {:error, :already_exists}
  def attach(id, event, handler, config), do: attach_many(id, [event], handler, config)

  @doc "`:telemetry.attach_many/4`."
  @spec attach_many(term(), [[atom()]], function(), term()) :: :ok | {:error, :already_exists}
  def attach_many(id, events, handler, config) when is_function(handler, 4) do
    if :ets.match_object(@table, {:_, id, :_, :_}) == [] do
      :ets.insert(@table, for(event <- events, do: {event, id, handler, config}))
      :ok
    else
      {:error, :already_exists}
    end
  end

  @doc "`:telemetry.detach/1`."
  @spec detach(term()) :: :ok | {:error, :not_found}
  def detach(id) do
    case :ets.select_delete(@table, [{{:_, id, :_, :_}, [], [true]}]) do
      0 -> {:error, :not_found}
      _ -> :ok
    end
  end

  @doc """
  Attaches a handler that sends `{:telemetry, event, measurements, metadata}` to the
  calling process for each of `events`; returns the handler id.
  """
  @spec capture([[atom()]]) :: reference()
  def capture(events) do
    id = make_ref()
    :ok = attach_many(id, events, &__MODULE__.send_event/4, self())
    id
  end

  @doc false
  @spec send_event([atom()], map(), map(), pid()) :: :ok
  def send_event(event, measurements, metadata, pid) do
    send(pid, {:telemetry, event, measurements, metadata})
    :ok
  end

  defp handlers(event) do
    :ets.lookup(@table, event)
  rescue
    # No table: nothing attached.
    ArgumentError -> []
  end
end
