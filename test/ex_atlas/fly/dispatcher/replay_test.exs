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

    # Most terms are kept encoded; one holding a reference or a local fun is kept as a
    # copy, so that an :atomics (or a NIF resource's) reference stays the live object
    # and a fun stays callable.
    test "terms of every kind come back unchanged and alive" do
      topic = unique_topic("replay")
      counter = :atomics.new(1, [])
      secret = 42
      fun = fn x -> x + secret end
      <<_::3, odd::bitstring>> = :binary.copy(<<7>>, 100)

      messages = [
        {:counter, counter},
        {:fun, fun},
        {:export, &Enum.count/1},
        {:ref, make_ref()},
        {:big, 2 ** 200, -(2 ** 70), 1.5},
        {:bits, odd, <<1::1>>},
        {:nested, [%{a: [{1, "x"}]}, {}, %{}]},
        {:map, Map.new(1..40, &{&1, &1})}
      ]

      for message <- messages, do: :ok = Dispatcher.dispatch(topic, message)
      # What the dispatcher kept is all that holds the :atomics array now, bar this one.
      :erlang.garbage_collect()
      assert :ok = Dispatcher.subscribe(topic, replay: 10)
      got = mailbox()
      assert got == messages
      [{:counter, kept} | _] = got
      :ok = :atomics.add(kept, 1, 5)
      assert :atomics.get(counter, 1) == 5
      {:fun, kept_fun} = Enum.at(got, 1)
      assert kept_fun.(1) == 43
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

      parent = self()

      spawn_link(fn -> send(parent, {:other, Dispatcher.subscribe(topic, replay: 5), drain()}) end)

      assert_receive {:other, :ok, [{:m, 1}, {:m, 2}]}
    end

    # A dispatch handed to a sender before the unsubscribe may still be on its way to
    # the old subscription when the same process subscribes again: its replay starts
    # after what went to the old subscription, so that nothing comes twice.
    test "a resubscribe replays only what was dispatched since the process left" do
      topic = unique_topic("replay")
      # Enough subscribers that dispatches go through the senders.
      others = for _ <- 1..40, do: spawn_subscriber(topic)
      :ok = Dispatcher.subscribe(topic)
      senders = Native.senders(RegistryBackend.dispatcher!())
      for sender <- senders, do: :erlang.suspend_process(sender)
      dispatch_all(topic, 1..3)
      :ok = Dispatcher.unsubscribe(topic)
      dispatch_all(topic, 4..5)
      :ok = Dispatcher.subscribe(topic, replay: 10)
      for sender <- senders, do: :erlang.resume_process(sender)
      :ok = Dispatcher.sync()
      got = mailbox()
      assert Enum.sort(got) == for(i <- 1..5, do: {:m, i})
      for pid <- others, do: Process.exit(pid, :kill)
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

      assert [{{_, ^topic}, _poll_ms, 50, _cooldown_ms, :evict}] =
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
          check_case(run_case(params), params) == nil
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
          lasts = stop_producers(producers)
          received = collect_joiner(joiner)
          account(received, lasts) != nil
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

    # A message is kept in its external format: it costs its encoded size plus a fixed
    # overhead per message, both 1.25x (for how allocations spread over the schedulers).
    test "replay_bytes accounts each message's encoded size" do
      topic = unique_topic("size")
      small = {:ex_atlas_fly_logs, "app", [%{"message" => "line"}]}
      big = {:ex_atlas_fly_logs, "app", for(i <- 1..20, do: %{"message" => "line #{i}"})}
      :ok = Dispatcher.dispatch(topic, :warm)

      [small_cost, big_cost] =
        for message <- [small, big] do
          before = Dispatcher.stats().replay_bytes
          :ok = Dispatcher.dispatch(topic, message)
          Dispatcher.stats().replay_bytes - before
        end

      [small_size, big_size] = for m <- [small, big], do: byte_size(:erlang.term_to_binary(m))
      # Integer division by 4 in each charge: the difference is within 1 of 1.25x.
      assert abs(big_cost - small_cost - (big_size - small_size) * 5 / 4) <= 1
      overhead = small_cost - small_size * 5 / 4
      assert overhead >= 64 and overhead <= 512
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
    # A joiner stopped in the middle of its replay (it has sent itself one chunk, and is
    # then suspended) is a slow consumer: nobody waits for it. Dispatches to its topic go
    # on; once what is kept for it alone passes its cap it is cut, and when it goes on it
    # tells itself exactly how many it missed, in their place.
    setup do
      # Room for about 3 000 of these messages; a joiner's cap is a sixteenth of it.
      restart_app(replay: 100, replay_memory: 1_000_000)
      :ok
    end

    test "holds no producer of its topic, nor any other topic; resumed, it is told" do
      topic = unique_topic("slow")
      dispatch_all(topic, 1..50)
      joiner = stalled_joiner(topic, 50)
      other = unique_topic("other")
      :ok = Dispatcher.subscribe(other)

      producer = Task.async(fn -> dispatch_all(topic, 51..3_000) end)
      # Were the producer held, this would time out.
      assert length(Task.await(producer, 30_000)) == 2_950
      :ok = Dispatcher.dispatch(other, :not_held)
      :ok = Dispatcher.sync()
      assert mailbox() == [:not_held]
      assert internal_stats().replay_cuts >= 1

      got = resume(joiner)
      # The first chunk (sent before it stopped) from 1, then told: every dispatch from
      # 1 to 3 000 once, or counted in a notice.
      assert {:m, 1} = hd(got)
      {gaps, messages} = split_gaps(got)
      assert gaps != []
      numbers = for {:m, i} <- messages, do: i
      assert numbers == Enum.sort(numbers)
      assert length(numbers) + Enum.sum(gaps) == 3_000
      assert no_hole_outside_gaps?(got)
      assert internal_stats().replay_missed == Enum.sum(gaps)
      # One cut, one notice.
      assert internal_stats().replay_cuts == length(gaps)
      # And it is subscribed: the next dispatch reaches it, after the notice.
      assert live_after(joiner, topic) == [{:m, 3_001}]
    end

    test "reports the cut in [:replay, :cut] telemetry, with the count told" do
      define_telemetry()
      event = [:ex_atlas, :fly, :dispatcher, :replay, :cut]
      ExAtlas.Test.TelemetryStandIn.capture([event])
      topic = unique_topic("slow")
      dispatch_all(topic, 1..50)
      joiner = stalled_joiner(topic, 50)
      dispatch_all(topic, 51..3_000)
      got = resume(joiner)
      {[missed | _], _} = split_gaps(got)
      pid = joiner.pid
      assert_receive {:telemetry, ^event, %{missed: ^missed}, %{topic: ^topic, subscriber: ^pid}}
    end

    test "that dies leaves nothing behind" do
      topic = unique_topic("slow")
      dispatch_all(topic, 1..50)
      monitors = internal_stats().monitors
      joiner = stalled_joiner(topic, 50)
      assert internal_stats().replay_joiners == 1
      # Its monitor is a joiner's, not a subscription's.
      assert internal_stats().replay_monitors == 1
      assert internal_stats().monitors == monitors
      # Past the 100 the topic keeps, not yet past the lag that cuts it (50 + 256): what
      # it has yet to deliver is retained for it.
      dispatch_all(topic, 51..250)
      assert internal_stats().replay_retained_bytes > 0
      Process.exit(joiner.pid, :kill)
      eventually(fn -> internal_stats().replay_joiners == 0 end)
      assert internal_stats().replay_monitors == 0
      assert internal_stats().replay_retained_bytes == 0
      assert internal_stats().monitors == monitors
      assert Dispatcher.count(topic) == 0
    end

    test "evicted while it catches up: it is not subscribed, and is told so" do
      topic = unique_topic("slow")
      dispatch_all(topic, 1..50)
      joiner = stalled_joiner(topic, 50)
      assert RegistryBackend.evict(topic, joiner.pid) == 1
      assert resume(joiner, :removed) != []
      assert Dispatcher.count(topic) == 0
      assert internal_stats().replay_joiners == 0
      assert internal_stats().replay_monitors == 0
    end

    test "once the registry closes, it learns so, and producers were never held" do
      topic = unique_topic("slow")
      dispatch_all(topic, 1..50)
      joiner = stalled_joiner(topic, 50)
      dispatch_all(topic, 51..500)
      stop_app()
      resume(joiner, :closed)
    end
  end

  describe "subscribers that die while catching up" do
    # Each is killed in the middle of its replay: joined, one chunk sent, suspended.
    test "are removed, and the topic goes on" do
      topic = unique_topic("dies")
      restart_app(replay: 1_000)
      big = :binary.copy("b", 50_000)
      for i <- 1..500, do: :ok = Dispatcher.dispatch(topic, {:m, i, big})
      monitors = internal_stats().monitors

      joiners = for _ <- 1..20, do: stalled_joiner(topic, 1_000)
      assert internal_stats().replay_joiners == 20
      for i <- 501..600, do: :ok = Dispatcher.dispatch(topic, {:m, i, big})
      for %{pid: pid} <- joiners, do: Process.exit(pid, :kill)

      eventually(fn -> internal_stats().replay_joiners == 0 end)
      assert internal_stats().replay_monitors == 0
      assert internal_stats().replay_retained_bytes == 0
      assert internal_stats().monitors == monitors
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
      put_fly(dispatcher: {:mfa, {__MODULE__, :sink, [make_ref()]}})

      log = capture_log(fn -> assert :ok = Dispatcher.subscribe("mfa:t", replay: 5) end)
      assert log =~ "replay only works in :registry mode; falling back to plain subscribe/1"

      assert capture_log(fn -> assert :ok = Dispatcher.subscribe("mfa:t", replay: 0) end) == ""

      # Said once per start (test/ex_atlas/fly/dispatcher/warnings_test.exs counts it).
      log =
        capture_log(fn ->
          assert :ok = Dispatcher.subscribe_with_backpressure("mfa:t", replay: 5)
        end)

      refute log =~ "replay only works in :registry mode"
      assert log =~ "subscribe_with_backpressure/2 only works in :registry mode"
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
  def sink(_topic, _message, _tag), do: :ok

  # -- helpers -------------------------------------------------------------------------

  # A process that joins `topic` through the NIF, asking for `n`, sends itself one chunk
  # of its replay (`Native.replay/2`), and is then suspended there: a joiner stopped in
  # the middle of its replay. `resume/2` lets it go on with the production code
  # (`RegistryBackend.catch_up/2`), and returns what it got.
  defp stalled_joiner(topic, n) do
    parent = self()
    ref = make_ref()
    dispatcher = RegistryBackend.dispatcher!()

    pid =
      spawn(fn ->
        :ok = Native.join(dispatcher, topic, n, false)
        first = Native.replay(dispatcher, topic)
        send(parent, {ref, :mid_replay, first})

        receive do
          {^ref, :go} -> :ok
        end

        result = RegistryBackend.catch_up(dispatcher, topic)
        if result == :ok, do: Dispatcher.sync()
        send(parent, {ref, result, drain([])})

        receive do
          {^ref, :live} -> send(parent, {ref, :live, drain([])})
        after
          30_000 -> :ok
        end
      end)

    assert_receive {^ref, :mid_replay, :more}
    :erlang.suspend_process(pid)
    %{pid: pid, ref: ref}
  end

  defp resume(%{pid: pid, ref: ref}, expected \\ :ok) do
    send(pid, {ref, :go})
    :erlang.resume_process(pid)
    assert_receive {^ref, ^expected, got}, 30_000
    got
  end

  # What a resumed joiner gets of one more dispatch to `topic`.
  defp live_after(%{pid: pid, ref: ref}, topic) do
    :ok = Dispatcher.dispatch(topic, {:m, 3_001})
    :ok = Dispatcher.sync()
    send(pid, {ref, :live})
    assert_receive {^ref, :live, got}, 5_000
    got
  end

  # {:m, i} numbers go up by one except right after a gap notice.
  defp no_hole_outside_gaps?(got) do
    got
    |> Enum.chunk_every(2, 1, :discard)
    |> Enum.all?(fn
      [{:m, a}, {:m, b}] -> b == a + 1
      _ -> true
    end)
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

  # nil when every joiner's stream holds; else what went wrong. A joiner that asked for
  # everything while everything fits in the history is due every number from 1.
  defp check_case({results, lasts}, {_producers, _each, kept, _joiners}) do
    total = Enum.sum(lasts)

    Enum.find_value(results, fn {n, got} ->
      starts = if n == :all and kept >= total, do: Enum.map(lasts, fn _ -> 1 end)

      if fault = account(got, lasts, starts),
        do: "#{fault} in #{inspect(got, limit: 30)}"
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
