defmodule ExAtlas.Fly.Dispatcher.ShutdownLogsTest do
  # Ends that are normal produce no error reports beyond the documented lines:
  #
  #   * killing the dispatcher's supervisor logs "registry closed; N subscribers got the
  #     exit signal ..." and no "GenServer ... terminating" report of the processes it
  #     took down (the server, the closer);
  #   * under :init.stop/0, producers waiting on full lanes end with the subscribers'
  #     exit reason, {:shutdown, :ex_atlas_dispatcher_closed}: no crash report, no advice
  #     to start the application (on a peer node, which the test stops).
  use ExUnit.Case, async: false

  import ExAtlas.Test.Cluster
  import ExAtlas.Test.FlyEnv
  import ExUnit.CaptureLog

  alias ExAtlas.Fly.Dispatcher
  alias ExAtlas.Fly.Dispatcher.Server

  test "killing the dispatcher's supervisor logs the closing line and no crash reports" do
    topic = unique_topic("killed_tree")
    parent = self()

    subscriber =
      spawn(fn ->
        Process.flag(:trap_exit, true)
        :ok = Dispatcher.subscribe(topic)
        send(parent, :subscribed)
        receive do: ({:EXIT, _, reason} -> send(parent, {:told, reason}))
      end)

    assert_receive :subscribed
    old = Server.lookup()

    log =
      capture_log([level: :info], fn ->
        Process.exit(Process.whereis(Dispatcher.Supervisor), :kill)
        assert_receive {:told, {:shutdown, :ex_atlas_dispatcher_closed}}, 5_000
        # Restarted by the application's supervisor.
        eventually(fn -> Server.lookup() not in [nil, old] end)
      end)

    refute Process.alive?(subscriber)
    assert log =~ "registry closed; 1 subscribers got the exit signal"
    refute log =~ "terminating"
    refute log =~ "[error]"
  end

  test "a process of someone else's, killed the same way, is still reported" do
    defmodule Trapper do
      @moduledoc false
      use GenServer
      def start_link(_), do: GenServer.start_link(__MODULE__, nil)
      @impl true
      def init(nil), do: {:ok, Process.flag(:trap_exit, true)}
    end

    {:ok, sup} = Supervisor.start_link([Trapper], strategy: :one_for_one)
    Process.unlink(sup)

    log =
      capture_log(fn ->
        ref = Process.monitor(sup)
        Process.exit(sup, :kill)
        assert_receive {:DOWN, ^ref, :process, _, :killed}
        Process.sleep(100)
      end)

    assert log =~ "terminating"
  end

  @tag timeout: 120_000
  test "under :init.stop/0, producers waiting on full lanes end quietly" do
    :ok = ensure_distribution()

    {_peer, node} =
      start_peer("init_stop_#{System.unique_integer([:positive])}", lanes: 1, queue_capacity: 1)

    topic = "init_stop"

    # 17 subscribers: past the 16 a producer sends itself, so every dispatch goes
    # through the lane's only sender, which is suspended: the first dispatch takes the
    # lane's only credit, the next producers wait.
    for _ <- 1..17, do: stalled_subscriber(node, topic, threshold: 1_000_000)
    [sender] = :erpc.call(node, Server, :senders, [])
    # Held by a process on the peer (a suspension ends with the process that made it).
    _holder = suspend(sender)

    :ok =
      :erpc.call(node, :logger, :add_handler, [
        :forward_to_test,
        ExAtlas.Test.LogForwarder,
        %{level: :warning, config: %{to: self()}}
      ])

    producers =
      for i <- 1..4,
          do: Node.spawn(node, Dispatcher, :dispatch, [topic, {:produced, i}])

    refs = Enum.map(producers, &Process.monitor/1)
    eventually(fn -> :erpc.call(node, Dispatcher, :stats, []).waiting >= 3 end, 10_000)

    true = Node.monitor(node, true)
    :erpc.cast(node, :init, :stop, [])
    assert_receive {:nodedown, ^node}, 60_000

    logged = collect_logs([])
    refute Enum.any?(logged, &(&1 =~ "ArgumentError")), Enum.join(logged, "\n")
    refute Enum.any?(logged, &(&1 =~ "start the :ex_atlas application")), Enum.join(logged, "\n")

    # The producer that got the credit returned at once (gone before its monitor:
    # :noproc); of those waiting, some may get room as the senders stop first, and the
    # others end with the subscribers' exit reason. No other end.
    closed = {:shutdown, :ex_atlas_dispatcher_closed}
    reasons = for ref <- refs, do: receive(do: ({:DOWN, ^ref, :process, _, reason} -> reason))
    assert Enum.all?(reasons, &(&1 in [:noproc, :normal, closed])), inspect(reasons)
    assert closed in reasons, inspect(reasons)
  end

  defp collect_logs(acc) do
    receive do
      {:log, %{msg: msg} = event} ->
        collect_logs([inspect(event.level) <> " " <> text(msg) | acc])
    after
      0 -> Enum.reverse(acc)
    end
  end

  defp text({:string, chardata}), do: IO.chardata_to_string(chardata)
  defp text({:report, report}), do: inspect(report)
  defp text({format, args}), do: IO.chardata_to_string(:io_lib.format(format, args))
end
