defmodule ExAtlas.Fly.Dispatcher.Reliability.ReplaySoakTest do
  # Replay under a long, mixed load: producers flood a set of topics while subscribers
  # join with random replays (on- and off-heap), stay a while and leave, or are killed
  # while catching up, or are suspended (`:erlang.suspend_process/1`) and resumed: at a
  # random moment of subscribe/2, or placed mid-replay (as replay_test.exs's stalled
  # joiner), for anything from no time to longer than it takes to be cut. Every
  # joiner must be complete or told (`account/3`): per producer an unbroken run of
  # numbers up to the producer's last at the time it is checked, except across gap
  # notices, which add up to what is missing; and what its notices tell must be exactly
  # what the registry counted (`replay_missed`) while it joined. replay_bytes must stay
  # within replay_memory all along; once the history is dropped (the registry closes
  # with the application) the VM's memory is back where it started.
  #
  # `mix test --include soak`; EX_ATLAS_SOAK_SECONDS (default 60) sets its length.
  use ExUnit.Case, async: false

  import ExAtlas.Test.FlyEnv

  import ExAtlas.Test.Replay

  alias ExAtlas.Fly.Dispatcher
  alias ExAtlas.Fly.Dispatcher.Backend.Registry, as: RegistryBackend
  alias ExAtlas.Fly.Dispatcher.Native

  @moduletag :soak
  @moduletag timeout: :infinity

  @topics for t <- 1..12, do: "replay-soak:#{t}"
  @producers 4
  @replay 200
  @replay_memory 4 * 1024 * 1024
  @payload for i <- 1..30, do: %{"line" => i, "text" => "replayed log line #{i}"}
  # How long a suspended joiner stays suspended, in ms: from not at all to longer than
  # it takes the producers to get it cut (past its cap, about 150 of these messages
  # beyond the history, or JOIN_SLACK, 256 dispatches, further behind): a few ms at
  # full speed, some tens on a busy two-core machine.
  @holds [0, 1, 5, 20, 50]
  # Past the deadline, the churn goes on (this much longer at most) until some joiner was
  # suspended mid-replay and some was cut: a short run checks those too.
  @overtime_ms 60_000

  test "no gap, no duplicate, bounded memory, all of it freed with the history" do
    seconds = String.to_integer(System.get_env("EX_ATLAS_SOAK_SECONDS", "60"))
    restart_app(replay: @replay, replay_memory: @replay_memory)
    before = measure()

    producers = for p <- 1..@producers, do: start_producer(p)
    deadline = System.monotonic_time(:millisecond) + seconds * 1_000
    figures = churn(producers, deadline, figures())
    lasts = stop(producers)

    # Subscribers that stay to the end, still catching up when the producers go on: each
    # producer's run ends at its last message, or a notice tells what is missing.
    missed_before = Dispatcher.stats().replay_missed
    finals = for topic <- @topics, do: start_joiner(topic, 1_000_000, false, :stay)
    more = for p <- 1..@producers, do: start_producer(p, lasts)
    Process.sleep(200)
    lasts_after = stop(more)

    told =
      for {pid, ref, topic} <- finals do
        assert_receive {^ref, :subscribed}, 60_000
        got = collect(pid, ref)
        topic_lasts = for p <- 1..@producers, do: Map.get(lasts_after, {p, topic}, 0)
        assert account(got, topic_lasts) == nil, "#{topic}: #{account(got, topic_lasts)}"
        Enum.sum(elem(split_gaps(got), 0))
      end

    assert Enum.sum(told) == Dispatcher.stats().replay_missed - missed_before

    assert figures.checked > 0
    assert figures.mid_replay > 0 and figures.cut > 0
    assert figures.max_bytes <= @replay_memory
    assert Dispatcher.stats().replay_bytes <= @replay_memory

    IO.puts(
      "\nreplay soak: #{seconds} s, #{figures.checked} joiners checked " <>
        "(#{figures.suspended} suspended, #{figures.mid_replay} of them mid-replay), " <>
        "#{figures.cut} cut, #{figures.missed} dispatches missed and told, " <>
        "#{figures.killed} killed while catching up, " <>
        "#{Enum.sum(Map.values(lasts))} dispatches, replay_bytes at most " <>
        "#{figures.max_bytes} of #{@replay_memory}"
    )

    # The history goes with the registry: a fresh one, with the same settings, takes the
    # VM back to where it started.
    restart_app(replay: @replay, replay_memory: @replay_memory)
    :erlang.garbage_collect()
    after_run = measure()
    assert after_run.nif <= before.nif + 256 * 1024, inspect({before, after_run})
    assert after_run.total <= before.total + 16 * 1024 * 1024, inspect({before, after_run})
  end

  defp measure do
    for pid <- Process.list(), do: :erlang.garbage_collect(pid)
    %{nif: RegistryBackend.stats()[:allocated_bytes] || 0, total: :erlang.memory(:total)}
  end

  defp figures,
    do: %{checked: 0, killed: 0, suspended: 0, mid_replay: 0, cut: 0, missed: 0, max_bytes: 0}

  # Joiners come and go until the deadline: most stay a while, leave and are checked;
  # some are suspended and resumed first (and checked); some are killed while catching
  # up (and must leave nothing behind). One joiner at a time: what the registry counts
  # as missed meanwhile is that joiner's.
  defp churn(producers, deadline, figures) do
    now = System.monotonic_time(:millisecond)

    if now > deadline and
         (now > deadline + @overtime_ms or (figures.mid_replay > 0 and figures.cut > 0)) do
      figures
    else
      topic = Enum.random(@topics)
      n = Enum.random([0, 1, 10, @replay, 1_000_000])
      off_heap = :rand.uniform(2) == 1

      figures =
        case :rand.uniform(6) do
          1 ->
            pid = spawn(fn -> Dispatcher.subscribe(topic, replay: n) end)
            Process.sleep(:rand.uniform(2) - 1)
            Process.exit(pid, :kill)
            eventually(fn -> RegistryBackend.stats().replay_joiners == 0 end)
            %{figures | killed: figures.killed + 1}

          2 ->
            # Suspended at a random moment of subscribe/2, or after it.
            check_joiner(producers, topic, figures, fn ->
              joiner = start_joiner(topic, n, off_heap, :leave)
              Process.sleep(:rand.uniform(3) - 1)
              {joiner, suspend_for(elem(joiner, 0))}
            end)

          3 ->
            # Placed mid-replay: joined, one chunk sent (when the topic keeps more).
            check_joiner(producers, topic, figures, fn ->
              start_stalled_joiner(topic, Enum.random([@replay, 1_000_000]), off_heap)
            end)

          _ ->
            check_joiner(producers, topic, figures, fn ->
              {start_joiner(topic, n, off_heap, :leave), :running}
            end)
        end

      churn(producers, deadline, %{
        figures
        | max_bytes: max(figures.max_bytes, Dispatcher.stats().replay_bytes)
      })
    end
  end

  # Starts a joiner with `start` (which answers it and whether it was suspended, and
  # where), lets it stay a while once subscribed, takes each producer's last number for
  # its topic, and checks what it got up to those: complete or told, and told exactly
  # what the registry counted as missed while it joined.
  defp check_joiner(producers, topic, figures, start) do
    missed_before = Dispatcher.stats().replay_missed
    {{pid, ref, ^topic}, suspended} = start.()
    assert_receive {^ref, :subscribed}, 60_000
    Process.sleep(:rand.uniform(30))
    lasts = marks(producers, topic)
    got = collect(pid, ref) |> up_to(lasts)
    missed = Dispatcher.stats().replay_missed - missed_before

    assert account(got, lasts) == nil,
           "#{topic} (#{inspect(suspended)}): #{account(got, lasts)} in #{brief(got)}"

    told = Enum.sum(elem(split_gaps(got), 0))
    assert told == missed, "#{topic} (#{inspect(suspended)}): told #{told}, counted #{missed}"

    %{
      figures
      | checked: figures.checked + 1,
        suspended: figures.suspended + if(suspended == :running, do: 0, else: 1),
        mid_replay: figures.mid_replay + if(suspended == :mid_replay, do: 1, else: 0),
        cut: figures.cut + if(told > 0, do: 1, else: 0),
        missed: figures.missed + told
    }
  end

  # Suspends `pid` for one of @holds; answers whether it was then catching up (the
  # only joiner the registry holds) or not.
  defp suspend_for(pid) do
    true = :erlang.suspend_process(pid)
    where = if RegistryBackend.stats().replay_joiners > 0, do: :mid_replay, else: :suspended
    Process.sleep(Enum.random(@holds))
    true = :erlang.resume_process(pid)
    where
  end

  # What a joiner got, without the payloads: {producer, n} and the notices.
  defp brief(got) do
    got
    |> Enum.map(fn
      {:seq, p, n, _} -> {p, n}
      notice -> notice
    end)
    |> inspect(limit: 200)
  end

  # Messages of each producer past its number in `lasts` come after the check's moment.
  defp up_to(got, lasts) do
    Enum.reject(got, fn
      {:seq, p, n, _} -> n > Enum.at(lasts, p - 1)
      _notice -> false
    end)
  end

  # Each producer's last number for `topic`, once everything it dispatched before is
  # delivered (it syncs first).
  defp marks(producers, topic) do
    ref = make_ref()
    for pid <- producers, do: send(pid, {:mark, self(), ref, topic})

    for pid <- producers do
      assert_receive {^ref, ^pid, last}, 60_000
      last
    end
  end

  # Producer `p` numbers its messages per topic, going on from `counts`.
  defp start_producer(p, counts \\ %{}) do
    parent = self()
    spawn_link(fn -> produce(parent, p, counts) end)
  end

  defp produce(parent, p, counts) do
    receive do
      :stop ->
        :ok = Dispatcher.sync()
        send(parent, {:stopped, self(), Map.filter(counts, &match?({{^p, _}, _}, &1))})

      {:mark, from, ref, topic} ->
        :ok = Dispatcher.sync()
        send(from, {ref, self(), Map.get(counts, {p, topic}, 0)})
        produce(parent, p, counts)
    after
      0 ->
        topic = Enum.random(@topics)
        i = Map.get(counts, {p, topic}, 0) + 1
        :ok = Dispatcher.dispatch(topic, {:seq, p, i, @payload})
        produce(parent, p, Map.put(counts, {p, topic}, i))
    end
  end

  defp stop(producers) do
    for pid <- producers, do: send(pid, :stop)

    Enum.reduce(producers, %{}, fn pid, acc ->
      assert_receive {:stopped, ^pid, counts}, 60_000
      Map.merge(acc, counts)
    end)
  end

  # A joiner: subscribes with replay `n` and says so; on :collect it unsubscribes
  # (`:leave`) or stays (`:stay`), then sends what it got.
  defp start_joiner(topic, n, off_heap, mode) do
    parent = self()
    ref = make_ref()

    pid =
      spawn_link(fn ->
        if off_heap, do: Process.flag(:message_queue_data, :off_heap)
        :ok = Dispatcher.subscribe(topic, replay: n)
        send(parent, {ref, :subscribed})
        leave_and_report(parent, ref, topic, mode)
      end)

    {pid, ref, topic}
  end

  # A joiner placed in the middle of its replay, as subscribe(topic, replay: n) would be
  # there: joined through the NIF, one chunk of its replay sent (`Native.replay/2`).
  # When the topic kept more than that chunk, it is suspended there for one of @holds,
  # then goes on with the production code (`RegistryBackend.catch_up/2`). Then as
  # `start_joiner/4` with `:leave`.
  defp start_stalled_joiner(topic, n, off_heap) do
    parent = self()
    ref = make_ref()
    dispatcher = RegistryBackend.dispatcher!()

    pid =
      spawn_link(fn ->
        if off_heap, do: Process.flag(:message_queue_data, :off_heap)
        :ok = Native.join(dispatcher, topic, n, off_heap)
        first = Native.replay(dispatcher, topic)
        send(parent, {ref, :mid_replay, first})

        if first != :ok do
          receive do
            {^ref, :go} -> :ok
          end

          :ok = RegistryBackend.catch_up(dispatcher, topic)
        end

        send(parent, {ref, :subscribed})
        leave_and_report(parent, ref, topic, :leave)
      end)

    assert_receive {^ref, :mid_replay, first}, 60_000

    if first == :ok do
      {{pid, ref, topic}, :running}
    else
      where = suspend_for(pid)
      send(pid, {ref, :go})
      {{pid, ref, topic}, where}
    end
  end

  defp leave_and_report(parent, ref, topic, mode) do
    receive do
      {:collect, ^ref} ->
        if mode == :leave, do: :ok = Dispatcher.unsubscribe(topic)
        send(parent, {ref, drain([])})
    end
  end

  defp collect(pid, ref) do
    send(pid, {:collect, ref})
    assert_receive {^ref, got}, 60_000
    got
  end
end
