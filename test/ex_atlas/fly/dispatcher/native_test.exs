defmodule ExAtlas.Fly.Dispatcher.NativeTest do
  # The NIF's hand-over protocol, one step at a time, on a dispatcher of the test's own
  # (never published, so the application's registry is untouched). The test process
  # plays the lanes' sender: it receives the batches and delivers them, or drops them.
  use ExUnit.Case, async: true

  import ExAtlas.Test.FlyEnv, only: [eventually: 1]

  alias ExAtlas.Fly.Dispatcher.Native

  @deliver :"$ex_atlas_deliver"
  @room :"$ex_atlas_room"

  defp new_dispatcher(lanes, capacity) do
    dispatcher = Native.new(lanes, capacity, 0, 1)
    :ok = Native.set_senders(dispatcher, List.duplicate(self(), lanes))
    on_exit(fn -> Native.close(dispatcher) end)
    dispatcher
  end

  defp stats(dispatcher), do: Map.new(Native.stats(dispatcher))

  # `n` processes subscribed to `topic` that forward what they get to the test.
  defp subscribers(dispatcher, topic, n) do
    parent = self()

    for _ <- 1..n do
      pid =
        spawn_link(fn ->
          :ok = Native.subscribe(dispatcher, topic, false)
          send(parent, {:subscribed, self()})
          forward(parent)
        end)

      assert_receive {:subscribed, ^pid}
      pid
    end
  end

  defp forward(parent) do
    receive do
      message ->
        send(parent, {:got, self(), message})
        forward(parent)
    end
  end

  test "set_senders/2 takes exactly one pid per lane, as a proper list" do
    dispatcher = Native.new(2, 4, 0, 1)
    assert_raise ArgumentError, fn -> Native.set_senders(dispatcher, [self()]) end
    assert_raise ArgumentError, fn -> Native.set_senders(dispatcher, [self(), self(), self()]) end
    assert_raise ArgumentError, fn -> Native.set_senders(dispatcher, [self() | self()]) end
    assert Native.senders(dispatcher) == [:undefined, :undefined]
    assert :ok = Native.set_senders(dispatcher, [self(), self()])
    assert Native.senders(dispatcher) == [self(), self()]
    Native.close(dispatcher)
  end

  test "dispatch/2 and publish/1 refuse bad arguments with badarg, changing nothing" do
    # The application's registry is the published one; this process subscribes to a
    # topic of its own there (its exit removes it), and the published dispatcher must
    # still deliver after.
    topic = "native_test:published:#{System.unique_integer([:positive])}"
    :ok = ExAtlas.Fly.Dispatcher.subscribe(topic)
    published = ExAtlas.Fly.Dispatcher.Backend.Registry.dispatcher!()

    assert_raise ArgumentError, fn -> Native.dispatch(:not_a_binary, :m) end
    assert_raise ArgumentError, fn -> Native.dispatch(~c"topic", :m) end

    for bad <- [nil, :other, make_ref(), self(), {published}] do
      assert_raise ArgumentError, fn -> Native.publish(bad) end
    end

    assert Native.dispatch(topic, {:still, :published}) == :ok
    assert_receive {:still, :published}
  end

  test "dispatch answers :forward while a relay is set (cluster mode), :ok otherwise" do
    dispatcher = new_dispatcher(2, 4)
    subs = subscribers(dispatcher, "t", 2)
    assert :ok = Native.dispatch(dispatcher, "t", 1)
    assert :ok = Native.dispatch(dispatcher, "none", 1)
    assert :ok = Native.set_relay(dispatcher, self())
    assert :forward = Native.dispatch(dispatcher, "t", 2)
    # A topic without local subscribers may still have remote ones.
    assert :forward = Native.dispatch(dispatcher, "none", 2)
    assert_raise ArgumentError, fn -> Native.set_relay(dispatcher, :other) end
    assert :ok = Native.set_relay(dispatcher, :undefined)
    assert :ok = Native.dispatch(dispatcher, "t", 3)
    for pid <- subs, seq <- 1..3, do: assert_receive({:got, ^pid, ^seq})
    Native.close(dispatcher)
  end

  test "a delivered batch counts once in delivered_batches and gives its credit back" do
    dispatcher = new_dispatcher(1, 1)
    subs = subscribers(dispatcher, "t", 20)

    assert :ok = Native.dispatch(dispatcher, "t", :hello)
    assert_receive {@deliver, batch, :hello}
    assert %{in_flight: 1, delivered_batches: 0} = stats(dispatcher)

    assert Native.deliver(batch, :hello) == :ok
    for pid <- subs, do: assert_receive({:got, ^pid, :hello})
    assert %{in_flight: 0, delivered_batches: 1, lost_batches: 0} = stats(dispatcher)
  end

  test "the monitors figure counts the monitors actually set" do
    dispatcher = new_dispatcher(2, 4)
    [a, b, c] = subscribers(dispatcher, "m", 3)
    for pid <- [a, b, c], do: send(pid, :wake_up)
    assert %{monitors: 3, subscribers: 3} = stats(dispatcher)
    assert monitored_by?(a, dispatcher)

    assert Native.unsubscribe_pid(dispatcher, "m", a) == 1
    assert %{monitors: 2} = stats(dispatcher)
    eventually(fn -> not monitored_by?(a, dispatcher) end)

    Process.unlink(b)
    Process.exit(b, :kill)
    eventually(fn -> stats(dispatcher).monitors == 1 end)
    assert %{subscribers: 1} = stats(dispatcher)

    # Closing releases the rest and names the subscribers it held.
    assert Native.close(dispatcher) == [c]
    assert %{monitors: 0} = stats(dispatcher)
  end

  test "a subscriber holds one monitor, whichever stripes hold its subscriptions" do
    dispatcher = new_dispatcher(2, 4)
    topics = for i <- 1..40, do: "spread:#{i}"
    parent = self()

    # Topics spread over the registry's stripes (8 per lane, by name), each keeping its
    # own record of the subscriber; the monitor is one, made with the first record and
    # released with the last.
    subscribe_all = fn ->
      spawn(fn ->
        Enum.each(topics, &(:ok = Native.subscribe(dispatcher, &1, false)))
        send(parent, :subscribed)

        receive do
          :unsubscribe ->
            {all_but_last, [last]} = Enum.split(topics, -1)
            Enum.each(all_but_last, &(:ok = Native.unsubscribe(dispatcher, &1)))
            send(parent, {:one_left, Map.new(Native.stats(dispatcher))})
            :ok = Native.unsubscribe(dispatcher, last)
            send(parent, :unsubscribed)
            receive do: (:stop -> :ok)
        end
      end)
    end

    pid = subscribe_all.()
    assert_receive :subscribed
    assert %{monitors: 1, subscribers: 1, subscriptions: 40, topics: 40} = stats(dispatcher)
    # The VM agrees: the dispatcher monitors the process once.
    {:monitored_by, by} = Process.info(pid, :monitored_by)
    assert Enum.count(by, &(&1 == dispatcher)) == 1

    # The monitor stays until the last subscription goes, in whichever stripe.
    send(pid, :unsubscribe)
    assert_receive {:one_left, %{monitors: 1, subscriptions: 1}}
    assert_receive :unsubscribed
    assert %{monitors: 0, subscribers: 0, subscriptions: 0} = stats(dispatcher)
    eventually(fn -> not monitored_by?(pid, dispatcher) end)
    send(pid, :stop)

    # A subscriber that dies: its monitor's `down` clears every stripe.
    pid = subscribe_all.()
    assert_receive :subscribed
    assert %{monitors: 1} = stats(dispatcher)
    Process.exit(pid, :kill)
    eventually(fn -> stats(dispatcher).monitors == 0 end)
    assert %{subscribers: 0, subscriptions: 0, topics: 0} = stats(dispatcher)
  end

  defp monitored_by?(pid, dispatcher) do
    {:monitored_by, by} = Process.info(pid, :monitored_by)
    dispatcher in by
  end

  test "a batch dropped undelivered counts what it had not delivered and gives its credit back" do
    dispatcher = new_dispatcher(1, 1)
    subscribers(dispatcher, "lost", 30)

    # Dropped by a process that dies with it in its mailbox, as a killed sender does.
    holder =
      spawn(fn ->
        :ok = Native.set_senders(dispatcher, [self()])
        receive do: (:never -> :ok)
      end)

    eventually(fn -> Native.senders(dispatcher) == [holder] end)
    :ok = Native.dispatch(dispatcher, "lost", :x)
    eventually(fn -> Process.info(holder, :message_queue_len) == {:message_queue_len, 1} end)
    assert %{in_flight: 1} = stats(dispatcher)

    Process.exit(holder, :kill)
    eventually(fn -> stats(dispatcher).in_flight == 0 end)
    assert %{lost_batches: 1, lost_deliveries: 30, delivered_batches: 0} = stats(dispatcher)
  end

  test "a full lane queues the producer; the freed credit wakes it with one message" do
    dispatcher = new_dispatcher(1, 1)
    subscribers(dispatcher, "full", 20)

    assert :ok = Native.dispatch(dispatcher, "full", 1)
    assert_receive {@deliver, first, 1}
    assert {:full, pending} = Native.dispatch(dispatcher, "full", 2)
    assert Native.resume(pending, 2) == :wait
    assert %{waiting: 1} = stats(dispatcher)
    refute_received {@room, _}

    # Delivering the first batch hands its credit straight to the waiter.
    assert Native.deliver(first, 1) == :ok
    assert_receive {@room, ^pending}
    assert %{waiting: 0, in_flight: 1} = stats(dispatcher)
    assert Native.resume(pending, 2) == :ok
    assert_receive {@deliver, second, 2}
    assert Native.deliver(second, 2) == :ok
    refute_received {@room, _}
    assert %{in_flight: 0, delivered_batches: 2} = stats(dispatcher)
  end

  test "a waiter killed holding a granted credit gives it back" do
    dispatcher = new_dispatcher(1, 1)
    subscribers(dispatcher, "grant", 20)
    assert :ok = Native.dispatch(dispatcher, "grant", 1)
    assert_receive {@deliver, first, 1}

    parent = self()

    waiter =
      spawn(fn ->
        {:full, pending} = Native.dispatch(dispatcher, "grant", 2)
        :wait = Native.resume(pending, 2)
        send(parent, :queued)
        receive do: (:never -> :ok)
      end)

    assert_receive :queued
    assert Native.deliver(first, 1) == :ok
    # The grant is in the waiter's mailbox, unused; the credit is still taken.
    eventually(fn -> Process.info(waiter, :message_queue_len) == {:message_queue_len, 1} end)
    assert %{in_flight: 1, waiting: 0} = stats(dispatcher)

    Process.exit(waiter, :kill)
    eventually(fn -> stats(dispatcher).in_flight == 0 end)
    assert :ok = Native.dispatch(dispatcher, "grant", 3)
  end

  test "a batch for a lane without a live sender waits for the next sender, in order" do
    dispatcher = new_dispatcher(1, 4)
    dead = spawn(fn -> :ok end)
    eventually(fn -> not Process.alive?(dead) end)
    :ok = Native.set_senders(dispatcher, [dead])
    subscribers(dispatcher, "parked", 20)

    for seq <- 1..3, do: assert(:ok = Native.dispatch(dispatcher, "parked", seq))
    assert %{in_flight: 3, lost_batches: 0} = stats(dispatcher)
    refute_received {@deliver, _, _}

    # The new sender is told to pull what is parked; until it has, the lane stays closed
    # and a later dispatch parks behind the others instead of overtaking them.
    :ok = Native.set_senders(dispatcher, [self()])
    assert_receive {:"$ex_atlas_drain", _dispatcher, 0}
    assert :ok = Native.dispatch(dispatcher, "parked", 4)
    refute_received {@deliver, _, _}

    for seq <- 1..4 do
      assert {@deliver, batch, ^seq} = Native.take_parked(dispatcher, 0)
      assert Native.deliver(batch, seq) == :ok
    end

    # Drained: the lane opens, and the next batch is sent straight to the sender.
    assert Native.take_parked(dispatcher, 0) == :done
    assert :ok = Native.dispatch(dispatcher, "parked", 5)
    assert_receive {@deliver, batch, 5}
    assert Native.deliver(batch, 5) == :ok
    assert %{in_flight: 0, delivered_batches: 5, lost_batches: 0} = stats(dispatcher)
  end

  test "only the lane's current sender can pull its parked batches" do
    dispatcher = new_dispatcher(1, 4)
    dead = spawn(fn -> :ok end)
    eventually(fn -> not Process.alive?(dead) end)
    :ok = Native.set_senders(dispatcher, [dead])
    subscribers(dispatcher, "stale", 20)
    assert :ok = Native.dispatch(dispatcher, "stale", 1)

    # Not this process's lane to drain: it gets nothing, and the batch stays parked.
    assert Native.take_parked(dispatcher, 0) == :done
    assert_raise ArgumentError, fn -> Native.take_parked(dispatcher, 1) end
    :ok = Native.set_senders(dispatcher, [self()])
    assert {@deliver, batch, 1} = Native.take_parked(dispatcher, 0)
    assert Native.deliver(batch, 1) == :ok
  end

  test "closing wakes every waiting producer and drops parked batches as lost" do
    dispatcher = Native.new(1, 1, 0, 1)
    # More than 16 subscriptions: never sent inline by the caller.
    subscribers(dispatcher, "close", 20)
    # No sender yet: the first batch is parked, the second dispatch has to wait.
    assert :ok = Native.dispatch(dispatcher, "close", 1)
    assert {:full, pending} = Native.dispatch(dispatcher, "close", 2)
    assert Native.resume(pending, 2) == :wait

    assert length(Native.close(dispatcher)) == 20
    assert_receive {@room, ^pending}
    assert Native.resume(pending, 2) == :closed
    assert Native.dispatch(dispatcher, "close", 3) == :closed
    # The dropped batch's destructor may run a moment later.
    eventually(fn -> stats(dispatcher).in_flight == 0 end)
    assert %{lost_batches: 1, lost_deliveries: 20} = stats(dispatcher)
  end
end
