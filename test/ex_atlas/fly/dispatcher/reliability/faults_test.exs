defmodule ExAtlas.Fly.Dispatcher.Reliability.FaultsTest do
  # Issue 9 §2 and §3 of the reliability suite: producers flood full lanes, and each of
  # our own processes is killed under that flood.
  #
  # * A producer waiting for room is in a plain `receive`: it can be inspected and killed
  #   at once, and killing waiters (some holding a credit granted to them) loses no credit.
  # * Killing a sender, the server or the watchdog keeps every subscription and watch;
  #   producers go on, the API and file I/O answer. Killing the supervisor closes the
  #   registry and tells every subscriber with the exit signal `Server.closed_reason/0`.
  # * What a killed sender had not delivered is counted exactly and logged.
  #
  # Waits are guards against hangs (generous timeouts), never speed limits: the speed
  # figures are in bench/safety.exs.
  use ExUnit.Case, async: false

  import ExAtlas.Test.FlyEnv, only: [restart_app: 1, unique_topic: 1]
  import ExAtlas.Test.Reliability
  import ExUnit.CaptureLog

  alias ExAtlas.Fly.Dispatcher
  alias ExAtlas.Fly.Dispatcher.Backend.Registry, as: RegistryBackend
  alias ExAtlas.Fly.Dispatcher.{Server, Watchdog}

  @moduletag timeout: :infinity
  # Liveness guard for one call or one step of progress; far above any healthy figure.
  @guard 5_000

  describe "producers waiting for room" do
    setup do
      restart_app(queue_capacity: 1, lanes: 2)
    end

    test "wait in a plain receive: inspected and killed at once, and no credit is lost" do
      topic = unique_topic("faults:wait")
      subscribers = start_subscribers(2_000, topic, report: true)
      flood = start_flood(8, topic)

      waiting = eventually("a producer waiting for room", fn -> waiting_producers(flood) end)
      [victim | _] = waiting
      # It answers at once; a grant may already have woken it (so, not always :waiting).
      assert {:status, status} = answers(fn -> Process.info(victim, :status) end)
      assert status in [:waiting, :runnable, :running]
      assert_killed(victim)

      # Kill many more producers at random moments: some die queued, some holding a
      # credit granted to them but not used yet (the Pending destructor gives it back).
      for _ <- 1..60 do
        pid = spawn_producer(topic, flood.counts, 0)
        Process.sleep(:rand.uniform(3))
        assert_killed(pid)
      end

      others = flood.pids -- [victim]
      await_progress(flood, others)
      stop_flood(flood)

      eventually("every credit back, nobody waiting", fn ->
        stats = stats()
        stats.in_flight == 0 and stats.waiting == 0
      end)

      assert_everyone_gets(subscribers, topic)
      kill_all(subscribers)
    end
  end

  describe "our processes killed under a flood" do
    setup do
      restart_app(queue_capacity: 1, lanes: 2)
    end

    test "each sender, the server, the watchdog, then the supervisor" do
      kill_each_under_flood(1_000, 1)
    end

    @tag :soak
    test "the same, 10 rounds with 5 000 subscribers (soak)" do
      kill_each_under_flood(5_000, 10)
    end
  end

  defp kill_each_under_flood(n, rounds) do
    topic = unique_topic("faults:kill")
    subscribers = start_subscribers(n, topic)
    watched = start_watched(topic)
    flood = start_flood(8, topic)

    log =
      capture_log(fn ->
        for round <- 1..rounds do
          # Each round restarts the server and the watchdog once: rounds 6.5 s apart keep
          # the supervisor within OTP's default restart intensity (3 in 5 s, counted in
          # whole seconds), beyond which it gives up by design.
          if round > 1, do: Process.sleep(6_500)

          for {what, pid} <- targets() do
            assert_killed(pid)
            await_progress(flood, flood.pids)
            count = answers(fn -> Dispatcher.count(topic) end)
            assert count == n + 1, "after killing #{what}: count #{count}, want #{n + 1}"
            assert answers(&file_round_trip/0) == :ok
            assert watched?(watched, topic), "the watch survives killing #{what}"
          end
        end
      end)

    assert log =~ "exited (:killed); started another, subscriptions are kept"

    # The supervisor: the registry is closed and every subscriber is told, once.
    old_server = Process.whereis(Dispatcher.registry_name())
    reason = Server.closed_reason()
    capture_log(fn -> assert_killed(Process.whereis(Dispatcher.Supervisor)) end)

    for pid <- [watched | subscribers] do
      assert_receive {:told, ^pid, {:EXIT, ^old_server, ^reason}}, @guard
    end

    refute_received {:told, _, _}

    # The new server's name is registered before its init/1 has published the registry.
    eventually("a new registry", fn ->
      Process.whereis(Dispatcher.registry_name()) not in [nil, old_server] and
        Server.lookup() != nil
    end)

    assert answers(fn -> Dispatcher.count(topic) end) == 0
    # Producers went on on the new registry, or raised the documented ArgumentError in
    # the moment between the two; none hangs.
    await_progress(flood, flood.pids)
    stop_flood(flood)
    kill_all([watched | subscribers])
  end

  describe "a killed sender" do
    setup do
      restart_app(queue_capacity: 8, lanes: 2)
    end

    test "what it had not delivered is counted exactly and logged; its lane goes on" do
      topic = unique_topic("faults:lost")
      subscribers = start_subscribers(200, topic, report: true)
      [sender | _] = Server.senders()

      # Batches wait in the suspended sender's mailbox, undelivered.
      :erlang.suspend_process(sender)
      for seq <- 1..3, do: :ok = Dispatcher.dispatch(topic, {:lost, seq})

      log =
        capture_log(fn ->
          assert_killed(sender)

          eventually("the loss counted", fn -> stats().lost_batches == 3 end)
          # The server logs within a second of the loss.
          Process.sleep(1_200)
        end)

      :ok = Dispatcher.sync()
      got = for pid <- subscribers, do: {pid, received(pid, :lost)}
      missed = for {pid, 0} <- got, do: pid
      assert length(missed) > 0 and length(missed) < 200, "both lanes had subscribers"
      assert Enum.all?(got, fn {_pid, count} -> count in [0, 3] end)

      stats = stats()
      assert stats.lost_deliveries == 3 * length(missed)
      assert stats.in_flight == 0, "the dropped batches gave their credits back"
      assert log =~ "#{3 * length(missed)} deliveries in 3 dispatches were lost"

      # The lane's new sender delivers to everyone.
      :ok = Dispatcher.dispatch(topic, {:lost, 4})
      :ok = Dispatcher.sync()
      assert Enum.all?(subscribers, &(received(&1, :lost) in [1, 4]))
      kill_all(subscribers)
    end

    test "a stray message to a sender or the server is ignored, and logged for a sender" do
      topic = unique_topic("faults:stray")
      subscribers = start_subscribers(50, topic, report: true)
      server = Process.whereis(Dispatcher.registry_name())
      senders = Server.senders()

      log =
        capture_log(fn ->
          for pid <- [server | senders], do: send(pid, {:not_for_you, make_ref()})
          :ok = Dispatcher.sync()
        end)

      assert log =~ "ignored an unexpected message"
      assert Process.whereis(Dispatcher.registry_name()) == server
      assert Server.senders() == senders
      :ok = Dispatcher.dispatch(topic, {:stray, 1})
      :ok = Dispatcher.sync()
      assert Enum.all?(subscribers, &(received(&1, :stray) == 1))
      kill_all(subscribers)
    end
  end

  describe "a killed server" do
    setup do
      restart_app(lanes: 2)
    end

    test "its successor adopts the registry: subscriptions are kept and delivered to" do
      topic = unique_topic("faults:server")
      subscribers = start_subscribers(100, topic, report: true)
      old = Process.whereis(Dispatcher.registry_name())

      capture_log(fn ->
        assert_killed(old)
        eventually("a new server", fn -> Process.whereis(Dispatcher.registry_name()) end)
      end)

      assert Dispatcher.count(topic) == 100
      assert %{subscribers: 100, monitors: 100} = stats()
      :ok = Dispatcher.dispatch(topic, {:adopted, 1})
      :ok = Dispatcher.sync()
      assert Enum.all?(subscribers, &(received(&1, :adopted) == 1))
      refute_received {:told, _, _}

      # Its monitors still work: subscribers that exit leave nothing behind.
      kill_all(subscribers)
      await_empty_registry()
    end

    test "the watchdog's watches survive its own crash and still evict" do
      topic = unique_topic("faults:watchdog")
      parent = self()

      stuck =
        spawn(fn ->
          :ok = Dispatcher.subscribe_with_backpressure(topic, threshold: 5, poll_ms: 20)
          send(parent, :watched)
          receive do: (:never -> :ok)
        end)

      assert_receive :watched
      old = Process.whereis(Watchdog)
      capture_log(fn -> assert_killed(old) end)
      eventually("a new watchdog", fn -> Process.whereis(Watchdog) not in [nil, old] end)
      assert %{threshold: 5, poll_ms: 20} = Watchdog.watch_info(stuck, topic)

      log =
        capture_log(fn ->
          for seq <- 1..20, do: :ok = Dispatcher.dispatch(topic, {:fill, seq})
          eventually("the slow subscriber evicted", fn -> Dispatcher.count(topic) == 0 end)
        end)

      assert log =~ "evicting slow subscriber"
      assert Watchdog.watch_info(stuck, topic) == nil
      kill_all([stuck])
    end
  end

  ## Subscribers: trap exits (so the registry's close reaches the test as a message) and
  ## count what they receive per tag when asked to report.

  defp start_subscribers(n, topic, opts \\ []) do
    parent = self()
    report = Keyword.get(opts, :report, false)

    spawn_ready(n, fn ready ->
      Process.flag(:trap_exit, true)
      :ok = Dispatcher.subscribe(topic)
      ready.()
      subscriber_loop(parent, report, %{})
    end)
  end

  defp subscriber_loop(parent, report, counts) do
    receive do
      {:EXIT, ^parent, _} ->
        :ok

      {:EXIT, _from, _reason} = exit ->
        send(parent, {:told, self(), exit})
        subscriber_loop(parent, report, counts)

      {:count, tag, from} ->
        send(from, {:count, self(), Map.get(counts, tag, 0)})
        subscriber_loop(parent, report, counts)

      {tag, _seq} when report ->
        subscriber_loop(parent, report, Map.update(counts, tag, 1, &(&1 + 1)))

      _other ->
        subscriber_loop(parent, report, counts)
    end
  end

  defp received(pid, tag) do
    send(pid, {:count, tag, self()})
    assert_receive {:count, ^pid, count}, @guard
    count
  end

  defp assert_everyone_gets(subscribers, topic) do
    assert Dispatcher.count(topic) == length(subscribers)
    :ok = Dispatcher.dispatch(topic, {:check, 1})
    :ok = Dispatcher.sync()
    assert Enum.all?(subscribers, &(received(&1, :check) == 1))
  end

  defp start_watched(topic) do
    parent = self()

    [pid] =
      spawn_ready(1, fn ready ->
        Process.flag(:trap_exit, true)
        :ok = Dispatcher.subscribe_with_backpressure(topic, threshold: 1_000_000)
        ready.()
        subscriber_loop(parent, false, %{})
      end)

    pid
  end

  defp watched?(pid, topic) do
    eventually("the watchdog answers", fn ->
      Process.whereis(Watchdog) != nil and Watchdog.watch_info(pid, topic) != nil
    end)
  end

  ## The flood: producers dispatch in a loop and count each dispatch, or each
  ## ArgumentError, in their own slot of an :atomics.

  defp start_flood(count, topic) do
    counts = :atomics.new(count, signed: false)
    pids = for slot <- 1..count, do: spawn_producer(topic, counts, slot)
    %{pids: pids, counts: counts, slots: Map.new(Enum.with_index(pids, 1))}
  end

  defp spawn_producer(topic, counts, slot) do
    spawn(fn -> produce(topic, counts, slot, 0) end)
  end

  defp produce(topic, counts, slot, seq) do
    receive do
      :stop -> :ok
    after
      0 ->
        try do
          :ok = Dispatcher.dispatch(topic, {:flood, seq})
        rescue
          ArgumentError -> :raised
        end

        if slot > 0, do: :atomics.add(counts, slot, 1)
        produce(topic, counts, slot, seq + 1)
    end
  end

  defp stop_flood(flood) do
    for pid <- flood.pids, do: send(pid, :stop)
    kill_all(flood.pids)
  end

  defp waiting_producers(flood) do
    waiting =
      for pid <- flood.pids,
          Process.info(pid, :current_function) ==
            {:current_function, {RegistryBackend, :await_room, 2}},
          do: pid

    waiting != [] and waiting
  end

  # Every producer in `pids` dispatched (or raised) at least once more.
  defp await_progress(flood, pids) do
    before = for pid <- pids, do: {pid, :atomics.get(flood.counts, flood.slots[pid])}

    for {pid, count} <- before do
      eventually(
        "producer #{inspect(pid)} makes progress",
        fn -> :atomics.get(flood.counts, flood.slots[pid]) > count end,
        @guard
      )
    end
  end

  ## Our processes, in the order they are killed.

  defp targets do
    senders = for {pid, lane} <- Enum.with_index(Server.senders()), do: {"sender #{lane}", pid}
    server = {"the server", Process.whereis(Dispatcher.registry_name())}
    # Killing a sender restarts only that sender, so the later pids stay valid.
    senders ++ [server, {"the watchdog", Process.whereis(Watchdog)}]
  end

  defp assert_killed(pid) do
    ref = Process.monitor(pid)
    Process.exit(pid, :kill)
    assert_receive {:DOWN, ^ref, :process, ^pid, _}, @guard
  end

  # Runs `fun` in another process; flunks if it does not answer within the guard.
  defp answers(fun) do
    task = Task.async(fun)

    case Task.yield(task, @guard) || Task.shutdown(task, :brutal_kill) do
      {:ok, result} -> result
      _ -> flunk("no answer in #{@guard} ms")
    end
  end

  defp file_round_trip do
    path = Path.join(System.tmp_dir!(), "ex_atlas_faults_#{System.unique_integer([:positive])}")
    File.write!(path, "ok")
    "ok" = File.read!(path)
    File.rm!(path)
    :ok
  end
end
