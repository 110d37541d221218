defmodule ExAtlas.Fly.Dispatcher.WarningsTest do
  # Every "this option does nothing here" warning comes once per start of the :ex_atlas
  # application (the registry's `replay: 0` one, once per registry start), however many
  # calls, concurrent ones included; and nothing the host sets is dropped without a word.
  # These change the application environment and restart the application: run alone.
  use ExUnit.Case, async: false

  import ExUnit.CaptureLog
  import ExAtlas.Test.FlyEnv

  alias ExAtlas.Fly.Dispatcher

  @no_replay "replay only works in :registry mode; falling back to plain subscribe/1"
  @no_backpressure "subscribe_with_backpressure/2 only works in :registry mode"
  @fallback "dispatcher: :phoenix_pubsub, but"
  @nothing_kept "but no dispatch is kept (config :ex_atlas, :fly, replay: 0)"

  setup do
    remove_phoenix_pubsub()
    on_exit(&remove_phoenix_pubsub/0)
    :ok
  end

  @doc false
  def sink(_topic, _message, _tag), do: :ok

  defp occurrences(log, text), do: length(String.split(log, text)) - 1

  # Each "does nothing here" call, `times` times in a row, then as many again from
  # concurrent processes; returns the log.
  defp misuse(times) do
    calls = fn ->
      :ok = Dispatcher.subscribe("w:t", replay: 3)
      :ok = Dispatcher.subscribe_with_backpressure("w:t", replay: 3, threshold: 5)
    end

    capture_log(fn ->
      for _ <- 1..times, do: calls.()

      1..times
      |> Enum.map(fn _ -> Task.async(calls) end)
      |> Enum.each(&Task.await/1)
    end)
  end

  describe "once per start" do
    test "{:mfa, _}: replay and backpressure warn once, again after a restart" do
      mode = [dispatcher: {:mfa, {__MODULE__, :sink, [make_ref()]}}]
      # A start of its own: other tests may have said these warnings in the current one.
      restart_app(mode)

      log = misuse(5)
      assert occurrences(log, @no_replay) == 1
      assert occurrences(log, @no_backpressure) == 1
      # The text names the topic, not only the metadata.
      assert log =~ ~s(topic "w:t")

      assert misuse(3) == ""

      # A new start of the application: each comes once more.
      restart_app(mode)
      log = misuse(5)
      assert occurrences(log, @no_replay) == 1
      assert occurrences(log, @no_backpressure) == 1
    end

    test ":phoenix_pubsub: replay and backpressure warn once" do
      pubsub = :"ExAtlas.Test.PubSub#{System.unique_integer([:positive])}"
      define_phoenix_pubsub(pubsub)
      restart_app()
      put_fly(dispatcher: :phoenix_pubsub, pubsub: pubsub)

      log = misuse(5)
      assert occurrences(log, @no_replay) == 1
      assert occurrences(log, @no_backpressure) == 1
      assert misuse(2) == ""
    end

    test ":phoenix_pubsub without its server or module falls back to :registry, said once" do
      # No Phoenix.PubSub loaded here (setup removed it). A start of its own: other tests
      # may have said these warnings in the current one.
      restart_app()
      put_fly(dispatcher: :phoenix_pubsub, pubsub: :"Missing#{System.unique_integer()}")

      log =
        capture_log(fn ->
          for _ <- 1..5, do: assert(Dispatcher.needs_registry?())
          :ok = Dispatcher.dispatch("w:fallback", :m)
        end)

      assert occurrences(log, @fallback <> " Phoenix.PubSub is not loaded") == 1

      put_fly(pubsub: nil)
      log = capture_log(fn -> for _ <- 1..5, do: assert(Dispatcher.needs_registry?()) end)
      assert occurrences(log, @fallback <> " `config :ex_atlas, :fly, pubsub: ...` is unset") == 1
    end

    test ":registry with replay: 0: subscribe(t, replay: n) warns once per registry start" do
      restart_app(replay: 0)
      topic = "w:nothing_kept"

      subscribe_many = fn ->
        capture_log(fn ->
          for _ <- 1..5, do: :ok = Dispatcher.subscribe(topic, replay: 2)
          :ok = Dispatcher.unsubscribe(topic)
        end)
      end

      assert occurrences(subscribe_many.(), @nothing_kept) == 1
      assert subscribe_many.() == ""
      restart_app(replay: 0)
      assert occurrences(subscribe_many.(), @nothing_kept) == 1
    end
  end

  describe "nothing ignored silently" do
    test "an unknown key of `config :ex_atlas, :fly` is named at start, with the known ones" do
      log = capture_log(fn -> restart_app(replay_memmory: 1_000, storage_path: "priv/x") end)
      assert log =~ "unknown key(s) in `config :ex_atlas, :fly`: :replay_memmory; ignored"
      assert log =~ ":replay_memory"
      # The SDK's own keys are accepted without a word.
      refute log =~ "unknown key(s) in `config :ex_atlas, :fly`: :storage_path"
      refute log =~ ":replay_memmory, :storage_path"
    end

    test "known keys only: no warning at start" do
      log = capture_log(fn -> restart_app(lanes: 2, token_storage: SomeStorage) end)
      refute log =~ "unknown key"
    end

    test "child options that cannot take effect because a registry already runs are named" do
      # A registry runs: the application's, or one started on demand by this first call
      # (an earlier test may have left the application without one).
      _ = Dispatcher.stats()
      eventually(fn -> is_pid(Process.whereis(Dispatcher.Supervisor)) end)

      log =
        capture_log(fn ->
          assert :ignore = Dispatcher.Supervisor.start_link(lanes: 1, queue_capacity: 7)
        end)

      assert log =~ "a registry already runs"
      assert log =~ "lanes: 1"
      assert log =~ "queue_capacity: 7"
      assert log =~ "enabled: false"
      # The running registry keeps its own settings.
      refute Dispatcher.stats().queue_capacity == 7

      # Without options there is nothing to ignore, and nothing is said.
      log = capture_log(fn -> assert :ignore = Dispatcher.Supervisor.start_link([]) end)
      refute log =~ "a registry already runs"
    end
  end
end
