defmodule ExAtlas.Fly.Dispatcher.OrderingTest do
  # Per-sender order: what one process dispatches reaches each subscriber in dispatch
  # order, across topics too, exactly once per subscription, as a send/2 loop would.
  use ExUnit.Case, async: true

  alias ExAtlas.Fly.Dispatcher
  import ExAtlas.Test.FlyEnv, only: [unique_topic: 1]

  @producers 4
  @per_producer 400

  test "several dispatching processes over two topics: every sequence number once, in order" do
    even = unique_topic("even")
    odd = unique_topic("odd")

    # Which sequence numbers each subscriber must see from every producer.
    kinds = [
      {[even], &(rem(&1, 2) == 0)},
      {[odd], &(rem(&1, 2) == 1)},
      {[even, odd], fn _ -> true end},
      {[even, even, odd], fn _ -> true end}
    ]

    parent = self()

    subscribers =
      for {topics, wanted} <- kinds, _ <- 1..8 do
        expected = for n <- 1..@per_producer, wanted.(n), do: n
        # Subscribed twice to `even`: each dispatch is delivered once per subscription, so
        # every even number arrives twice, back to back.
        expected = if topics == [even, even, odd], do: duplicate_evens(expected), else: expected
        pid = spawn_link(fn -> subscriber(topics, expected, parent) end)
        {pid, expected}
      end

    for {pid, _} <- subscribers, do: assert_receive({:subscribed, ^pid}, 5_000)

    producers =
      for p <- 1..@producers do
        spawn_link(fn ->
          receive do
            :go -> :ok
          end

          for n <- 1..@per_producer do
            topic = if rem(n, 2) == 0, do: even, else: odd
            :ok = Dispatcher.dispatch(topic, {:seq, p, n})
          end

          :ok = Dispatcher.sync()
          send(parent, {:produced, self()})
        end)
      end

    for pid <- producers, do: send(pid, :go)
    for pid <- producers, do: assert_receive({:produced, ^pid}, 30_000)

    # Every producer synced, so everything is in the mailboxes before :report.
    for {pid, _} <- subscribers, do: send(pid, :report)

    for {pid, expected} <- subscribers do
      assert_receive {:report, ^pid, result}, 30_000
      assert result == Map.new(1..@producers, &{&1, {:ok, length(expected)}})
    end
  end

  test "one process dispatching to many subscribers keeps its order for each of them" do
    topic = unique_topic("fanout")
    parent = self()
    expected = Enum.to_list(1..300)

    subscribers =
      for _ <- 1..300 do
        pid = spawn_link(fn -> subscriber([topic], expected, parent) end)
        assert_receive {:subscribed, ^pid}, 5_000
        pid
      end

    for n <- expected, do: :ok = Dispatcher.dispatch(topic, {:seq, 1, n})
    :ok = Dispatcher.sync()

    for pid <- subscribers, do: send(pid, :report)

    for pid <- subscribers do
      assert_receive {:report, ^pid, %{1 => {:ok, 300}}}, 30_000
    end
  end

  # A dispatch to a few subscriptions is sent by the caller itself when the lanes involved
  # have nothing in flight; it must never overtake a batch of a larger dispatch that the
  # same caller queued just before.
  test "small dispatches sent inline never overtake the caller's queued batches" do
    big = unique_topic("big")
    small = unique_topic("small")
    parent = self()
    rounds = 400
    expected = Enum.to_list(1..(2 * rounds))

    # Six subscribers get both topics (every number, in order); 300 more make `big` large
    # enough to always go through the sender processes.
    both =
      for _ <- 1..6 do
        pid = spawn_link(fn -> subscriber([big, small], expected, parent) end)
        assert_receive {:subscribed, ^pid}, 5_000
        pid
      end

    only_big = for n <- 1..(2 * rounds), rem(n, 2) == 1, do: n

    crowd =
      for _ <- 1..300 do
        pid = spawn_link(fn -> subscriber([big], only_big, parent) end)
        assert_receive {:subscribed, ^pid}, 5_000
        pid
      end

    for r <- 1..rounds do
      :ok = Dispatcher.dispatch(big, {:seq, 1, 2 * r - 1})
      :ok = Dispatcher.dispatch(small, {:seq, 1, 2 * r})
    end

    :ok = Dispatcher.sync()

    for pid <- both ++ crowd, do: send(pid, :report)
    for pid <- both, do: assert_receive({:report, ^pid, %{1 => {:ok, 800}}}, 30_000)
    for pid <- crowd, do: assert_receive({:report, ^pid, %{1 => {:ok, 400}}}, 30_000)
  end

  defp duplicate_evens(numbers) do
    Enum.flat_map(numbers, fn n -> if rem(n, 2) == 0, do: [n, n], else: [n] end)
  end

  # Checks each message as it arrives: per producer, the next expected sequence number.
  # Reports %{producer => {:ok, received}} or the first mismatch.
  defp subscriber(topics, expected, parent) do
    for topic <- topics, do: :ok = Dispatcher.subscribe(topic)
    send(parent, {:subscribed, self()})
    send(parent, {:report, self(), check(%{}, expected)})
  end

  defp check(state, expected) do
    receive do
      {:seq, producer, n} ->
        {remaining, received} = Map.get(state, producer, {expected, 0})

        case remaining do
          [^n | rest] ->
            check(Map.put(state, producer, {rest, received + 1}), expected)

          _ ->
            drain_until_report()
            mismatch = {:unexpected, n, :wanted, List.first(remaining), :after, received}
            state |> summarise() |> Map.put(producer, mismatch)
        end

      :report ->
        summarise(state)
    end
  end

  defp summarise(state) do
    Map.new(state, fn
      {producer, {[], received}} -> {producer, {:ok, received}}
      {producer, {[next | _], received}} -> {producer, {:missing_from, next, :after, received}}
    end)
  end

  defp drain_until_report do
    receive do
      :report -> :ok
      _ -> drain_until_report()
    end
  end
end
