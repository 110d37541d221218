defmodule ExAtlas.Fly.Dispatcher.Reliability.OrderTest do
  # Issue 9, section 4, and issue 18: per-dispatcher order across topics and across the
  # delivery paths. On-heap subscribers of a small dispatch (at most 16 subscriptions in
  # the lanes) are sent to by the caller itself when nothing it handed to their lane is
  # still on its way; every other on-heap delivery goes through the lanes' sender
  # processes. Off-heap subscribers always get their messages from the caller. The
  # promise is that of a plain send/2 loop: what one process dispatches reaches each
  # subscriber in dispatch order, whichever path each dispatch took.
  #
  # On OTP 25 a receiver with `message_queue_data: :off_heap` may buffer incoming signals
  # per sender when several processes send to it at once, and the VM orders signals only
  # per pair of processes. So most subscribers here are off_heap (some on_heap for
  # contrast) and noise processes keep sending to them while several dispatchers mix one
  # big topic with small ones. (reliability/buffered_order_test.exs forces the buffered
  # mode instead of waiting for it.)
  #
  # Exact checks:
  #
  #   * order: every message carries its dispatcher's global sequence number (one counter
  #     over all topics), so each subscriber must see, per dispatcher, strictly increasing
  #     numbers; a gap is a dispatch to a topic it is not in, a repeat or a step back is
  #     a violation (a duplicate counts as out of order too);
  #   * completeness: per dispatcher and topic, each subscriber receives exactly as many
  #     messages as were dispatched to each topic it is in, and none of other topics;
  #     with the order check this means exactly the right set of messages;
  #   * both paths: `delivered_batches` counts the batches the sender processes delivered.
  #     A calibration dispatch per topic measures how many lanes (batches) each topic
  #     spans, so "everything through the senders" is a known number of batches; the
  #     shortfall is the number of batches the callers sent inline, and must be positive.
  use ExUnit.Case, async: false

  import ExAtlas.Test.Reliability
  import ExAtlas.Test.FlyEnv, only: [restart_app: 1, unique_topic: 1]

  alias ExAtlas.Fly.Dispatcher

  @moduletag timeout: :infinity

  @dispatchers 4
  @noise_senders 4
  # Topic 0 is the big one; 1..@small_topics are small.
  @big 0
  @small_topics 8
  # Subscribers of the big topic that are also in two small topics each, plus one
  # small-topic-only subscriber per small topic: 7 subscriptions per small topic, under
  # the inline limit of 16.
  @watched 24
  # Subscriptions per small-topic member to that topic's calibration twin: far above any
  # inline limit, so a calibration dispatch always goes through the sender processes.
  @calibration_copies 64
  # A finishing subscriber still short of messages reports what it has after this long
  # without any; the missing ones then show up in the completeness check.
  @straggler_ms 30_000

  @short_ms 2_000
  @short_big 1_000
  @soak_ms 60_000
  @soak_big 3_000

  test "#{@dispatchers} dispatchers mixing a #{@short_big}-subscriber topic with small ones, " <>
         "off_heap subscribers, noise senders, #{@short_ms} ms" do
    run(@short_ms, @short_big)
  end

  @tag :soak
  test "#{@dispatchers} dispatchers mixing a #{@soak_big}-subscriber topic with small ones, " <>
         "off_heap subscribers, noise senders, #{@soak_ms} ms (soak)" do
    run(@soak_ms, @soak_big)
  end

  # The other way the sender processes deliver (`config :ex_atlas, :fly, delivery:`).
  test "#{@dispatchers} dispatchers mixing big and small topics, #{@short_ms} ms, " <>
         "the other delivery path" do
    restart_app(delivery: other_delivery())
    run(@short_ms, @short_big)
  end

  defp run(duration, big_size) do
    prefix = unique_topic("order")
    names = List.to_tuple(for t <- 0..@small_topics, do: "#{prefix}:#{t}")
    calibration = List.to_tuple(for t <- 0..@small_topics, do: "#{prefix}:calibration:#{t}")

    plans = for index <- 0..(big_size + @small_topics - 1), do: plan(index)

    subscribers =
      for plan <- plans do
        [pid] = spawn_ready(1, &subscriber(plan, names, calibration, &1))
        {pid, plan}
      end

    assert Dispatcher.count(elem(names, @big)) == big_size

    for t <- 1..@small_topics,
        do: assert(Dispatcher.count(elem(names, t)) == div(2 * @watched, @small_topics) + 1)

    lanes_per_topic = calibrate(names, calibration)
    start = stats()

    noise_targets =
      for {pid, plan} <- subscribers, plan.topics != [@big] or rem(plan.index, 10) == 0, do: pid

    noise = for n <- 1..@noise_senders, do: spawn_link(fn -> noise(n, noise_targets, 0) end)

    parent = self()
    deadline = System.monotonic_time(:millisecond) + duration
    started = System.monotonic_time(:millisecond)

    dispatchers =
      for id <- 1..@dispatchers do
        spawn_link(fn -> dispatcher(id, names, deadline, parent) end)
      end

    for pid <- dispatchers, do: send(pid, :go)

    # Every dispatcher called sync/0 before handing in its counts: all it dispatched has
    # been sent.
    dispatched =
      Enum.reduce(dispatchers, %{}, fn pid, acc ->
        receive do
          {:dispatched, ^pid, id, counts} ->
            Enum.reduce(counts, acc, fn {t, n}, acc -> Map.put(acc, {id, t}, n) end)
        after
          600_000 -> flunk("dispatcher #{inspect(pid)} did not finish")
        end
      end)

    kill_all(noise)
    finish = stats()

    for {pid, _plan} <- subscribers, do: send(pid, {:finish, self(), dispatched})

    reports =
      for {pid, _plan} <- subscribers do
        receive do
          {:report, ^pid, report} -> report
        after
          @straggler_ms * 4 -> flunk("subscriber #{inspect(pid)} never reported")
        end
      end

    elapsed = System.monotonic_time(:millisecond) - started
    await_empty_registry()

    per_topic =
      Enum.reduce(dispatched, %{}, fn {{_id, t}, n}, acc -> Map.update(acc, t, n, &(&1 + n)) end)

    big_dispatches = Map.get(per_topic, @big, 0)
    small_dispatches = Enum.sum(Map.values(per_topic)) - big_dispatches
    all_through_senders = Enum.sum(for {t, n} <- per_topic, do: n * elem(lanes_per_topic, t))

    small_batches = Enum.sum(for {t, n} <- per_topic, t != @big, do: n * elem(lanes_per_topic, t))

    sender_batches = finish.delivered_batches - start.delivered_batches
    inline_batches = all_through_senders - sender_batches

    received = Enum.sum(for r <- reports, do: r.received)
    expected = Enum.sum(for r <- reports, do: Enum.sum(Map.values(r.expected)))
    out_of_order = Enum.sum(for r <- reports, do: r.out_of_order)
    noise_received = Enum.sum(for r <- reports, do: r.noise)

    IO.puts(
      "\norder #{duration} ms (delivery #{inspect(ExAtlas.Fly.Dispatcher.Config.delivery())}): " <>
        "#{big_dispatches + small_dispatches} dispatches (#{big_dispatches} to the " <>
        "#{big_size}-subscriber topic, #{small_dispatches} to #{@small_topics} small ones), " <>
        "#{received} deliveries (#{expected} expected) to #{length(reports)} subscribers, " <>
        "#{out_of_order} out of order, #{noise_received} noise messages; " <>
        "lanes per topic #{inspect(lanes_per_topic)}; batches: #{sender_batches} by the " <>
        "sender processes, #{inline_batches} of #{small_batches} small-topic batches " <>
        "sent inline; #{elapsed} ms"
    )

    disordered = for r <- reports, r.out_of_order > 0, do: {r.pid, r.index, r.examples}

    assert out_of_order == 0,
           "#{out_of_order} messages out of order at #{length(disordered)} subscribers, " <>
             "first ones ({subscriber, index, [{dispatcher, previous seq, seq}]}):\n" <>
             Enum.map_join(Enum.take(disordered, 10), "\n", &inspect/1)

    incomplete =
      for r <- reports, r.counts != r.expected do
        diff =
          for key <- Enum.uniq(Map.keys(r.counts) ++ Map.keys(r.expected)),
              Map.get(r.counts, key, 0) != Map.get(r.expected, key, 0),
              do: {key, got: Map.get(r.counts, key, 0), want: Map.get(r.expected, key, 0)}

        {r.pid, r.index, diff}
      end

    assert incomplete == [],
           "#{length(incomplete)} subscribers did not get exactly what was dispatched to " <>
             "their topics, first ones ({subscriber, index, [{{dispatcher, topic}, counts}]}):\n" <>
             Enum.map_join(Enum.take(incomplete, 10), "\n", &inspect/1)

    # Not vacuous: every subscriber was expected to get something, and did.
    assert Enum.all?(reports, &(&1.received > 0))
    assert received == expected
    assert big_dispatches > 0 and small_dispatches > 0
    assert noise_received > 0

    # Both paths: the big topic can only go through the sender processes, and some small
    # dispatches found their lanes idle and were sent by the caller.
    assert sender_batches >= big_dispatches * elem(lanes_per_topic, @big)
    assert inline_batches > 0, "no small dispatch was sent inline"
    assert inline_batches <= small_batches
  end

  # Subscriber `index`: the first @watched are in the big topic and two small ones, the
  # next @small_topics in one small topic only, the rest in the big topic only. One in
  # four keeps its message queue on the heap.
  defp plan(index) do
    topics =
      cond do
        index < @watched ->
          [@big, rem(index, @small_topics) + 1, rem(index + 3, @small_topics) + 1]

        index < @watched + @small_topics ->
          [index - @watched + 1]

        true ->
          [@big]
      end

    %{index: index, topics: topics, off_heap: rem(index, 4) != 3}
  end

  # Lanes (= batches of a dispatch through the senders) each topic's on-heap subscribers
  # span: one dispatch each that cannot go inline, measured with `delivered_batches`
  # around it.
  defp calibrate(names, calibration) do
    lanes =
      for t <- 0..@small_topics do
        topic = if t == @big, do: elem(names, @big), else: elem(calibration, t)
        :ok = Dispatcher.sync()
        before = stats().delivered_batches
        :ok = Dispatcher.dispatch(topic, {:calibrate, t})
        :ok = Dispatcher.sync()
        batches = stats().delivered_batches - before
        # Off-heap subscribers are sent to by the dispatching process itself, never by a
        # sender: a small topic of off-heap members only spans no lane.
        least = if t == @big, do: 1, else: 0
        assert batches in least..stats().lanes, "calibration of topic #{t}: #{batches} batches"
        batches
      end

    List.to_tuple(lanes)
  end

  # --- dispatchers -------------------------------------------------------------------

  defp dispatcher(id, names, deadline, parent) do
    receive do
      :go -> :ok
    end

    counts = dispatch_loop(id, names, deadline, 1, %{})
    :ok = Dispatcher.sync()
    send(parent, {:dispatched, self(), id, counts})
  end

  # One dispatch in four goes to the big topic, the others to a random small one, with
  # one global sequence number per dispatcher.
  defp dispatch_loop(id, names, deadline, seq, counts) do
    if System.monotonic_time(:millisecond) >= deadline do
      counts
    else
      t = if :rand.uniform(4) == 1, do: @big, else: :rand.uniform(@small_topics)
      :ok = Dispatcher.dispatch(elem(names, t), {:order, id, seq, t})
      if t == @big, do: pace()
      dispatch_loop(id, names, deadline, seq + 1, Map.update(counts, t, 1, &(&1 + 1)))
    end
  end

  # After a big dispatch: wait for it to be delivered (the next small one then usually
  # finds the lanes idle and goes inline, just after the senders' last sends), pause, or
  # go straight on (the next small ones queue behind it in the lanes). The waits also
  # keep the lanes from filling up, so they are idle often enough.
  defp pace do
    case :rand.uniform(4) do
      n when n <= 2 -> :ok = Dispatcher.sync()
      3 -> Process.sleep(1)
      4 -> :ok
    end
  end

  # --- noise -------------------------------------------------------------------------

  # Sends to the subscribers while the dispatchers do, so several processes send to each
  # receiver at once; a short pause per round keeps the mailboxes small.
  defp noise(n, targets, round) do
    for pid <- targets, do: send(pid, {:noise, n})
    Process.sleep(rem(round, 2))
    noise(n, targets, round + 1)
  end

  # --- subscribers -------------------------------------------------------------------

  defp subscriber(plan, names, calibration, ready) do
    if plan.off_heap, do: Process.flag(:message_queue_data, :off_heap)
    for t <- plan.topics, do: :ok = Dispatcher.subscribe(elem(names, t))

    for t <- plan.topics,
        t != @big,
        _ <- 1..@calibration_copies,
        do: :ok = Dispatcher.subscribe(elem(calibration, t))

    ready.()

    listen(%{
      plan: plan,
      last: %{},
      counts: %{},
      received: 0,
      out_of_order: 0,
      examples: [],
      noise: 0
    })
  end

  defp listen(state) do
    receive do
      {:order, id, seq, t} -> listen(record(state, id, seq, t))
      {:noise, _} -> listen(%{state | noise: state.noise + 1})
      {:calibrate, _} -> listen(state)
      {:finish, parent, dispatched} -> finish(state, parent, expected(state.plan, dispatched))
    end
  end

  # Per dispatcher, each sequence number must be greater than the last one seen.
  defp record(state, id, seq, t) do
    state =
      case state.last do
        %{^id => last} when last >= seq ->
          examples =
            if state.out_of_order < 5,
              do: [{id, last, seq} | state.examples],
              else: state.examples

          %{state | out_of_order: state.out_of_order + 1, examples: examples}

        _ ->
          state
      end

    %{
      state
      | counts: Map.update(state.counts, {id, t}, 1, &(&1 + 1)),
        received: state.received + 1,
        last: Map.put(state.last, id, seq)
    }
  end

  # What this subscriber must receive: per dispatcher and topic, everything dispatched
  # to the topics it is in (each subscription once; no plan subscribes twice).
  defp expected(plan, dispatched) do
    for {{_id, t} = key, n} <- dispatched, t in plan.topics, into: %{}, do: {key, n}
  end

  # Waits for the messages still on their way. The dispatchers synced before :finish was
  # sent, but :finish comes from another process than the dispatch messages, and the VM
  # orders signals per pair of processes only; waiting for the expected counts keeps the
  # end marker out of what is checked.
  defp finish(state, parent, expected) do
    if state.counts == expected do
      state |> drain() |> report(parent, expected)
    else
      receive do
        {:order, id, seq, t} -> finish(record(state, id, seq, t), parent, expected)
        {:noise, _} -> finish(%{state | noise: state.noise + 1}, parent, expected)
        {:calibrate, _} -> finish(state, parent, expected)
      after
        @straggler_ms -> report(state, parent, expected)
      end
    end
  end

  # Anything beyond the expected messages that is already here.
  defp drain(state) do
    receive do
      {:order, id, seq, t} -> drain(record(state, id, seq, t))
      {:noise, _} -> drain(%{state | noise: state.noise + 1})
      {:calibrate, _} -> drain(state)
    after
      0 -> state
    end
  end

  defp report(state, parent, expected) do
    send(parent, {
      :report,
      self(),
      %{
        pid: self(),
        index: state.plan.index,
        counts: state.counts,
        expected: expected,
        received: state.received,
        out_of_order: state.out_of_order,
        examples: Enum.reverse(state.examples),
        noise: state.noise
      }
    })
  end

  defp other_delivery do
    if ExAtlas.Fly.Dispatcher.Config.delivery() == :dirty, do: :scheduler, else: :dirty
  end
end
