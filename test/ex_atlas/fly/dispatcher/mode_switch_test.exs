defmodule ExAtlas.Fly.Dispatcher.ModeSwitchTest do
  # The mode is read on every call, so it can be switched at runtime, in both directions:
  # a registry that runs keeps its subscriptions while another mode is in use, and an
  # application booted in another mode starts the registry on the first call that needs
  # it, once, however many callers make that first call at the same time. Every "not
  # running" error names its real cause. These restart the application: run alone.
  use ExUnit.Case, async: false

  import ExAtlas.Test.FlyEnv

  alias ExAtlas.Fly.Dispatcher
  alias ExAtlas.Fly.Dispatcher.Server

  @doc false
  def forward(topic, message, pid), do: send(pid, {:via_mfa, topic, message})

  defp dispatcher_children do
    for {Dispatcher, pid, :supervisor, _} <- Supervisor.which_children(ExAtlas.Supervisor),
        do: pid
  end

  test ":registry -> {:mfa, _} -> :registry keeps the subscriptions of the running registry" do
    topic = unique_topic("switch")
    :ok = Dispatcher.subscribe(topic)
    dispatcher = Server.lookup()

    put_fly(dispatcher: {:mfa, {__MODULE__, :forward, [self()]}})
    :ok = Dispatcher.dispatch(topic, :to_mfa)
    assert_received {:via_mfa, ^topic, :to_mfa}

    put_fly(dispatcher: :registry)
    assert Server.lookup() == dispatcher
    assert Dispatcher.count(topic) == 1
    :ok = Dispatcher.dispatch(topic, :to_registry)
    :ok = Dispatcher.sync()
    assert_received :to_registry
    refute_received :to_mfa
    :ok = Dispatcher.unsubscribe(topic)
  end

  describe "booted in {:mfa, _}" do
    setup do
      restart_app(dispatcher: {:mfa, {__MODULE__, :forward, [self()]}})
      assert Server.lookup() == nil
      assert dispatcher_children() == []
      :ok
    end

    test "switching to :registry starts it once, under concurrent first calls" do
      put_fly(dispatcher: :registry)
      parent = self()
      topic = unique_topic("on_demand")

      # 16 processes make their first call at once, half of them a dispatch (the NIF's
      # own lookup path), half a subscribe; each reports the registry it saw.
      tasks =
        for i <- 1..16 do
          Task.async(fn ->
            receive do: (:go -> :ok)

            if rem(i, 2) == 0,
              do: :ok = Dispatcher.dispatch(topic, :early),
              else: :ok = Dispatcher.subscribe(topic)

            send(parent, {:saw, Server.lookup()})
          end)
        end

      Enum.each(tasks, &send(&1.pid, :go))
      Enum.each(tasks, &Task.await/1)

      assert [_one] = dispatcher_children()
      dispatcher = Server.lookup()
      assert dispatcher != nil
      for _ <- 1..16, do: assert_receive({:saw, ^dispatcher})

      # It works, and so does the watchdog started with it.
      :ok = Dispatcher.subscribe_with_backpressure(topic, threshold: 1_000)
      :ok = Dispatcher.dispatch(topic, :late)
      :ok = Dispatcher.sync()
      assert_received :late
      assert Dispatcher.count(topic) == 1

      # Back to the MFA and to :registry again: the same registry.
      put_fly(dispatcher: {:mfa, {__MODULE__, :forward, [self()]}})
      :ok = Dispatcher.dispatch(topic, :mfa_again)
      assert_received {:via_mfa, ^topic, :mfa_again}
      put_fly(dispatcher: :registry)
      assert Server.lookup() == dispatcher
      assert [_one] = dispatcher_children()
    end

    test "a first call that is a dispatch starts it too" do
      put_fly(dispatcher: :registry)
      assert :ok = Dispatcher.dispatch(unique_topic("first_dispatch"), :m)
      assert Server.lookup() != nil
    end

    test "with enabled: false nothing starts, and the error says so" do
      put_fly(dispatcher: :registry, enabled: false)
      error = assert_raise ArgumentError, fn -> Dispatcher.subscribe("t") end
      assert error.message =~ "`config :ex_atlas, :fly, enabled: false` is set"
      error = assert_raise ArgumentError, fn -> Dispatcher.dispatch("t", :m) end
      assert error.message =~ "enabled: false"
      assert dispatcher_children() == []
    end
  end

  test "without the application the error says to start it" do
    stop_app()
    on_exit(fn -> :ok = Application.ensure_started(:ex_atlas) end)

    for call <- [fn -> Dispatcher.subscribe("t") end, fn -> Dispatcher.dispatch("t", :m) end] do
      error = assert_raise ArgumentError, call
      assert error.message =~ "the :ex_atlas application is not started"
    end

    error = assert_raise ArgumentError, fn -> Dispatcher.subscribe_with_backpressure("t") end
    assert error.message =~ "the :ex_atlas application is not started"
    # Nothing was started on demand without the application.
    assert Server.lookup() == nil
  end
end
