defmodule ExAtlas.Fly.Dispatcher.ModesTest do
  # The mode is read from `config :ex_atlas, :fly, dispatcher: ...` on every call. These
  # tests change the application environment and define `Phoenix.PubSub` at runtime, so
  # they run alone.
  use ExUnit.Case, async: false

  import ExUnit.CaptureLog
  import ExAtlas.Test.FlyEnv

  alias ExAtlas.Fly.Dispatcher

  setup do
    # No test may leave a Phoenix.PubSub behind, and none may start with one.
    remove_phoenix_pubsub()
    on_exit(&remove_phoenix_pubsub/0)
    :ok
  end

  defmodule Sink do
    @moduledoc false
    # MFA targets: forward what they get to a test process, or fail in every way.

    def forward(topic, message, pid, tag), do: send(pid, {tag, topic, message})
    def raise_error(_topic, _message), do: raise(RuntimeError, "sink exploded")
    def throw_value(_topic, _message), do: throw(:sink_threw)
    def exit_process(_topic, _message), do: exit(:sink_exited)
    def bad_return(_topic, _message), do: {:error, :ignored}
  end

  describe "{:mfa, {mod, fun, extra}}" do
    test "dispatch/2 calls apply(mod, fun, [topic, message | extra]) in the caller" do
      put_fly(dispatcher: {:mfa, {Sink, :forward, [self(), :via_mfa]}})
      assert :ok = Dispatcher.dispatch("logs:app", {:ex_atlas_fly_logs, "app", []})
      # Synchronous: already there when dispatch/2 returns.
      assert_received {:via_mfa, "logs:app", {:ex_atlas_fly_logs, "app", []}}
    end

    test "dispatch/2 returns :ok whatever the function returns" do
      put_fly(dispatcher: {:mfa, {Sink, :bad_return, []}})
      assert :ok = Dispatcher.dispatch("t", :message)
    end

    test "subscribe/1 and unsubscribe/1 are no-ops returning :ok; sync/0 returns :ok" do
      put_fly(dispatcher: {:mfa, {Sink, :forward, [self(), :via_mfa]}})
      assert :ok = Dispatcher.subscribe("mfa:topic")
      assert :ok = Dispatcher.unsubscribe("mfa:topic")
      assert :ok = Dispatcher.unsubscribe("never:subscribed")
      assert :ok = Dispatcher.sync()
      assert Dispatcher.count("mfa:topic") == 0
      assert Dispatcher.subscribers("mfa:topic") == []
      refute Dispatcher.needs_registry?()

      # Nothing reached the NIF registry either.
      put_fly(dispatcher: :registry)
      assert Dispatcher.count("mfa:topic") == 0
    end

    for {fun, kind, detail} <- [
          {:raise_error, "RuntimeError", "sink exploded"},
          {:throw_value, "throw", ":sink_threw"},
          {:exit_process, "exit", ":sink_exited"}
        ] do
      test "a #{kind} inside is contained and logged with the topic and the MFA" do
        put_fly(dispatcher: {:mfa, {Sink, unquote(fun), []}})

        log =
          capture_log([level: :error, metadata: [:topic]], fn ->
            assert :ok = Dispatcher.dispatch("logs:failing-app", {:payload, 1})
          end)

        mfa = "ExAtlas.Fly.Dispatcher.ModesTest.Sink.#{unquote(fun)}/2"
        assert log =~ "[error]"
        # In the message itself, so it shows with any Logger format...
        assert log =~ ~s(topic "logs:failing-app")
        assert log =~ mfa
        # ...and as metadata.
        assert log =~ "topic=logs:failing-app"
        assert log =~ unquote(detail)
      end
    end

    test "the caller survives and keeps dispatching after a failure" do
      put_fly(dispatcher: {:mfa, {Sink, :exit_process, []}})
      capture_log(fn -> for _ <- 1..3, do: assert(:ok = Dispatcher.dispatch("t", :m)) end)
      assert Process.alive?(self())

      put_fly(dispatcher: {:mfa, {Sink, :forward, [self(), :after_failure]}})
      :ok = Dispatcher.dispatch("t", :m)
      assert_received {:after_failure, "t", :m}
    end
  end

  describe ":phoenix_pubsub with Phoenix.PubSub loaded (stand-in)" do
    setup do
      pubsub = :"ExAtlas.Test.PubSub#{System.unique_integer([:positive])}"
      define_phoenix_pubsub(pubsub)
      put_fly(dispatcher: :phoenix_pubsub, pubsub: pubsub)
      Process.register(self(), :pubsub_stand_in_calls)
      %{pubsub: pubsub}
    end

    test "subscribe, broadcast and unsubscribe go through Phoenix.PubSub", %{pubsub: pubsub} do
      assert Code.ensure_loaded?(Phoenix.PubSub)
      refute Dispatcher.needs_registry?()

      assert :ok = Dispatcher.subscribe("logs:app")
      assert_received {:pubsub_stand_in, {:subscribe, ^pubsub, "logs:app"}}

      message = {:ex_atlas_fly_logs, "app", [%{"message" => "hello"}]}
      assert :ok = Dispatcher.dispatch("logs:app", message)
      assert_received {:pubsub_stand_in, {:broadcast, ^pubsub, "logs:app", ^message}}
      assert_received ^message

      assert :ok = Dispatcher.sync()
      assert :ok = Dispatcher.unsubscribe("logs:app")
      assert_received {:pubsub_stand_in, {:unsubscribe, ^pubsub, "logs:app"}}

      :ok = Dispatcher.dispatch("logs:app", :after_unsubscribe)
      refute_received :after_unsubscribe
    end

    test "delivers to other subscriber processes, duplicates included", %{pubsub: pubsub} do
      parent = self()

      pid =
        spawn_link(fn ->
          :ok = Dispatcher.subscribe("deploy:1")
          :ok = Dispatcher.subscribe("deploy:1")
          send(parent, :subscribed)

          for _ <- 1..2 do
            receive do
              message -> send(parent, {:got, message})
            end
          end
        end)

      assert_receive :subscribed, 5_000
      :ok = Dispatcher.dispatch("deploy:1", {:ex_atlas_fly_deploy, 1, "line"})
      assert_receive {:got, {:ex_atlas_fly_deploy, 1, "line"}}, 5_000
      assert_receive {:got, {:ex_atlas_fly_deploy, 1, "line"}}, 5_000
      assert [{^pid, _}, {^pid, _}] = Registry.lookup(pubsub, "deploy:1")
    end

    test "nothing goes through the NIF registry" do
      :ok = Dispatcher.subscribe("pubsub:only")
      put_fly(dispatcher: :registry)
      assert ExAtlas.Fly.Dispatcher.count("pubsub:only") == 0
    end

    test "count/1 and subscribers/1 report nothing in this mode" do
      :ok = Dispatcher.subscribe("pubsub:count")
      assert Dispatcher.count("pubsub:count") == 0
      assert Dispatcher.subscribers("pubsub:count") == []
    end

    test "topics are still checked" do
      assert_raise ArgumentError, ~r/:not_a_binary/, fn -> Dispatcher.subscribe(:not_a_binary) end
      refute_received {:pubsub_stand_in, _}
    end
  end

  describe ":phoenix_pubsub falls back to the registry" do
    test "when Phoenix.PubSub is not loaded" do
      define_phoenix_pubsub(:"ExAtlas.Test.Unloaded#{System.unique_integer([:positive])}")
      put_fly(dispatcher: :phoenix_pubsub, pubsub: ExAtlas.Test.Unloaded)
      refute Dispatcher.needs_registry?()

      remove_phoenix_pubsub()
      refute Code.ensure_loaded?(Phoenix.PubSub)
      assert_registry_used()
    end

    test "when :pubsub is unset, even with Phoenix.PubSub loaded" do
      define_phoenix_pubsub(:"ExAtlas.Test.NoName#{System.unique_integer([:positive])}")
      put_fly(dispatcher: :phoenix_pubsub)

      Application.put_env(
        :ex_atlas,
        :fly,
        Keyword.delete(Application.get_env(:ex_atlas, :fly), :pubsub)
      )

      assert Code.ensure_loaded?(Phoenix.PubSub)
      assert_registry_used()
    end

    test "when :pubsub is nil" do
      define_phoenix_pubsub(:"ExAtlas.Test.NilName#{System.unique_integer([:positive])}")
      put_fly(dispatcher: :phoenix_pubsub, pubsub: nil)
      assert_registry_used()
    end
  end

  defp assert_registry_used do
    assert Dispatcher.needs_registry?()
    topic = unique_topic("fallback")
    :ok = Dispatcher.subscribe(topic)
    assert Dispatcher.count(topic) == 1
    assert Dispatcher.subscribers(topic) == [self()]
    :ok = Dispatcher.dispatch(topic, :through_the_registry)
    :ok = Dispatcher.sync()
    assert_received :through_the_registry
    :ok = Dispatcher.unsubscribe(topic)
    assert Dispatcher.count(topic) == 0
  end

  describe "an unknown mode" do
    for mode <- [
          :pubsub,
          "registry",
          {:mfa, {Sink, :forward}},
          {:mfa, {"Sink", :forward, []}},
          {:mfa, {Sink, :forward, :not_a_list}},
          {:mfa, Sink},
          {Sink, :forward, []},
          nil
        ] do
      test "#{inspect(mode)} raises ArgumentError naming it and the accepted forms" do
        put_fly(dispatcher: unquote(Macro.escape(mode)))

        calls = [
          fn -> Dispatcher.subscribe("t") end,
          fn -> Dispatcher.unsubscribe("t") end,
          fn -> Dispatcher.dispatch("t", :m) end,
          fn -> Dispatcher.sync() end,
          fn -> Dispatcher.count("t") end,
          fn -> Dispatcher.subscribers("t") end,
          fn -> Dispatcher.needs_registry?() end
        ]

        for call <- calls do
          error = assert_raise ArgumentError, call
          assert error.message =~ inspect(unquote(Macro.escape(mode)))
          assert error.message =~ ":registry"
          assert error.message =~ ":phoenix_pubsub"
          assert error.message =~ ":mfa"
        end
      end
    end

    test "a `config :ex_atlas, :fly` that is not a keyword list raises ArgumentError" do
      put_fly([])
      Application.put_env(:ex_atlas, :fly, :registry)
      error = assert_raise ArgumentError, fn -> Dispatcher.dispatch("t", :m) end
      assert error.message =~ ":registry"
      assert error.message =~ "keyword list"
    end
  end

  test "the mode is read on every call" do
    topic = unique_topic("switch")
    put_fly(dispatcher: {:mfa, {Sink, :forward, [self(), :mfa]}})
    :ok = Dispatcher.dispatch(topic, 1)
    put_fly(dispatcher: :registry)
    :ok = Dispatcher.subscribe(topic)
    :ok = Dispatcher.dispatch(topic, 2)
    :ok = Dispatcher.sync()
    put_fly(dispatcher: {:mfa, {Sink, :forward, [self(), :mfa]}})
    :ok = Dispatcher.dispatch(topic, 3)
    put_fly(dispatcher: :registry)
    :ok = Dispatcher.unsubscribe(topic)

    assert {:messages, [{:mfa, ^topic, 1}, 2, {:mfa, ^topic, 3}]} =
             Process.info(self(), :messages)
  end
end
