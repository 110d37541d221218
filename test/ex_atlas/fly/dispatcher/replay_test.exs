defmodule ExAtlas.Fly.Dispatcher.ReplayTest do
  # subscribe(topic, replay: n): a topic's most recent dispatches reach a late joiner
  # before anything live, exactly once each, within `replay_memory`. Every test restarts
  # the application with replay configured, so the module runs alone.
  use ExUnit.Case, async: false

  import ExUnit.CaptureLog
  import ExAtlas.Test.FlyEnv

  import ExAtlas.Test.Replay

  alias ExAtlas.Fly.Dispatcher
  alias ExAtlas.Fly.Dispatcher.Backend.Registry, as: RegistryBackend
  alias ExAtlas.Fly.Dispatcher.Native
  alias ExAtlas.Test.BufferedSignals, as: Buffered

  @moduletag timeout: 300_000

  @payload for(i <- 1..40, do: {:line, i})

  # The NIF's JOIN_SLACK: dispatches a joiner may fall behind before its topic waits.
  @join_slack 256

  setup do
    restart_app(replay: 10, replay_memory: 64 * 1024 * 1024)
    :ok
  end

  # Everything in the test process's mailbox now, taken out.
  defp mailbox, do: drain()

  defp dispatch_all(topic, range),
    do: for(i <- range, do: :ok = Dispatcher.dispatch(topic, {:m, i}))

  defp internal_stats, do: RegistryBackend.stats()

  describe "replay" do
    test "the most recent dispatches come first, in order, then live ones" do
      topic = unique_topic("replay")
      dispatch_all(topic, 1..8)

      assert :ok = Dispatcher.subscribe(topic, replay: 3)
      assert mailbox() == [{:m, 6}, {:m, 7}, {:m, 8}]

      dispatch_all(topic, 9..10)
      :ok = Dispatcher.sync()
      assert mailbox() == [{:m, 9}, {:m, 10}]
    end

    test "as many as are kept when n is larger; the topic keeps `replay` of them" do
      topic = unique_topic("replay")
      dispatch_all(topic, 1..25)
      assert :ok = Dispatcher.subscribe(topic, replay: 1_000)
      assert mailbox() == for(i <- 16..25, do: {:m, i})
    end

    test "the original terms, big ones and binaries included" do
      topic = unique_topic("replay")
      big = :binary.copy("x", 100_000)
      entries = for i <- 1..20, do: %{"message" => "line #{i}", "n" => i, "f" => i / 3}
      messages = [{:ex_atlas_fly_logs, "app", entries}, {:blob, big}, [1, 2 | :improper], self()]
      for message <- messages, do: :ok = Dispatcher.dispatch(topic, message)

      assert :ok = Dispatcher.subscribe(topic, replay: 10)
      assert mailbox() == messages
    end

    test "subscribe/1, replay: 0 and subscribe(topic, []) replay nothing" do
      topic = unique_topic("replay")
      dispatch_all(topic, 1..3)

      for subscribe <- [
            fn -> Dispatcher.subscribe(topic) end,
            fn -> Dispatcher.subscribe(topic, replay: 0) end,
            fn -> Dispatcher.subscribe(topic, []) end
          ] do
        assert :ok = subscribe.()
        assert mailbox() == []
        :ok = Dispatcher.unsubscribe(topic)
      end
    end

    test "a topic keeps its history without subscribers, and unsubscribe/1 keeps it" do
      topic = unique_topic("replay")
      dispatch_all(topic, 1..2)
      assert Dispatcher.count(topic) == 0

      :ok = Dispatcher.subscribe(topic, replay: 5)
      :ok = Dispatcher.unsubscribe(topic)
      assert mailbox() == [{:m, 1}, {:m, 2}]

      :ok = Dispatcher.subscribe(topic, replay: 5)
      assert mailbox() == [{:m, 1}, {:m, 2}]
    end

    test "a second subscription with replay gets the history once more, and live twice" do
      topic = unique_topic("replay")
      dispatch_all(topic, 1..2)
      :ok = Dispatcher.subscribe(topic, replay: 5)
      :ok = Dispatcher.subscribe(topic, replay: 1)
      assert mailbox() == [{:m, 1}, {:m, 2}, {:m, 2}]

      dispatch_all(topic, 3..3)
      :ok = Dispatcher.sync()
      assert mailbox() == [{:m, 3}, {:m, 3}]
    end

    test "off-heap subscribers get the same, then live ones from the producer" do
      topic = unique_topic("replay")
      dispatch_all(topic, 1..4)
      parent = self()

      task =
        Task.async(fn ->
          Process.flag(:message_queue_data, :off_heap)
          :ok = Dispatcher.subscribe(topic, replay: 2)
          send(parent, :joined)
          for _ <- 1..3, do: receive(do: (m -> m))
        end)

      assert_receive :joined
      dispatch_all(topic, 5..5)
      assert Task.await(task) == [{:m, 3}, {:m, 4}, {:m, 5}]
    end

    test "subscribe_with_backpressure/2 takes replay: too, and watches" do
      topic = unique_topic("replay")
      dispatch_all(topic, 1..3)
      assert :ok = Dispatcher.subscribe_with_backpressure(topic, replay: 2, threshold: 50)
      assert mailbox() == [{:m, 2}, {:m, 3}]

      assert [{{_, ^topic}, _poll_ms, 50, _cooldown_ms}] =
               :ets.lookup(ExAtlas.Fly.Dispatcher.Watchdog, {self(), topic})
    end
  end

  describe "no gap, no duplicate" do
    # Producers dispatch numbered messages to one topic while subscribers join at random
    # moments, some with a replay longer than the history (they must get everything),
    # some shorter. Each joiner must then get, per producer, an unbroken run of numbers
    # that ends at that producer's last, and a full joiner every number from 1.
    test "under concurrent producers, joiners at random moments (property)" do
      numtests = String.to_integer(System.get_env("EX_ATLAS_PROPER_NUMTESTS", "25"))

      property =
        :proper.forall(replay_case(), fn params ->
          check_case(run_case(params), params)
        end)

      result = :proper.quickcheck(property, [:quiet, {:numtests, numtests}])

      if result != true do
        [params] = :proper.counterexample()
        flunk("replay case failed: #{inspect(params)}\n#{check_case(run_case(params), params)}")
      end
    end

    test "each producer's order holds across replay and live for buffered subscribers" do
      # The joiner's signal queue is forced into OTP's buffered mode, and once subscribed
      # it spins without fetching while the producers go on: whatever is still in its
      # buffers then comes out buffer by buffer. The replay it sent itself must already
      # be in its queue by then, ahead of every live message.
      topic = unique_topic("replay")
      Buffered.enable_internal_state()

      reversed =
        Enum.count(1..30, fn _trial ->
          producers = start_endless_producers(topic, 3)
          Process.sleep(:rand.uniform(2))
          joiner = buffered_joiner(topic, 1_000)
          # The joiner has spun: live messages sat in its buffers beside the replay.
          assert_receive {:spun, ^joiner}, 30_000
          stop_producers(producers)
          received = collect_joiner(joiner)
          violation(received) != nil
        end)

      assert reversed == 0
    end
  end

  describe "memory" do
    test "replay_bytes stays within replay_memory; the oldest go first, whatever the topic" do
      restart_app(replay: 100, replay_memory: 20_000)
      message = fn i -> {:m, i, :binary.copy("y", 100)} end
      # {:m, i, 100-byte binary}: a 3-tuple and a shared binary, about 200 bytes.
      topics = for t <- 1..20, do: unique_topic("mem#{t}")

      max_bytes =
        for round <- 1..50, topic <- topics, reduce: 0 do
          acc ->
            :ok = Dispatcher.dispatch(topic, message.(round))
            max(acc, Dispatcher.stats().replay_bytes)
        end

      stats = Dispatcher.stats()
      assert max_bytes <= 20_000
      assert stats.replay_bytes > 10_000
      assert stats.replay_messages < 20 * 50

      # The newest survive: the last topic dispatched to has its last message, and
      # whatever a topic kept is its most recent dispatches.
      :ok = Dispatcher.subscribe(List.last(topics), replay: 100)
      kept = mailbox()
      assert List.last(kept) == message.(50)
      assert kept == for({:m, i, _} <- kept, do: message.(i))
      rounds = for {:m, i, _} <- kept, do: i
      assert rounds == Enum.to_list(List.first(rounds)..50)
    end

    test "a message bigger than replay_memory is delivered live but not kept" do
      restart_app(replay: 100, replay_memory: 10_000)
      topic = unique_topic("big")
      dispatch_all(topic, 1..3)
      big = {:big, :binary.copy("z", 20_000)}
      :ok = Dispatcher.subscribe(topic, replay: 0)
      :ok = Dispatcher.dispatch(topic, big)
      :ok = Dispatcher.sync()
      assert mailbox() == [big]
      assert Dispatcher.stats().replay_messages == 3
    end

    test "replay_bytes accounts each message's size" do
      topic = unique_topic("size")
      message = {:ex_atlas_fly_logs, "app", for(i <- 1..20, do: %{"message" => "line #{i}"})}
      before = Dispatcher.stats().replay_bytes
      :ok = Dispatcher.dispatch(topic, message)
      accounted = Dispatcher.stats().replay_bytes - before
      flat = :erts_debug.flat_size(message) * 8
      # The heap words, as the VM counts them, plus the word referring to the message.
      assert accounted >= flat and accounted <= flat + 64
    end

    test "without replay nothing is kept and stats say 0; asking for a replay warns once" do
      restart_app(replay: 0)
      topic = unique_topic("none")
      dispatch_all(topic, 1..5)
      assert %{replay_messages: 0, replay_bytes: 0} = Dispatcher.stats()

      log = capture_log(fn -> assert :ok = Dispatcher.subscribe(topic, replay: 5) end)
      assert log =~ "asked for replay: 5, but no dispatch is kept"
      assert mailbox() == []
      assert Dispatcher.count(topic) == 1
      assert capture_log(fn -> :ok = Dispatcher.subscribe(topic, replay: 5) end) == ""
    end
  end

  describe "a joiner that falls behind" do
    # A process that joined (Native.join/4) and does not go on stands for a joiner that
    # is descheduled: dispatches to its topic wait once it is @join_slack behind, never
    # drop, never grow without bound; they go on when it catches up or dies.
    test "makes dispatches to its topic wait, until it takes its messages" do
      topic = unique_topic("slow")
      dispatcher = RegistryBackend.dispatcher!()
      {joiner, joined} = stalled_joiner(dispatcher, topic)
      assert_receive ^joined

      producer =
        Task.async(fn ->
          dispatch_all(topic, 1..(@join_slack + 20))
          Dispatcher.sync()
        end)

      eventually(fn -> gated?(producer.pid) end)
      other = unique_topic("other")
      assert :ok = Dispatcher.dispatch(other, :not_gated)

      send(joiner, :catch_up)
      assert :ok = Task.await(producer)
      send(joiner, :report)
      assert_receive {:joined_got, got}
      assert got == for(i <- 1..(@join_slack + 20), do: {:m, i})
    end

    test "emits the :wait telemetry span with reason: :replay" do
      define_telemetry()
      start_event = [:ex_atlas, :fly, :dispatcher, :wait, :start]
      stop_event = [:ex_atlas, :fly, :dispatcher, :wait, :stop]
      ExAtlas.Test.TelemetryStandIn.capture([start_event, stop_event])
      topic = unique_topic("slow")
      {joiner, joined} = stalled_joiner(RegistryBackend.dispatcher!(), topic)
      assert_receive ^joined

      producer = Task.async(fn -> dispatch_all(topic, 1..(@join_slack + 1)) end)

      assert_receive {:telemetry, ^start_event, _, %{topic: ^topic, reason: :replay} = meta},
                     5_000

      refute_received {:telemetry, ^stop_event, _, _}
      send(joiner, :catch_up)
      Task.await(producer)
      assert_receive {:telemetry, ^stop_event, %{duration: duration}, ^meta}, 5_000
      assert duration >= 0
      Process.exit(joiner, :kill)
    end

    test "that dies lets the waiting dispatches go and leaves nothing behind" do
      topic = unique_topic("slow")
      dispatcher = RegistryBackend.dispatcher!()
      monitors = internal_stats().monitors
      {joiner, joined} = stalled_joiner(dispatcher, topic)
      assert_receive ^joined
      assert internal_stats().replay_joiners == 1

      producer = Task.async(fn -> dispatch_all(topic, 1..(@join_slack + 5)) end)
      eventually(fn -> gated?(producer.pid) end)
      Process.exit(joiner, :kill)
      assert Enum.all?(Task.await(producer), &(&1 == :ok))
      eventually(fn -> internal_stats().replay_joiners == 0 end)
      eventually(fn -> internal_stats().monitors == monitors end)
      assert Dispatcher.count(topic) == 0
    end

    test "waiting dispatches raise once the registry closes" do
      topic = unique_topic("slow")
      dispatcher = RegistryBackend.dispatcher!()
      {_joiner, joined} = stalled_joiner(dispatcher, topic)
      assert_receive ^joined
      parent = self()

      producer =
        spawn(fn ->
          result =
            try do
              dispatch_all(topic, 1..(@join_slack + 5))
            rescue
              error in ArgumentError -> {:raised, Exception.message(error)}
            end

          send(parent, {:producer, result})
        end)

      eventually(fn -> gated?(producer) end)
      stop_app()
      assert_receive {:producer, {:raised, message}}, 5_000
      assert message =~ "not running"
    end
  end

  describe "subscribers that die while catching up" do
    test "are removed, and the topic goes on" do
      topic = unique_topic("dies")
      restart_app(replay: 1_000)
      big = :binary.copy("b", 50_000)
      for i <- 1..500, do: :ok = Dispatcher.dispatch(topic, {:m, i, big})
      monitors = internal_stats().monitors

      for _ <- 1..20 do
        pid = spawn(fn -> Dispatcher.subscribe(topic, replay: 1_000) end)
        Process.sleep(:rand.uniform(3) - 1)
        Process.exit(pid, :kill)
      end

      eventually(fn -> internal_stats().replay_joiners == 0 end)
      eventually(fn -> internal_stats().monitors == monitors end)
      assert Dispatcher.count(topic) == 0
      assert :ok = Dispatcher.dispatch(topic, :still_going)
    end
  end

  describe "bad values" do
    test "raise ArgumentError naming the value" do
      cases = [
        {[replay: -1], "expected :replay to be a non-negative integer, got: -1"},
        {[replay: 1.5], "got: 1.5"},
        {[replay: :all], "got: :all"},
        {[replay: nil], "got: nil"},
        {[repaly: 3], "unknown subscribe/2 option :repaly; expected :replay"},
        {[{:replay, 1} | :tail], "keyword list, got: [{:replay, 1} | :tail]"},
        {[:replay], "keyword list, got: [:replay]"},
        {%{replay: 1}, "keyword list, got: %{replay: 1}"},
        {:replay, "keyword list, got: :replay"}
      ]

      for {opts, expected} <- cases do
        error = assert_raise ArgumentError, fn -> Dispatcher.subscribe("t", opts) end
        assert error.message =~ expected
      end

      assert_raise ArgumentError, ~r/expected topic to be a binary, got: :t/, fn ->
        Dispatcher.subscribe(:t, replay: 1)
      end

      assert_raise ArgumentError,
                   ~r/expected :replay to be a non-negative integer, got: -2/,
                   fn ->
                     Dispatcher.subscribe_with_backpressure("t", replay: -2)
                   end

      assert Dispatcher.count("t") == 0
    end

    test "child_spec/1 and the application environment check them" do
      assert_raise ArgumentError,
                   ~r/expected :replay to be an integer from 0 to 1000000, got: -1/,
                   fn ->
                     Dispatcher.child_spec(replay: -1)
                   end

      assert_raise ArgumentError, ~r/expected :replay_memory to be an integer from 1/, fn ->
        Dispatcher.child_spec(replay_memory: 0)
      end

      put_fly(replay: "10")

      assert_raise ArgumentError, ~r/config :ex_atlas, :fly, replay: .* got: "10"/, fn ->
        ExAtlas.Fly.Dispatcher.Config.replay()
      end
    end
  end

  describe "other modes" do
    test "{:mfa, _}: replay: is ignored with a warning, the subscribe is plain" do
      put_fly(dispatcher: {:mfa, {__MODULE__, :sink, []}})

      log = capture_log(fn -> assert :ok = Dispatcher.subscribe("mfa:t", replay: 5) end)
      assert log =~ "replay only works in :registry mode; falling back to plain subscribe/1"

      assert capture_log(fn -> assert :ok = Dispatcher.subscribe("mfa:t", replay: 0) end) == ""

      log =
        capture_log(fn ->
          assert :ok = Dispatcher.subscribe_with_backpressure("mfa:t", replay: 5)
        end)

      assert log =~ "replay only works in :registry mode"
    end

    test ":phoenix_pubsub: replay: is ignored with a warning, the subscribe goes through PubSub" do
      pubsub = :"ExAtlas.Test.PubSub#{System.unique_integer([:positive])}"
      define_phoenix_pubsub(pubsub)
      put_fly(dispatcher: :phoenix_pubsub, pubsub: pubsub)

      log = capture_log(fn -> assert :ok = Dispatcher.subscribe("ps:t", replay: 5) end)
      assert log =~ "replay only works in :registry mode"
      :ok = Dispatcher.dispatch("ps:t", :hello)
      assert_receive :hello
    end
  end

  @doc false
  def sink(_topic, _message), do: :ok

  # -- helpers -------------------------------------------------------------------------

  # A process that joins `topic` through the NIF, tells the test, and goes on only when
  # told: then it catches up as subscribe_replay/2 does and reports what it got.
  defp stalled_joiner(dispatcher, topic) do
    parent = self()
    joined = make_ref()

    pid =
      spawn(fn ->
        :ok = Native.join(dispatcher, topic, 0, false)
        send(parent, joined)

        receive do
          :catch_up -> :ok
        end

        catch_up(dispatcher, topic)

        receive do
          :report -> send(parent, {:joined_got, drain([])})
        end
      end)

    {pid, joined}
  end

  defp catch_up(dispatcher, topic) do
    case Native.replay(dispatcher, topic) do
      :more -> catch_up(dispatcher, topic)
      :ok -> :ok
    end
  end

  defp gated?(pid) do
    case Process.info(pid, :current_function) do
      {:current_function, {RegistryBackend, :deliver_here, 2}} -> true
      _ -> false
    end
  end

  # Property test: parameters, a run, and the check.
  defp replay_case do
    :proper_types.tuple([
      # producers, messages each at least (they go on until every joiner joined),
      # kept per topic
      :proper_types.range(1, 4),
      :proper_types.range(1, 400),
      :proper_types.range(1, 1_000),
      # joiners: {delay in ms, n, off_heap?}
      :proper_types.list(
        :proper_types.tuple([
          :proper_types.range(0, 15),
          :proper_types.oneof([:proper_types.range(0, 50), :proper_types.exactly(:all)]),
          :proper_types.boolean()
        ])
      )
    ])
  end

  defp run_case({producers, each, kept, joiners}) do
    restart_app(replay: kept)
    topic = unique_topic("prop")
    go = make_ref()
    parent = self()

    joiner_pids =
      for {delay, n, off_heap} <- Enum.take(joiners, 6) do
        spawn_link(fn ->
          if off_heap, do: Process.flag(:message_queue_data, :off_heap)

          receive do
            ^go -> :ok
          end

          Process.sleep(delay)
          :ok = Dispatcher.subscribe(topic, replay: if(n == :all, do: 1_000_000, else: n))
          send(parent, {:joined, self()})

          receive do
            {:collect, ^go} -> send(parent, {:got, self(), {n, drain([])}})
          end
        end)
      end

    producer_pids = start_producers(topic, producers, each, go, joiner_pids)
    for pid <- joiner_pids, do: assert_receive({:joined, ^pid}, 30_000)
    # Every joiner joined while the producers were still going.
    lasts = stop_producers(producer_pids)

    results =
      for pid <- joiner_pids do
        send(pid, {:collect, go})
        assert_receive {:got, ^pid, got}, 30_000
        got
      end

    {results, lasts}
  end

  defp check_case({results, lasts}, {_producers, _each, kept, _joiners}) do
    total = Enum.sum(lasts)

    Enum.find_value(results, true, fn {n, got} ->
      cond do
        violation = violation(got) ->
          "per-producer violation #{inspect(violation)} in #{inspect(got, limit: 30)}"

        Enum.any?(Enum.with_index(lasts, 1), fn {last, p} ->
          last_of(got, p) not in [nil, last]
        end) ->
          "a producer's run does not end at its last message (#{inspect(lasts)}): " <>
            inspect(got, limit: 30)

        # Everything dispatched fits in the history and the replay asked for all:
        # every message of every producer.
        n == :all and kept >= total and length(got) != total ->
          "a full joiner got #{length(got)} of #{total}"

        true ->
          false
      end
    end)
  end

  # Producers that dispatch numbered messages until told to stop; each then syncs.
  defp start_endless_producers(topic, count) do
    go = make_ref()
    start_producers(topic, count, 1, go, [])
  end

  # Stops the producers; their last numbers, in order.
  defp stop_producers(pids) do
    for pid <- pids, do: send(pid, :stop)
    await_producers(pids)
  end

  # Producers that dispatch numbered messages on `go` (sent to them and to `also`).
  # Producers that dispatch `each` numbered messages on `go` (sent to them and to `also`).
  defp start_producers(topic, count, each, go, also) do
    parent = self()

    pids =
      for p <- 1..count do
        spawn_link(fn ->
          receive do
            ^go -> :ok
          end

          last = produce(topic, p, 1, each)
          :ok = Dispatcher.sync()
          send(parent, {:produced, self(), last})
        end)
      end

    for pid <- pids ++ also, do: send(pid, go)
    pids
  end

  # Dispatches {:seq, p, i, payload} from `i` on: at least up to `at_least`, then until
  # :stop. The payload (about 1 KiB) makes a long replay take a while, so that joiners
  # catch up while dispatches go on.
  defp produce(topic, p, i, at_least) do
    :ok = Dispatcher.dispatch(topic, {:seq, p, i, @payload})

    receive do
      :stop when i >= at_least -> i
    after
      0 -> produce(topic, p, i + 1, at_least)
    end
  end

  defp await_producers(pids) do
    for pid <- pids do
      assert_receive {:produced, ^pid, last}, 60_000
      last
    end
  end

  # An off-heap joiner with its signal queue forced into buffered mode that, once
  # subscribed, spins a while without fetching, then collects.
  defp buffered_joiner(topic, n) do
    parent = self()
    ref = make_ref()

    pid =
      spawn_link(fn ->
        Process.flag(:message_queue_data, :off_heap)
        true = :erts_debug.set_internal_state(:proc_sig_buffers, true)
        :ok = Dispatcher.subscribe(topic, replay: n)
        deadline = System.monotonic_time(:microsecond) + 3_000
        spin(deadline)
        send(parent, {:spun, {self(), ref}})

        receive do
          {:collect, ^ref} -> send(parent, {ref, drain([])})
        end
      end)

    {pid, ref}
  end

  defp spin(deadline) do
    if System.monotonic_time(:microsecond) < deadline, do: spin(deadline), else: :ok
  end

  defp collect_joiner({pid, ref}) do
    send(pid, {:collect, ref})
    assert_receive {^ref, got}, 30_000
    got
  end
end
