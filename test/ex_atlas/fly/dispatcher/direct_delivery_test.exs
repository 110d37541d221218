defmodule ExAtlas.Fly.Dispatcher.DirectDeliveryTest do
  # Issue 18: who sends to whom. A subscriber whose message queue is off-heap when it
  # subscribes gets every message from the dispatching process itself, never from a
  # sender (OTP may fetch an off-heap queue's messages from different senders out of
  # send order); the caller then sends in NIF calls bounded in time, resuming after each
  # with the VM free to preempt it. A small dispatch to on-heap subscribers is sent by
  # the caller whenever nothing of its own is on its way through their lane, however
  # busy other producers keep the lanes.
  use ExUnit.Case, async: false

  import ExAtlas.Test.Reliability, only: [stats: 0]
  import ExAtlas.Test.FlyEnv, only: [unique_topic: 1]

  alias ExAtlas.Fly.Dispatcher
  alias ExAtlas.Fly.Dispatcher.Backend.Registry, as: RegistryBackend
  alias ExAtlas.Fly.Dispatcher.Native
  alias ExAtlas.Fly.Dispatcher.Server

  # Subscribers that report each message they get to the test, tagged with their pid.
  defp subscribers(topic, n, queue) do
    parent = self()

    for _ <- 1..n do
      pid =
        spawn_link(fn ->
          Process.flag(:message_queue_data, queue)
          :ok = Dispatcher.subscribe(topic)
          send(parent, {:ready, self()})
          relay(parent)
        end)

      assert_receive {:ready, ^pid}, 5_000
      pid
    end
  end

  defp relay(parent) do
    receive do
      message ->
        send(parent, {:got, self(), message})
        relay(parent)
    end
  end

  # How often the caller went back to the NIF to go on with a dispatch (calls of the
  # backend's `make_room/3`, which every `{:more, pending}` and each `:more` after it
  # goes through), and what the NIF answered the caller's last `resume/2`: `:ok` when
  # the caller finished the dispatch itself.
  defp resume_calls(fun) do
    mfa = {RegistryBackend, :make_room, 3}
    resume = {Native, :resume, 2}
    parent = self()

    producer =
      spawn_link(fn ->
        receive do: (:go -> :ok)
        fun.()
        send(parent, :dispatched)
      end)

    1 = :erlang.trace(producer, true, [:call])
    1 = :erlang.trace_pattern(mfa, true, [:local])
    1 = :erlang.trace_pattern(resume, [{:_, [], [{:return_trace}]}], [:local])

    try do
      send(producer, :go)
      assert_receive :dispatched, 10_000
    after
      :erlang.trace_pattern(mfa, false, [:local])
      :erlang.trace_pattern(resume, false, [:local])
    end

    count_traces(0, nil)
  end

  defp count_traces(n, last) do
    receive do
      {:trace, _, :call, {RegistryBackend, :make_room, _}} -> count_traces(n + 1, last)
      {:trace, _, :call, {Native, :resume, _}} -> count_traces(n, last)
      {:trace, _, :return_from, {Native, :resume, 2}, answer} -> count_traces(n, answer)
    after
      0 -> {n, last}
    end
  end

  test "off-heap subscribers get every message from the caller, in bounded NIF calls" do
    topic = unique_topic("direct")
    pids = subscribers(topic, 3_000, :off_heap)
    :ok = Dispatcher.sync()
    before = stats().delivered_batches
    message = {:ex_atlas_fly_logs, "app", Enum.map(1..20, &%{"line" => &1})}
    senders = Server.senders()

    # No sender runs during the dispatch: what a subscriber has when it answers a probe
    # the caller sent it once the dispatch returned (behind the message, from the same
    # process), the caller sent itself. Each subscriber reports in the order it got
    # them, so its first report must be the message and its second the probe (a part
    # left to a suspended sender arrives after the probe, and fails here). Another
    # process that finished the dispatch for the caller may still beat the probe: that
    # the caller's own last call finished it is checked on the trace (`last`).
    for sender <- senders, do: true = :erlang.suspend_process(sender)

    {{calls, last}, in_flight} =
      try do
        ref = make_ref()

        calls =
          resume_calls(fn ->
            :ok = Dispatcher.dispatch(topic, message)
            for pid <- pids, do: send(pid, {:probe, ref})
          end)

        for pid <- pids do
          assert_receive {:got, ^pid, first}, 5_000
          assert first == message, "#{inspect(pid)} got #{inspect(first)} before the message"
          assert_receive {:got, ^pid, {:probe, ^ref}}, 5_000
        end

        {calls, stats().in_flight}
      after
        for sender <- senders, do: :erlang.resume_process(sender)
      end

    # 3 000 copies of a 20-map batch take far longer than one 0.5 ms slice: the caller
    # came back for more, until its own last call finished the dispatch. Every
    # subscriber had the message while the senders were suspended, and no batch was
    # handed to them.
    assert calls > 0
    assert last == :ok, "the caller's last resume/2 answered #{inspect(last)}"
    assert in_flight == 0

    # Once the senders ran and answered sync/0, none had delivered anything, and no
    # subscriber got the message twice.
    :ok = Dispatcher.sync()
    assert stats().delivered_batches == before
    ref = make_ref()
    for pid <- pids, do: send(pid, {:probe, ref})
    for pid <- pids, do: assert_receive({:got, ^pid, {:probe, ^ref}}, 5_000)
    refute_received {:got, _, _}
  end

  test "a topic of on-heap and off-heap subscribers: the lanes for one, the caller for the other" do
    topic = unique_topic("mixed")
    on_heap = subscribers(topic, 40, :on_heap)
    off_heap = subscribers(topic, 40, :off_heap)
    before = stats().delivered_batches

    # With every sender suspended, only what the caller sends itself can arrive: all of
    # it for the off-heap subscribers, none for the on-heap ones (40 are more than a
    # small dispatch, so they go through the senders).
    senders = RegistryBackend.dispatcher!() |> ExAtlas.Fly.Dispatcher.Native.senders()
    for sender <- senders, do: :erlang.suspend_process(sender)

    try do
      for seq <- 1..20, do: :ok = Dispatcher.dispatch(topic, {:seq, seq})
      for pid <- off_heap, do: assert(received(pid, 20) == Enum.to_list(1..20))
      for pid <- on_heap, do: refute_received({:got, ^pid, _})
    after
      for sender <- senders, do: :erlang.resume_process(sender)
    end

    :ok = Dispatcher.sync()
    assert stats().delivered_batches > before
    # Each in dispatch order.
    for pid <- on_heap, do: assert(received(pid, 20) == Enum.to_list(1..20))
    refute_received {:got, _, _}
  end

  # The first `n` sequence numbers `pid` reported, in the order it got them.
  defp received(pid, n) do
    for _ <- 1..n do
      assert_receive {:got, ^pid, {:seq, seq}}, 5_000
      seq
    end
  end

  test "a small dispatch is sent by its producer while another producer keeps the lanes busy" do
    big = unique_topic("busy")
    small = unique_topic("small")
    _big_subscribers = subscribers(big, 2_000, :on_heap)
    [small_subscriber] = subscribers(small, 1, :on_heap)
    parent = self()
    :ok = Dispatcher.sync()
    before = stats().delivered_batches

    # Another producer keeps every lane busy with big dispatches meanwhile, one batch per
    # lane each.
    busy = spawn_link(fn -> busy(big, parent, 0) end)
    assert_receive :busy
    assert stats().in_flight > 0, "the lanes were not busy"

    for seq <- 1..200, do: :ok = Dispatcher.dispatch(small, {:small, seq})
    :ok = Dispatcher.sync()
    send(busy, :stop)
    assert_receive {:busy_done, dispatches}, 30_000
    for seq <- 1..200, do: assert_receive({:got, ^small_subscriber, {:small, ^seq}}, 5_000)

    # Every batch delivered was the busy producer's: none of the 200 small dispatches
    # was handed to a sender, although the lanes were never idle.
    assert stats().delivered_batches - before == dispatches * stats().lanes
  end

  defp busy(topic, parent, n) do
    if n == 1, do: send(parent, :busy)

    receive do
      :stop ->
        :ok = Dispatcher.sync()
        send(parent, {:busy_done, n})
    after
      0 ->
        :ok = Dispatcher.dispatch(topic, :busy)
        busy(topic, parent, n + 1)
    end
  end
end
