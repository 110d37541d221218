defmodule ExAtlas.Fly.Dispatcher.WaitAndCloseTest do
  # What the README promises about a producer waiting for lane room and about the
  # registry closing, that no other test checks:
  #
  #   * "Telemetry": `[:wait, :stop]` comes when "the waiting producer got room (or the
  #     registry closed); none if it is killed while waiting";
  #   * "Troubleshooting": "The closing is logged at info level (`registry closed; N
  #     subscribers got the exit signal ...`)".
  #
  # The bad moment is placed, not waited for: the lane's only sender is suspended with
  # the lane's only credit on its batch, so the next producer must wait, and stays
  # waiting until the test acts. `:telemetry` is defined at runtime by a stand-in (hex is
  # out of reach), which is global: the module runs alone.
  use ExUnit.Case, async: false

  import ExAtlas.Test.FlyEnv
  import ExUnit.CaptureLog

  alias ExAtlas.Fly.Dispatcher
  alias ExAtlas.Fly.Dispatcher.Server
  alias ExAtlas.Test.TelemetryStandIn

  @compile {:no_warn_undefined, :telemetry}

  @wait_start [:ex_atlas, :fly, :dispatcher, :wait, :start]
  @wait_stop [:ex_atlas, :fly, :dispatcher, :wait, :stop]
  @closed {:shutdown, :ex_atlas_dispatcher_closed}
  # More than the 16 subscriptions a dispatch may deliver inline: every dispatch then
  # goes through the lane's sender.
  @subscribers 20

  setup do
    define_telemetry()
    TelemetryStandIn.capture([@wait_start, @wait_stop])
    restart_app(lanes: 1, queue_capacity: 1)
    :ok
  end

  test "the registry closing ends a producer's wait: :wait stop, then ArgumentError" do
    topic = unique_topic("wait:closed")
    _subscribers = spawn_subscribers(topic)
    {producer, meta} = waiting_producer(topic)

    # The registry closes while the lane's credit is still held (its sender suspended,
    # alive): what every path that ends the registry runs (`Application.stop/1` stops
    # the senders first, and then the wait usually ends with room instead).
    log = capture_log([level: :info], fn -> :ok = Server.close_published(:any) end)

    assert_receive {:telemetry, @wait_stop, %{duration: duration}, ^meta}, 5_000
    assert is_integer(duration) and duration > 0
    assert_receive {:raised, ^producer, %ArgumentError{message: message}}, 5_000
    # Its real cause, not advice to start the application that runs.
    assert message =~ "registry closed while this dispatch waited for room in a full lane"
    assert message =~ "it was closed"
    refute message =~ "application is not started"
    refute_received {:telemetry, @wait_stop, _, _}

    assert log =~
             "registry closed; #{@subscribers} subscribers got the exit signal " <>
               inspect(@closed)
  end

  test "Application.stop/1 logs the closing line at info level, with the subscribers told" do
    topic = unique_topic("close:log")
    subscribers = spawn_subscribers(topic)
    refs = Enum.map(subscribers, &Process.monitor/1)

    log = capture_log([level: :info], fn -> stop_app() end)

    for ref <- refs, do: assert_receive({:DOWN, ^ref, :process, _, @closed}, 5_000)

    assert log =~ "[info]"

    assert log =~
             "[ExAtlas.Fly.Dispatcher] registry closed; #{@subscribers} subscribers " <>
               "got the exit signal #{inspect(@closed)}"
  end

  test "a registry closing with no subscriber logs no closing line" do
    log = capture_log([level: :info], fn -> stop_app() end)
    refute log =~ "registry closed"
  end

  test "a producer killed while it waits emits no :wait stop, nor does anyone for it" do
    topic = unique_topic("wait:killed")
    subscribers = spawn_subscribers(topic)
    {producer, _meta} = waiting_producer(topic)
    [sender] = Server.senders()

    ref = Process.monitor(producer)
    Process.exit(producer, :kill)
    assert_receive {:DOWN, ^ref, :process, ^producer, :killed}, 5_000

    # The credit the dead producer waited for is freed and handed on (to nobody): the
    # lane works again, and a later dispatch needs no wait.
    true = :erlang.resume_process(sender)
    :ok = Dispatcher.sync()
    eventually(fn -> Dispatcher.stats().in_flight == 0 end)
    :ok = Dispatcher.dispatch(topic, :after)
    :ok = Dispatcher.sync()
    refute_received {:telemetry, @wait_stop, _, _}
    refute_received {:telemetry, @wait_start, _, _}
    assert Dispatcher.stats().waiting == 0
    Enum.each(subscribers, &send(&1, :stop))
  end

  # A producer (spawned, not linked) that waits for room: the lane's sender is suspended
  # with the only credit on a batch of this process. Returns the producer and its wait's
  # metadata, once its `:wait` start has come. The producer sends `{:raised, pid, e}` if
  # its dispatch raises, `{:dispatched, pid}` if it returns.
  defp waiting_producer(topic) do
    [sender] = Server.senders()
    true = :erlang.suspend_process(sender)
    :ok = Dispatcher.dispatch(topic, :takes_the_credit)
    parent = self()

    producer =
      spawn(fn ->
        try do
          :ok = Dispatcher.dispatch(topic, :waits)
          send(parent, {:dispatched, self()})
        rescue
          e -> send(parent, {:raised, self(), e})
        end
      end)

    assert_receive {:telemetry, @wait_start, _, %{topic: ^topic, reason: :full} = meta}, 5_000
    eventually(fn -> Dispatcher.stats().waiting == 1 end)
    refute_received {:telemetry, @wait_stop, _, _}
    {producer, meta}
  end

  defp spawn_subscribers(topic) do
    parent = self()

    pids =
      for _ <- 1..@subscribers do
        spawn(fn ->
          :ok = Dispatcher.subscribe(topic)
          send(parent, {:subscribed, self()})
          receive do: (:stop -> :ok)
        end)
      end

    for pid <- pids, do: assert_receive({:subscribed, ^pid}, 5_000)
    pids
  end
end
