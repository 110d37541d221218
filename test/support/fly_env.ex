defmodule ExAtlas.Test.FlyEnv do
  @moduledoc """
  Helpers for tests that change `config :ex_atlas, :fly`, restart the `:ex_atlas`
  application or define a `Phoenix.PubSub` or `:telemetry` module at runtime.

  Every change is undone in an `ExUnit.Callbacks.on_exit/1` callback, so the functions
  must be called from a test process (or a `setup` block), and modules using them must be
  `async: false`.
  """

  import ExUnit.Callbacks, only: [on_exit: 1]

  alias ExAtlas.Test.{PubSubStandIn, TelemetryStandIn}

  @doc """
  Merges `settings` into `config :ex_atlas, :fly` for the current test; the previous
  value comes back when the test exits.
  """
  @spec put_fly(keyword()) :: :ok
  def put_fly(settings) do
    previous = Application.fetch_env(:ex_atlas, :fly)
    on_exit(fn -> restore(previous) end)
    Application.put_env(:ex_atlas, :fly, Keyword.merge(current(), settings))
  end

  @doc """
  Stops the `:ex_atlas` application, merges `settings` into `config :ex_atlas, :fly` and
  starts it again. When the test exits, the previous settings come back and the
  application is restarted with them.
  """
  @spec restart_app(keyword()) :: :ok
  def restart_app(settings \\ []) do
    previous = Application.fetch_env(:ex_atlas, :fly)

    on_exit(fn ->
      stop_app()
      restore(previous)
      :ok = Application.ensure_started(:ex_atlas)
    end)

    stop_app()
    Application.put_env(:ex_atlas, :fly, Keyword.merge(current(), settings))
    :ok = Application.ensure_started(:ex_atlas)
  end

  @doc "Stops the `:ex_atlas` application without the \"exited: :stopped\" log line."
  @spec stop_app() :: :ok
  def stop_app do
    ExUnit.CaptureLog.capture_log(fn -> Application.stop(:ex_atlas) end)
    :ok
  end

  @doc """
  Defines a `Phoenix.PubSub` module that delegates to `ExAtlas.Test.PubSubStandIn`,
  starts a stand-in server named `name` and removes both when the test exits.
  """
  @spec define_phoenix_pubsub(atom()) :: :ok
  def define_phoenix_pubsub(name) do
    on_exit(&remove_phoenix_pubsub/0)

    body =
      quote do
        @moduledoc false
        defdelegate subscribe(pubsub, topic, opts \\ []), to: unquote(PubSubStandIn)
        defdelegate unsubscribe(pubsub, topic), to: unquote(PubSubStandIn)

        defdelegate broadcast(pubsub, topic, message, dispatcher \\ Phoenix.PubSub),
          to: unquote(PubSubStandIn)
      end

    Module.create(Phoenix.PubSub, body, Macro.Env.location(__ENV__))
    ExUnit.Callbacks.start_supervised!({PubSubStandIn, name: name})
    :ok
  end

  @doc "Purges and deletes any loaded `Phoenix.PubSub` module."
  @spec remove_phoenix_pubsub() :: :ok
  def remove_phoenix_pubsub do
    :code.purge(Phoenix.PubSub)
    :code.delete(Phoenix.PubSub)
    :code.purge(Phoenix.PubSub)
    :ok
  end

  @doc """
  Defines a `:telemetry` module that delegates to `ExAtlas.Test.TelemetryStandIn`, starts
  its handler table and removes both when the test exits. Returns `:ok`; attach with
  `ExAtlas.Test.TelemetryStandIn.capture/1` or `:telemetry.attach/4`.
  """
  @spec define_telemetry() :: :ok
  def define_telemetry do
    on_exit(&remove_telemetry/0)

    body =
      quote do
        @moduledoc false
        defdelegate execute(event, measurements, metadata), to: unquote(TelemetryStandIn)
        defdelegate attach(id, event, handler, config), to: unquote(TelemetryStandIn)
        defdelegate attach_many(id, events, handler, config), to: unquote(TelemetryStandIn)
        defdelegate detach(id), to: unquote(TelemetryStandIn)
      end

    Module.create(:telemetry, body, Macro.Env.location(__ENV__))
    ExUnit.Callbacks.start_supervised!(TelemetryStandIn)
    :ok
  end

  @doc "Purges and deletes any loaded `:telemetry` module."
  @spec remove_telemetry() :: :ok
  def remove_telemetry do
    :code.purge(:telemetry)
    :code.delete(:telemetry)
    :code.purge(:telemetry)
    :ok
  end

  @doc """
  Calls `fun` until it returns a truthy value and returns that; raises after `timeout` ms.
  For effects that happen after a signal is handled (monitors, `DOWN`), never for timing.
  """
  @spec eventually((() -> term()), non_neg_integer()) :: term()
  def eventually(fun, timeout \\ 5_000) do
    deadline = System.monotonic_time(:millisecond) + timeout
    poll(fun, deadline)
  end

  defp poll(fun, deadline) do
    cond do
      result = fun.() ->
        result

      System.monotonic_time(:millisecond) > deadline ->
        ExUnit.Assertions.flunk("condition still false after the timeout: #{inspect(fun)}")

      true ->
        Process.sleep(5)
        poll(fun, deadline)
    end
  end

  @doc """
  A process subscribed to `topic` that does nothing else (it never reads its mailbox):
  returns once it is subscribed.
  """
  @spec spawn_subscriber(binary()) :: pid()
  def spawn_subscriber(topic) do
    parent = self()
    ref = make_ref()

    pid =
      spawn(fn ->
        :ok = ExAtlas.Fly.Dispatcher.subscribe(topic)
        send(parent, {:subscribed, ref})
        Process.sleep(:infinity)
      end)

    receive do
      {:subscribed, ^ref} -> pid
    after
      5_000 -> raise "#{inspect(pid)} did not subscribe to #{inspect(topic)}"
    end
  end

  @doc "A topic no other test uses."
  @spec unique_topic(String.t()) :: binary()
  def unique_topic(prefix \\ "test") do
    "#{prefix}:#{System.unique_integer([:positive])}"
  end

  defp current, do: Application.get_env(:ex_atlas, :fly, [])

  defp restore({:ok, value}), do: Application.put_env(:ex_atlas, :fly, value)
  defp restore(:error), do: Application.delete_env(:ex_atlas, :fly)
end
