defmodule ExAtlas.Fly.Dispatcher.ClusterPromisesTest do
  # What the README's "Running in a cluster" and "Telemetry" promise about cluster mode,
  # that no other test checks, each with the bad moment placed rather than waited for:
  #
  #   * `[:wait, :start | :stop]` come "in cluster mode also from a node's relay, which
  #     dispatches what other nodes sent": this node's only sender suspended, a producer
  #     on a peer;
  #   * the `:cluster, :drop` event comes "at most once a second per node, from its link";
  #   * "Sends never suspend (`:nosuspend`): when the distribution buffer is busy the link
  #     retries shortly": a peer stopped with SIGSTOP, so that nothing drains the
  #     connection to it;
  #   * "after twice the hold time the producing node forgets the absent node:
  #     dispatches are then neither sent to it nor counted until its relay answers
  #     again": a peer stopped, with a hold time of 200 ms, then started again;
  #   * "Links and the counts a relay keeps outlive restarts of the relay and of the
  #     `:pg` scope": the scope killed here and on the peer.
  #
  # `:telemetry` is defined at runtime by a stand-in (hex is out of reach): the module
  # runs alone.
  use ExUnit.Case, async: false

  import ExAtlas.Test.FlyEnv
  import ExUnit.CaptureLog

  alias ExAtlas.Fly.Dispatcher
  alias ExAtlas.Fly.Dispatcher.{Cluster, Server}
  alias ExAtlas.Fly.Dispatcher.Cluster.Link
  alias ExAtlas.Test.Cluster, as: Peers

  @moduletag :cluster
  @moduletag :capture_log
  @moduletag timeout: 120_000
  @compile {:no_warn_undefined, :telemetry}

  @wait_start [:ex_atlas, :fly, :dispatcher, :wait, :start]
  @wait_stop [:ex_atlas, :fly, :dispatcher, :wait, :stop]
  @drop [:ex_atlas, :fly, :dispatcher, :cluster, :drop]

  setup_all do
    [b] = Peers.start_peers("ex_atlas_promises", [:b])
    %{b: b}
  end

  test "a relay waiting for lane room emits :wait start and stop from itself", %{b: b} do
    restart_app(cluster: true, lanes: 1, queue_capacity: 1)
    define_telemetry()
    test = self()

    :ok = :telemetry.attach_many(make_ref(), [@wait_start, @wait_stop], &send_from/4, test)

    topic = unique_topic("promises:relay_wait")
    # More than 16 subscriptions: every dispatch goes through the lane's sender.
    subscribers = for _ <- 1..20, do: spawn_subscriber(topic)
    Peers.await_visible(b, topic, [node()])
    relay = Process.whereis(Cluster.Relay)
    [sender] = Server.senders()
    true = :erlang.suspend_process(sender)

    # The first remote dispatch takes the lane's only credit; the relay waits for the
    # second one's room, in its own process.
    Peers.producer(b, topic, :b, 3)

    assert_receive {:telemetry_from, ^relay, @wait_start, %{topic: ^topic, reason: :full} = meta},
                   10_000

    refute_received {:telemetry_from, _, @wait_stop, _}
    true = :erlang.resume_process(sender)
    assert_receive {:telemetry_from, ^relay, @wait_stop, ^meta}, 10_000
    assert_receive {:produced, :b, :ok}, 30_000
    Enum.each(subscribers, &Process.exit(&1, :kill))
  end

  test "the :cluster, :drop event: at most once a second per node, from its link" do
    restart_app(cluster: true)
    define_telemetry()
    :ok = :telemetry.attach(make_ref(), @drop, &send_from/4, self())

    # Links (bound 1) to two nodes that never connect: no relay ever welcomes them, so
    # the first message of each stays queued and every later one is dropped.
    nodes = [:"nowhere_a@127.0.0.1", :"nowhere_b@127.0.0.1"]

    handles =
      for node <- nodes do
        {:ok, link} = Link.start_link({node, 1})
        on_exit(fn -> if Process.alive?(link), do: GenServer.stop(link) end)
        handle = {link, GenServer.call(link, :counts)}
        assert :ok = Link.push(handle, 1, "t", :queued)
        {node, link, handle}
      end

    # A drop for each node every 10 ms for 2.5 s: about 250 each, over at least three
    # of the links' report rounds.
    started = System.monotonic_time(:millisecond)

    log =
      capture_log(fn ->
        drop_for(handles, started + 2_500, 0)
        pushed = Link.counts(elem(hd(handles), 2)).dropped
        assert pushed > 50

        for {node, link, handle} <- handles do
          assert Link.counts(handle).dropped == pushed
          # Every drop is reported, in events from the node's link, each with the new ones.
          events = await_reported(link, node, pushed, [])
          assert length(events) >= 2
          assert length(events) < pushed / 10
          send(self(), {:events, node, length(events)})

          # At most one event per report round: the link's report timer is 1 s and an
          # Erlang timer never fires early, so from the first drop to the last event
          # there can be no more events than whole seconds, plus the first round's. A
          # count, not the gap between two events: an event delayed on a loaded machine
          # brings the next one closer without breaking the rate.
          times = events |> Enum.map(&elem(&1, 1)) |> Enum.sort()
          span = List.last(times) - started

          assert length(events) <= div(span, 1_000) + 1,
                 "#{node}: #{length(events)} drop events within #{span} ms"
        end
      end)

    # The warning log comes with each event, not more often.
    for node <- nodes do
      assert_received {:events, ^node, events}
      lines = Regex.scan(~r/dropped \d+ dispatches for node #{Regex.escape(inspect(node))}/, log)
      assert length(lines) == events
    end
  end

  test "a busy distribution buffer suspends no sender: the link retries, dispatch goes on" do
    restart_app(cluster: true, cluster_queue: 1_000)

    {peer, c} =
      Peers.start_peer("ex_atlas_promises_c_#{System.unique_integer([:positive])}", cluster: true)

    on_exit(fn -> stop_peer(peer) end)
    topic = unique_topic("promises:busy")
    sub_c = Peers.subscriber(c, topic)
    Peers.await_visible(node(), topic, [c])
    link = eventually(fn -> link_of(c) end)
    # c's relay has welcomed the link: a cluster sync goes through it.
    assert :ok = Dispatcher.sync(:cluster)
    os_pid = c |> :erpc.call(:os, :getpid, []) |> to_string()
    # 512 KiB each, 60 of them (one binary, shared here): far more than the sockets and
    # the distribution buffer (1 MiB by default) hold while nothing reads them.
    payload = :binary.copy(<<7>>, 512 * 1024)

    {_, 0} = System.cmd("kill", ["-STOP", os_pid])

    try do
      for seq <- 1..60, do: :ok = Dispatcher.dispatch(topic, {:p, seq, payload})

      # The buffer is busy: the link holds its next message and retries on a timer. It
      # is never suspended, and it answers calls meanwhile.
      eventually(fn -> :sys.get_state(link).transport.retry != nil end, 10_000)

      for _ <- 1..20 do
        assert {:status, status} = Process.info(link, :status)
        assert status != :suspended
        assert %{queued: queued} = Link.counts({link, GenServer.call(link, :counts)})
        assert queued > 0
        Process.sleep(5)
      end

      # So does every dispatch, which only hands its message to the link.
      for seq <- 61..70, do: :ok = Dispatcher.dispatch(topic, {:p, seq, payload})

      # And this node's relay, asked for a sync answer to a process on c (as a link of
      # c's would): the answer waits in its outbox, and the relay goes on answering.
      relay = Process.whereis(Cluster.Relay)
      send(relay, {:"$ex_atlas_sync", sub_c, make_ref()})
      eventually(fn -> not :queue.is_empty(:sys.get_state(relay).outbox) end, 10_000)
      assert {:status, status} = Process.info(relay, :status)
      assert status != :suspended
      assert %{received: _} = Cluster.relay_counts()
    after
      System.cmd("kill", ["-CONT", os_pid])
    end

    # Resumed: everything arrives, in order, and nothing was dropped.
    assert :ok = Dispatcher.sync(:cluster, 30_000)
    got = Peers.report(sub_c)
    assert for({:p, seq, _} <- got, do: seq) == Enum.to_list(1..70)
    # The relay's answer went out once c could take it.
    assert Enum.any?(got, &match?({_tag, _ref, node} when node == node(), &1))
    assert Cluster.stats()[c].dropped == 0
  end

  test "past twice the hold time an absent node is forgotten; its relay answering again brings it back" do
    restart_app(cluster: true)
    Application.put_env(:ex_atlas, :cluster_hold_ms, 200)
    on_exit(fn -> Application.delete_env(:ex_atlas, :cluster_hold_ms) end)
    name = "ex_atlas_promises_d_#{System.unique_integer([:positive])}"
    {peer, d} = Peers.start_peer(name, cluster: true)
    topic = unique_topic("promises:forgotten")
    _sub = Peers.subscriber(d, topic)
    Peers.await_visible(node(), topic, [d])
    for seq <- 1..10, do: :ok = Dispatcher.dispatch(topic, {:p, :a, seq})
    assert :ok = Dispatcher.sync(:cluster)

    capture_log(fn ->
      stop_peer(peer)
      # Within the hold time what is dispatched for it is queued or counted; twice the
      # hold time after it left, its link and its line in the stats go.
      eventually(fn -> not Map.has_key?(Cluster.stats(), d) end, 10_000)
      assert link_of(d) == nil

      # From now on nothing is sent for it, and nothing counted: it has no line, and
      # no count waits for a link of it.
      for seq <- 11..60, do: :ok = Dispatcher.dispatch(topic, {:p, :a, seq})
      assert :ok = Dispatcher.sync(:cluster)
      refute Map.has_key?(Cluster.stats(), d)
      assert :ets.lookup(Cluster.unlinked_table(), d) == []
      assert :ets.lookup(Cluster.interest_table(), topic) == []
    end)

    # The same node back, with cluster mode: its relay answers, and it is sent what
    # follows once its subscription is visible, counted from zero.
    {peer, ^d} = Peers.start_peer(name, cluster: true)
    on_exit(fn -> stop_peer(peer) end)
    sub = Peers.subscriber(d, topic)
    Peers.await_visible(node(), topic, [d])
    # Its link runs before anything is dispatched for it (a dispatch in the moment before
    # would be counted as dropped for it, as the README says).
    eventually(fn -> link_of(d) != nil end)
    for seq <- 61..70, do: :ok = Dispatcher.dispatch(topic, {:p, :a, seq})
    assert :ok = Dispatcher.sync(:cluster)
    assert Peers.report(sub) == for(seq <- 61..70, do: {:p, :a, seq})
    assert %{dropped: 0} = Cluster.stats()[d]
  end

  test "links and the relays' counts outlive a restart of the :pg scope, here and there",
       %{b: b} do
    restart_app(cluster: true)
    topic = unique_topic("promises:scope")
    sub = Peers.subscriber(b, topic)
    Peers.await_visible(node(), topic, [b])
    for seq <- 1..50, do: :ok = Dispatcher.dispatch(topic, {:p, :a, seq})
    assert :ok = Dispatcher.sync(:cluster)
    link = link_of(b)
    seen_there = seen_on(b, link)
    assert seen_there >= 50

    # This node's scope, then b's, killed: each restarts with its node's relay.
    relay_here = Process.whereis(Cluster.Relay)
    kill_scope(node())
    eventually(fn -> Process.whereis(Cluster.Relay) not in [nil, relay_here] end)
    relay_there = :erpc.call(b, Process, :whereis, [Cluster.Relay])
    kill_scope(b)

    eventually(fn ->
      :erpc.call(b, Process, :whereis, [Cluster.Relay]) not in [nil, relay_there]
    end)

    Peers.await_visible(node(), topic, [b])

    # The link here is the same process, with its counts; b's count of what this link
    # sent it is the same too, and goes on from there.
    assert link_of(b) == link
    assert Cluster.stats()[b].dropped == 0
    # What b's old relay received and had not acknowledged yet, its successor tells the
    # link from the count that outlived it.
    eventually(fn -> Cluster.stats()[b] == %{queued: 0, dropped: 0} end, 15_000)
    assert seen_on(b, link) == seen_there
    for seq <- 51..100, do: :ok = Dispatcher.dispatch(topic, {:p, :a, seq})
    assert :ok = Dispatcher.sync(:cluster, 10_000)
    assert seen_on(b, link) == seen_there + 50
    assert Peers.report(sub) == for(seq <- 1..100, do: {:p, :a, seq})
    eventually(fn -> Cluster.stats()[b] == %{queued: 0, dropped: 0} end, 5_000)
  end

  @doc false
  def send_from(event, measurements, metadata, pid) do
    send(pid, {:telemetry_from, self(), event, metadata})

    if event == @drop do
      send(pid, {:drop_event, self(), metadata.node, measurements.count, now()})
    end

    :ok
  end

  defp now, do: System.monotonic_time(:millisecond)

  defp drop_for(handles, deadline, n) do
    if now() < deadline do
      for {_node, _link, handle} <- handles, do: :dropped = Link.push(handle, 1, "t", {:drop, n})
      Process.sleep(10)
      drop_for(handles, deadline, n + 1)
    else
      :ok
    end
  end

  # The drop events of `node`'s link until they add up to `total`: `[{count, time}]`.
  defp await_reported(_link, _node, 0, events), do: Enum.reverse(events)

  defp await_reported(link, node, left, events) do
    assert_receive {:drop_event, from, ^node, count, time}, 5_000
    assert from == link
    assert count in 1..left
    await_reported(link, node, left - count, [{count, time} | events])
  end

  defp link_of(node) do
    case :ets.lookup(Cluster.links_table(), node) do
      [{^node, {link, _counters}}] -> link
      [] -> nil
    end
  end

  # What `node`'s relay counts as received from `link`'s node (its links, this one and
  # any before it).
  defp seen_on(node, link) do
    from = node(link)

    case :erpc.call(node, :ets, :lookup, [Cluster.seen_table(), from]) do
      [{^from, seen}] -> seen
      [] -> 0
    end
  end

  defp kill_scope(node) do
    scope = :erpc.call(node, Process, :whereis, [Cluster.scope()])
    true = :erpc.call(node, Process, :exit, [scope, :kill])

    eventually(fn ->
      :erpc.call(node, Process, :whereis, [Cluster.scope()]) not in [nil, scope]
    end)
  end

  defp stop_peer(peer) do
    :peer.stop(peer)
  catch
    :exit, _ -> :ok
  end
end
