defmodule ExAtlas.Fly.Dispatcher.Reliability.ReplaySoakTest do
  # Replay under a long, mixed load: producers flood a set of topics while subscribers
  # join with random replays (on- and off-heap), stay a while and leave, or are killed
  # while catching up. Every joiner must get, per producer, an unbroken run of numbers,
  # and one still subscribed at the end must have the producer's last; replay_bytes must
  # stay within replay_memory all along; once the history is dropped (the registry
  # closes with the application) the VM's memory is back where it started.
  #
  # `mix test --include soak`; EX_ATLAS_SOAK_SECONDS (default 60) sets its length.
  use ExUnit.Case, async: false

  import ExAtlas.Test.FlyEnv

  import ExAtlas.Test.Replay

  alias ExAtlas.Fly.Dispatcher
  alias ExAtlas.Fly.Dispatcher.Backend.Registry, as: RegistryBackend

  @moduletag :soak
  @moduletag timeout: :infinity

  @topics for t <- 1..12, do: "replay-soak:#{t}"
  @producers 4
  @replay 200
  @replay_memory 4 * 1024 * 1024
  @payload for i <- 1..30, do: %{"line" => i, "text" => "replayed log line #{i}"}

  test "no gap, no duplicate, bounded memory, all of it freed with the history" do
    seconds = String.to_integer(System.get_env("EX_ATLAS_SOAK_SECONDS", "60"))
    restart_app(replay: @replay, replay_memory: @replay_memory)
    before = measure()

    producers = for p <- 1..@producers, do: start_producer(p)
    deadline = System.monotonic_time(:millisecond) + seconds * 1_000
    {checked, killed, max_bytes} = churn(deadline, 0, 0, 0)
    lasts = stop(producers)

    # Subscribers that stay to the end: each producer's run ends at its last message.
    finals = for topic <- @topics, do: start_joiner(topic, 1_000_000, false, :stay)
    more = for p <- 1..@producers, do: start_producer(p, lasts)
    Process.sleep(200)
    lasts_after = stop(more)

    for {pid, ref, topic} <- finals do
      got = collect(pid, ref)
      assert violation(got) == nil

      for p <- 1..@producers do
        last = Map.get(lasts_after, {p, topic})
        assert last == nil or last_of(got, p) == last
      end
    end

    assert checked > 0
    assert max_bytes <= @replay_memory
    assert Dispatcher.stats().replay_bytes <= @replay_memory

    IO.puts(
      "\nreplay soak: #{seconds} s, #{checked} joiners checked, #{killed} killed while " <>
        "catching up, #{Enum.sum(Map.values(lasts))} dispatches, replay_bytes at most " <>
        "#{max_bytes} of #{@replay_memory}"
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

  # Joiners come and go until the deadline: most stay a while, leave and are checked;
  # some are killed while catching up (and must leave nothing behind).
  defp churn(deadline, checked, killed, max_bytes) do
    if System.monotonic_time(:millisecond) > deadline do
      {checked, killed, max_bytes}
    else
      topic = Enum.random(@topics)
      n = Enum.random([0, 1, 10, @replay, 1_000_000])
      off_heap = :rand.uniform(2) == 1

      {checked, killed} =
        case :rand.uniform(5) do
          1 ->
            pid = spawn(fn -> Dispatcher.subscribe(topic, replay: n) end)
            Process.sleep(:rand.uniform(2) - 1)
            Process.exit(pid, :kill)
            {checked, killed + 1}

          _ ->
            {pid, ref, _} = start_joiner(topic, n, off_heap, :leave)
            Process.sleep(:rand.uniform(30))
            got = collect(pid, ref)
            assert violation(got) == nil, "#{topic}: #{inspect(violation(got))}"
            {checked + 1, killed}
        end

      churn(deadline, checked, killed, max(max_bytes, Dispatcher.stats().replay_bytes))
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

  # A joiner: subscribes with replay `n`; on :collect it unsubscribes (`:leave`) or stays
  # (`:stay`), then sends what it got.
  defp start_joiner(topic, n, off_heap, mode) do
    parent = self()
    ref = make_ref()

    pid =
      spawn_link(fn ->
        if off_heap, do: Process.flag(:message_queue_data, :off_heap)
        :ok = Dispatcher.subscribe(topic, replay: n)

        receive do
          {:collect, ^ref} ->
            if mode == :leave, do: :ok = Dispatcher.unsubscribe(topic)
            send(parent, {ref, drain([])})
        end
      end)

    {pid, ref, topic}
  end

  defp collect(pid, ref) do
    send(pid, {:collect, ref})
    assert_receive {^ref, got}, 60_000
    got
  end
end
