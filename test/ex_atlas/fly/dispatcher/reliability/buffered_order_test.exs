defmodule ExAtlas.Fly.Dispatcher.Reliability.BufferedOrderTest do
  # Issue 18, section 2: per-producer order for subscribers whose signal queue is in
  # OTP's buffered mode (off_heap, forced with the VM's test switch), on-heap ones
  # alongside. Erlang orders messages per pair of processes only; a buffered receiver
  # fetches different senders' messages buffer by buffer, so whenever one producer's
  # messages to one subscriber leave from two processes (the producer inline, a lane's
  # sender, a replaced sender, the server's parked batches, a relay), order is luck.
  #
  # The harness (ExAtlas.Test.BufferedSignals): each subscriber is *held* (spinning, no
  # receive, no signal) while a fresh producer dispatches and syncs, then released, so
  # all the trial's messages sit in its buffers at the one fetch. The calibration test
  # shows that this reverses about half of causally ordered plain sends.
  #
  # Exact checks: every message is {:seq, producer, n}, n increasing per producer; a
  # subscriber must see each producer's numbers strictly increasing. A trial is reversed
  # when any subscriber of a kind saw a violation; reversed trials must be 0. Lost
  # messages (sender killed) are counted and reported, not failed on.
  use ExUnit.Case, async: false

  import ExUnit.CaptureLog
  import ExAtlas.Test.FlyEnv, only: [restart_app: 1, unique_topic: 1]

  alias ExAtlas.Fly.Dispatcher
  alias ExAtlas.Test.BufferedSignals, as: Buffered
  alias ExAtlas.Test.Cluster, as: Peers

  @moduletag timeout: :infinity

  # Other subscribers of the big topic: it always goes through the lanes' senders. The
  # small topic has only the subscribers under test, so it goes inline when lanes idle.
  @fillers 200
  # Subscribers under test of each kind.
  @per_kind 2

  # A collect short of its count ends after this long without a message: only where
  # messages may be lost (a killed sender) or no sync covers them (parked batches).
  @quiet_ms 500

  # Trials per application restart (new lane senders and relay: new_epoch/1).
  @epoch 10

  @short_trials 60
  @soak_trials 400

  setup do
    restart_app([])
    :ok
  end

  test "calibration: the harness reverses causally ordered plain sends, on-heap never" do
    {reversed, trials} = Buffered.calibrate(100)
    {on_heap_reversed, _} = Buffered.calibrate(50, off_heap: false)

    assert reversed > 0,
           "held buffered subscriber: #{reversed} of #{trials} plain trials reversed; " <>
             "the harness cannot see a reversal"

    assert on_heap_reversed == 0
  end

  describe "(a) big and small topics mixed" do
    test "one fresh producer per trial: dispatch(big), sync, dispatch(small), sync; " <>
           "#{@short_trials} trials" do
      mixed_trials(@short_trials)
    end

    @tag :soak
    test "one fresh producer per trial, #{@soak_trials} trials (soak)" do
      mixed_trials(@soak_trials)
    end

    test "4 concurrent producers alternating big and small, 20 rounds" do
      concurrent_rounds(20, 4, 12)
    end

    @tag :soak
    test "8 concurrent producers alternating big and small, 200 rounds (soak)" do
      concurrent_rounds(200, 8, 16)
    end
  end

  describe "(b) sender replaced after a kill mid-stream" do
    test "#{div(@short_trials, 2)} trials, one lane's sender killed in each" do
      kill_trials(div(@short_trials, 2))
    end

    # Only the big topic: no inline sends, so only the old and the new sender (and
    # whatever delivers a dead sender's work) can reorder.
    test "#{div(@short_trials, 2)} trials, big topic only" do
      kill_trials(div(@short_trials, 2), false)
    end

    @tag :soak
    test "#{@soak_trials} trials (soak)" do
      kill_trials(@soak_trials)
    end
  end

  describe "(c) batches parked for a lane whose sender is dead" do
    test "#{div(@short_trials, 2)} trials, server suspended while a sender is dead" do
      parked_trials(div(@short_trials, 2))
    end

    test "#{div(@short_trials, 2)} trials, big topic only" do
      parked_trials(div(@short_trials, 2), false)
    end

    @tag :soak
    test "#{@soak_trials} trials (soak)" do
      parked_trials(@soak_trials)
    end
  end

  describe "(d) a remote producer through the cluster relay" do
    @describetag :cluster

    setup do
      :ok = Peers.ensure_distribution()
      restart_app(cluster: true)

      {peer, b} =
        Peers.start_peer("ex_atlas_bo_#{System.unique_integer([:positive])}", cluster: true)

      on_exit(fn -> catch_exit(:peer.stop(peer)) end)
      %{b: b}
    end

    test "#{@short_trials} trials, producer on a peer", %{b: b} do
      remote_trials(b, @short_trials)
    end

    @tag :soak
    test "#{@soak_trials} trials, producer on a peer (soak)", %{b: b} do
      remote_trials(b, @soak_trials)
    end
  end

  # --- the cases -----------------------------------------------------------------------

  defp mixed_trials(trials) do
    %{big: big, small: small} = ctx = topics()

    run_trials(ctx, "(a) fresh producer per trial", trials, fn _ctx, trial ->
      steps = [
        {:dispatch, big, {:seq, trial, 1}},
        :sync,
        {:dispatch, small, {:seq, trial, 2}},
        :sync
      ]

      :ok = Buffered.produce(steps)
      2
    end)
  end

  defp concurrent_rounds(rounds, producers, per_producer) do
    %{big: big, small: small} = ctx = topics()

    run_trials(ctx, "(a) #{producers} concurrent producers", rounds, fn _ctx, round ->
      tasks =
        for p <- 1..producers do
          id = {round, p}

          steps =
            Enum.flat_map(1..per_producer, fn n ->
              topic = if rem(n + p, 2) == 0, do: big, else: small
              dispatch = {:dispatch, topic, {:seq, id, n}}
              # Syncs now and then, so small dispatches sometimes find the lanes idle.
              if rem(n, 3) == 0, do: [dispatch, :sync], else: [dispatch]
            end)

          Task.async(fn -> Buffered.produce(steps ++ [:sync]) end)
        end

      Enum.each(tasks, &(:ok = Task.await(&1, 60_000)))
      producers * per_producer
    end)
  end

  defp kill_trials(trials, mixed? \\ true) do
    %{big: big, small: small} = ctx = topics()
    small = if mixed?, do: small, else: big
    count = 16

    log =
      capture_log(fn ->
        run_trials(ctx, "(b) sender killed, mixed #{mixed?}", trials, fn _ctx, trial ->
          steps =
            Enum.flat_map(1..count, fn n ->
              topic = if rem(n, 2) == 1, do: big, else: small
              kill = if n == div(count, 2), do: [{:kill_sender, trial}], else: []
              sync = if rem(n, 2) == 1, do: [:sync], else: []
              kill ++ [{:dispatch, topic, {:seq, trial, n}} | sync]
            end)

          :ok = Buffered.produce(steps ++ [:sync])
          await_senders()
          count
        end)
      end)

    assert log =~ "exited"
  end

  defp parked_trials(trials, mixed? \\ true) do
    %{big: big, small: small} = ctx = topics()
    small = if mixed?, do: small, else: big
    count = 12

    capture_log(fn ->
      run_trials(ctx, "(c) parked batches, mixed #{mixed?}", trials, fn _ctx, trial ->
        server = Process.whereis(Dispatcher.registry_name())

        # One producer does it all: the server cannot install a replacement while
        # suspended, so what goes to the dead sender's lane meanwhile is parked.
        rest =
          for n <- 3..count do
            topic = if rem(n, 2) == 1, do: big, else: small
            {:dispatch, topic, {:seq, trial, n}}
          end

        steps =
          [{:dispatch, big, {:seq, trial, 1}}, :sync, {:dispatch, small, {:seq, trial, 2}}] ++
            [{:suspend, server}, {:kill_sender, trial} | rest] ++ [{:resume, server}]

        :ok = Buffered.produce(steps)
        await_senders()
        count
      end)
    end)
  end

  defp remote_trials(b, trials) do
    ready = fn %{big: big, small: small} ->
      Peers.await_visible(b, big, [node()])
      Peers.await_visible(b, small, [node()])
    end

    %{big: big, small: small} = ctx = topics(ready)

    run_trials(ctx, "(d) remote producer", trials, fn _ctx, trial ->
      steps = [
        {:dispatch, big, {:seq, trial, 1}},
        {:sync, :cluster},
        {:dispatch, small, {:seq, trial, 2}},
        {:sync, :cluster}
      ]

      :ok = Buffered.produce(steps, b)
      2
    end)
  end

  # --- the harness ---------------------------------------------------------------------

  # A big topic (fillers + subscribers under test) and a small one (only those); the
  # subscribers come with each epoch (populate/1). `ready` runs after each (re)start.
  defp topics(ready \\ fn _ctx -> :ok end) do
    %{big: unique_topic("buffered:big"), small: unique_topic("buffered:small"), ready: ready}
  end

  defp populate(%{big: big, small: small} = ctx) do
    parent = self()

    fillers =
      for _ <- 1..@fillers do
        spawn_link(fn ->
          :ok = Dispatcher.subscribe(big)
          send(parent, {:filler, self()})
          discard()
        end)
      end

    for _ <- 1..@fillers, do: assert_receive({:filler, _}, 10_000)

    buffered = for _ <- 1..@per_kind, do: Buffered.start_subscriber([big, small])

    on_heap = for _ <- 1..@per_kind, do: Buffered.start_subscriber([big, small], off_heap: false)

    assert Enum.all?(buffered, & &1.buffered)
    assert Dispatcher.count(big) == @fillers + 2 * @per_kind
    assert Dispatcher.count(small) == 2 * @per_kind
    ctx = Map.merge(ctx, %{fillers: fillers, subscribers: [buffered: buffered, on_heap: on_heap]})
    :ok = ctx.ready.(ctx)
    ctx
  end

  # Which of two senders' buffers is fetched first depends on their pids only, so one
  # set of lane senders (or one relay) can hide a reversal for every trial: if its
  # buffer comes first, no producer's inline send can overtake it. Each epoch restarts
  # the application, so the senders and the relay are new processes.
  defp new_epoch(ctx) do
    if Map.has_key?(ctx, :fillers) do
      subs = for {_kind, list} <- ctx.subscribers, sub <- list, do: sub.pid
      :ok = ExAtlas.Test.Reliability.kill_all(ctx.fillers ++ subs)
      ExAtlas.Test.FlyEnv.stop_app()
      :ok = Application.ensure_started(:ex_atlas)
    end

    populate(ctx)
  end

  defp discard do
    receive do
      _ -> discard()
    end
  end

  # Each trial: hold every subscriber under test, run `trial` (it returns how many
  # messages each subscriber should get), release, collect, check order.
  defp run_trials(ctx, what, trials, trial) do
    {results, ctx} =
      Enum.flat_map_reduce(1..trials, ctx, fn t, ctx ->
        ctx = if rem(t - 1, @epoch) == 0, do: new_epoch(ctx), else: ctx
        {one_trial(ctx, t, trial), ctx}
      end)

    lost_by_nif = Enum.sum(for {:nif_lost, n} <- results, do: n)
    results = for {_kind, _t, _lost, _bad} = r <- results, do: r

    summary =
      for kind <- Keyword.keys(ctx.subscribers), into: %{} do
        mine = for {^kind, t, lost, bad} <- results, do: {t, lost, bad}
        reversed = mine |> Enum.filter(fn {_, _, bad} -> bad != [] end) |> Enum.map(&elem(&1, 0))

        {kind,
         %{
           reversed_trials: reversed |> Enum.uniq() |> length(),
           violations: Enum.sum(for {_, _, bad} <- mine, do: length(bad)),
           lost: Enum.sum(for {_, lost, _} <- mine, do: lost),
           examples: mine |> Enum.flat_map(&elem(&1, 2)) |> Enum.take(5)
         }}
      end

    line =
      "#{what}: #{trials} trials, #{lost_by_nif} deliveries counted lost by the NIF " <>
        "(fillers included); " <>
        Enum.map_join(summary, "; ", fn {kind, s} ->
          "#{kind}: #{s.reversed_trials} reversed, #{s.violations} violations, " <>
            "#{s.lost} lost, e.g. #{inspect(s.examples)}"
        end)

    IO.puts("\n" <> line)

    for {_kind, s} <- summary do
      assert s.reversed_trials == 0, "per-producer order broken. " <> line
    end

    subs = for {_kind, list} <- ctx.subscribers, sub <- list, do: sub.pid
    :ok = ExAtlas.Test.Reliability.kill_all(ctx.fillers ++ subs)
    summary
  end

  # Holds every subscriber under test, runs `trial` (it returns how many messages each
  # should get), releases them, collects, checks order.
  defp one_trial(ctx, t, trial) do
    all = for {_kind, subs} <- ctx.subscribers, sub <- subs, do: sub
    lost_before = ExAtlas.Test.Reliability.stats().lost_deliveries
    Enum.each(all, &Buffered.hold/1)

    expected =
      try do
        trial.(ctx, t)
      after
        Enum.each(all, &Buffered.release/1)
      end

    # In parallel: a collect short of its count waits @quiet_ms.
    checks =
      for {kind, subs} <- ctx.subscribers, sub <- subs do
        Task.async(fn ->
          got = Buffered.collect(sub, expected, @quiet_ms)
          {kind, t, expected - length(got), Buffered.violations(got)}
        end)
      end
      |> Task.await_many(120_000)

    [{:nif_lost, ExAtlas.Test.Reliability.stats().lost_deliveries - lost_before} | checks]
  end

  # Every lane has a live sender again (the server replaced the killed one).
  defp await_senders do
    lanes = ExAtlas.Test.Reliability.stats().lanes

    ExAtlas.Test.Reliability.eventually("every lane has a sender again", fn ->
      senders = Dispatcher.Server.senders()
      length(senders) == lanes and Enum.all?(senders, &Process.alive?/1)
    end)
  end
end
