defmodule ExAtlas.Fly.Dispatcher.SyncTest do
  # sync/0 after a sender died (issue 19, section 6): what was dispatched to the dead
  # sender's lane before its successor started is parked for the successor, so sync/0
  # must wait for that one too instead of taking the dead sender's :DOWN as its answer;
  # and nothing of a sender (its answer, its :DOWN) reaches the caller after sync/0
  # returned.
  use ExUnit.Case, async: false

  import ExAtlas.Test.FlyEnv, only: [restart_app: 0, unique_topic: 1, eventually: 1]

  alias ExAtlas.Fly.Dispatcher
  alias ExAtlas.Fly.Dispatcher.Backend.Registry, as: RegistryBackend
  alias ExAtlas.Fly.Dispatcher.Server

  setup do
    restart_app()
    :ok
  end

  # Subscribers that keep what they get in their mailbox, for Process.info/2 to read.
  defp subscribers(topic, n) do
    parent = self()

    for _ <- 1..n do
      pid =
        spawn_link(fn ->
          :ok = Dispatcher.subscribe(topic)
          send(parent, {:ready, self()})
          receive do: (:never -> :ok)
        end)

      assert_receive {:ready, ^pid}
      pid
    end
  end

  defp has?(pid, message) do
    {:messages, messages} = Process.info(pid, :messages)
    message in messages
  end

  test "sync/0 returns only once what was parked for a dead sender's lane is delivered" do
    topic = unique_topic("sync:parked")
    # More than a small dispatch, spread over every lane: the senders deliver it.
    subs = subscribers(topic, 200)
    server = Process.whereis(Dispatcher.registry_name())
    [sender | _] = Server.senders()

    # The server cannot replace the sender while suspended: the dispatch's batch for the
    # dead sender's lane is parked until it can.
    true = :erlang.suspend_process(server)
    monitor = Process.monitor(sender)
    Process.exit(sender, :kill)
    assert_receive {:DOWN, ^monitor, :process, ^sender, :killed}
    :ok = Dispatcher.dispatch(topic, :parked)

    parent = self()

    syncer =
      spawn_link(fn ->
        :ok = Dispatcher.sync()
        send(parent, {:synced, self(), Enum.count(subs, &has?(&1, :parked))})
      end)

    # Not before the parked batch could be delivered at all.
    refute_receive {:synced, ^syncer, _}, 200
    true = :erlang.resume_process(server)

    # Once it returns, every subscriber has the message.
    assert_receive {:synced, ^syncer, with_message}, 10_000
    assert with_message == length(subs)
  end

  # A sender answers, then dies before the caller took the answer: the caller has both
  # the answer and the sender's :DOWN in its mailbox when it reads them. The moment is
  # placed: the caller is suspended while it waits inside sync/0, the senders answer,
  # one is killed, and only then does the caller run again.
  @tag :capture_log
  test "a sender that answers, then dies: nothing of it reaches the caller after sync/0 returned" do
    topic = unique_topic("sync:late")
    _subs = subscribers(topic, 50)
    :ok = Dispatcher.dispatch(topic, :before)
    senders = Server.senders()
    parent = self()
    for sender <- senders, do: true = :erlang.suspend_process(sender)

    syncer =
      spawn_link(fn ->
        :ok = Dispatcher.sync()
        {:messages, messages} = Process.info(self(), :messages)
        send(parent, {:after_sync, self(), messages})
      end)

    eventually(fn -> waiting_in_sync?(syncer) end)
    true = :erlang.suspend_process(syncer)
    for sender <- senders, do: true = :erlang.resume_process(sender)
    # Each sender handled the request (its mailbox is empty): its answer is in the
    # syncer's mailbox.
    eventually(fn -> Enum.all?(senders, &idle?/1) end)

    [dead | _] = senders
    monitor = Process.monitor(dead)
    Process.exit(dead, :kill)
    assert_receive {:DOWN, ^monitor, :process, ^dead, :killed}
    {:messages, waiting} = Process.info(syncer, :messages)
    assert length(waiting) == length(senders) + 1

    true = :erlang.resume_process(syncer)
    assert_receive {:after_sync, ^syncer, left}, 5_000
    assert left == []
  end

  defp waiting_in_sync?(pid) do
    match?(
      [status: :waiting, current_function: {RegistryBackend, _, _}],
      Process.info(pid, [:status, :current_function])
    )
  end

  defp idle?(pid),
    do:
      Process.info(pid, [:status, :message_queue_len]) == [status: :waiting, message_queue_len: 0]
end
