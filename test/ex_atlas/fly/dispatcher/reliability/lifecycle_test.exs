defmodule ExAtlas.Fly.Dispatcher.Reliability.LifecycleTest do
  # Item 7 of the reliability suite: the registry's life around it. The application stops
  # and starts under load, the code is reloaded and purged under load, and a VM with full
  # lanes shuts down. Callers may get ArgumentError while the registry is down; nothing
  # else may happen to them, nothing may crash the VM, and afterwards everything works.
  use ExUnit.Case, async: false

  import ExAtlas.Test.Reliability
  import ExAtlas.Test.FlyEnv, only: [restart_app: 1, unique_topic: 1]

  require Logger

  alias ExAtlas.Fly.Dispatcher
  alias ExAtlas.Fly.Dispatcher.{Native, Sender, Server, Watchdog}

  @moduletag timeout: :infinity
  @moduletag :capture_log

  @topic "lifecycle"

  setup do
    on_exit(fn ->
      # Whatever a test left behind, the next one gets a running application.
      {:ok, _} = Application.ensure_all_started(:ex_atlas)
    end)
  end

  describe "stopping and starting the application" do
    test "5 restarts while 4 producers dispatch and 4 churners subscribe" do
      restarts(5)
    end

    @tag :soak
    test "100 restarts while 4 producers dispatch and 4 churners subscribe (soak)" do
      restarts(100)
    end
  end

  defp restarts(count) do
    workers = start_workers(4, 4)

    for _ <- 1..count do
      Process.sleep(20)
      quietly(fn -> :ok = Application.stop(:ex_atlas) end)
      Process.sleep(20)
      {:ok, _} = Application.ensure_all_started(:ex_atlas)
    end

    Process.sleep(20)
    outcomes = stop_workers(workers)
    IO.puts("\nlifecycle, #{count} restarts under load: #{inspect(outcomes)}")

    # Callers saw the registry come and go, and nothing but ArgumentError while it was away.
    assert outcomes.ok > 0
    assert outcomes.other == 0, "workers died: #{inspect(outcomes.died)}"
    assert_working_registry()
    assert_one_set_of_senders()
  end

  # Issue 19 §4-§6: however the registry ends, every subscriber is told with the exit
  # signal `Server.closed_reason/0`, and every producer waiting for room raises
  # ArgumentError or goes on dispatching (on the next registry); none hangs, none dies.
  # Each path runs under a flood: 24 producers, 2 000 subscribers, queue_capacity: 1,
  # the senders suspended so that every producer is waiting when the path starts.
  describe "every path that ends the registry, with every producer waiting" do
    setup do
      restart_app(queue_capacity: 1, lanes: 2)
    end

    test "Application.stop/1" do
      ends_registry(fn -> quietly(fn -> :ok = Application.stop(:ex_atlas) end) end)
    end

    test "the application's top supervisor (ExAtlas.Supervisor) killed" do
      ends_registry(fn -> Process.exit(Process.whereis(ExAtlas.Supervisor), :kill) end)
    end

    # The application master calls the application's stop/1 at once and kills every
    # process of the application when it returns. A server held in its shutdown (here
    # suspended, so its supervisor kills it after its 10 s shutdown time) shows whether
    # the registry is still closed then, whatever the timing.
    test "the top supervisor killed while the server is stuck in its shutdown" do
      ends_registry(fn ->
        :erlang.suspend_process(Process.whereis(Dispatcher.registry_name()))
        Process.exit(Process.whereis(ExAtlas.Supervisor), :kill)
      end)
    end

    test "the dispatcher's supervisor killed (restarted by the application)" do
      ends_registry(fn -> Process.exit(Process.whereis(Dispatcher.Supervisor), :kill) end)
      assert_fresh_registry()
    end

    test "the dispatcher's supervisor exceeding its restart intensity (server killed)" do
      ends_registry(fn -> kill_until_gone(Dispatcher.Supervisor, &registry_server/0) end)
      # Registry and watches agree: both start empty, rather than the subscriptions
      # adopted without their watches.
      assert_fresh_registry()
    end

    test "the top supervisor exceeding its restart intensity (dispatcher's supervisor killed)" do
      ends_registry(fn ->
        kill_until_gone(ExAtlas.Supervisor, fn -> Process.whereis(Dispatcher.Supervisor) end)
      end)
    end
  end

  defp ends_registry(stop) do
    topic = unique_topic("lifecycle:end")
    reason = Server.closed_reason()
    parent = self()

    subscribers =
      spawn_ready(2_000, fn ready ->
        Process.flag(:trap_exit, true)
        :ok = Dispatcher.subscribe(topic)
        ready.()
        told(parent, reason)
      end)

    # One of them watched too: its watch must end with its subscription.
    [watched] =
      spawn_ready(1, fn ready ->
        Process.flag(:trap_exit, true)
        :ok = Dispatcher.subscribe_with_backpressure(topic, threshold: 1_000_000)
        ready.()
        told(parent, reason)
      end)

    assert %{watches: 1} = Watchdog.stats()
    senders = Server.senders()
    Enum.each(senders, &:erlang.suspend_process/1)
    {producers, counts} = start_producers(24, topic)
    eventually("every producer waiting for room", fn -> stats().waiting == 24 end)
    before = snapshot(counts, 24)

    stop.()

    # Every subscriber is told, once.
    for pid <- [watched | subscribers], do: assert_receive({:told, ^pid}, 30_000)
    refute_received {:told, _}

    # Every waiting producer raised ArgumentError or dispatched again, and is alive.
    eventually(
      "every producer raised ArgumentError or dispatched again",
      fn ->
        now = snapshot(counts, 24)
        Enum.all?(1..24, fn i -> now[i] != before[i] end)
      end,
      30_000
    )

    for {pid, ref} <- producers do
      refute_received {:DOWN, ^ref, :process, ^pid, _}
      assert Process.alive?(pid)
    end

    kill_all(Enum.map(producers, &elem(&1, 0)) ++ [watched | subscribers])
    # Senders of a registry that is gone: nothing to resume if they died with it.
    Enum.each(senders, &(Process.alive?(&1) and :erlang.resume_process(&1)))
  end

  defp told(parent, reason) do
    receive do
      {:EXIT, _from, ^reason} -> send(parent, {:told, self()})
      _other -> :ok
    end

    told(parent, reason)
  end

  # Each producer counts its dispatches (index 2i - 1) and its ArgumentErrors (2i).
  defp start_producers(count, topic) do
    counts = :atomics.new(2 * count, signed: false)

    producers =
      for i <- 1..count do
        spawn_monitor(fn -> produce(topic, counts, i) end)
      end

    {producers, counts}
  end

  defp produce(topic, counts, i) do
    try do
      :ok = Dispatcher.dispatch(topic, {:flood, i})
      :atomics.add(counts, 2 * i - 1, 1)
    rescue
      ArgumentError -> :atomics.add(counts, 2 * i, 1)
    end

    produce(topic, counts, i)
  end

  defp snapshot(counts, count) do
    Map.new(1..count, &{&1, {:atomics.get(counts, 2 * &1 - 1), :atomics.get(counts, 2 * &1)}})
  end

  defp registry_server do
    pid = Process.whereis(Dispatcher.registry_name())
    # Registered before its init/1 has published the registry: not ready yet.
    if pid && Server.lookup(), do: pid
  end

  # Kills the child that `child` finds, again and again (each time once the supervisor
  # has restarted it), until `supervisor` gives up and exits.
  defp kill_until_gone(supervisor, child) do
    sup = Process.whereis(supervisor)
    ref = Process.monitor(sup)
    kill_child(sup, ref, child, nil, 0)
  end

  defp kill_child(sup, ref, child, last, kills) do
    receive do
      {:DOWN, ^ref, :process, ^sup, _} -> kills
    after
      0 ->
        assert kills < 20, "#{inspect(sup)} never gave up"

        case child.() do
          pid when is_pid(pid) and pid != last ->
            Process.exit(pid, :kill)
            kill_child(sup, ref, child, pid, kills + 1)

          _not_yet ->
            Process.sleep(1)
            kill_child(sup, ref, child, last, kills)
        end
    end
  end

  defp assert_fresh_registry do
    eventually("a new registry", &registry_server/0)
    eventually("a new watchdog", fn -> Process.whereis(Watchdog) end)
    assert %{subscriptions: 0, subscribers: 0} = stats()
    assert %{watches: 0} = Watchdog.stats()
    assert_working_registry()
  end

  describe "reloading and purging the code" do
    test "every module reloaded and soft-purged under load; the NIF bridge refuses the upgrade" do
      workers = start_workers(2, 2)
      subscriber = spawn_subscriber()
      modules = Application.spec(:ex_atlas, :modules)

      results =
        quietly(fn ->
          for module <- modules do
            result = :code.load_file(module)
            await_soft_purge(module)
            {module, result}
          end
        end)

      # The bridge keeps its loaded code: a second load of the library is refused (no
      # upgrade callback), so the old module stays current and keeps its NIFs.
      assert {Native, {:error, :on_load_failure}} in results
      for {module, result} <- results, module != Native, do: assert(result == {:module, module})

      outcomes = stop_workers(workers)
      assert outcomes.other == 0 and outcomes.argument_error == 0, inspect(outcomes)
      # The registry the code was reloaded under still holds its subscribers.
      assert Dispatcher.count(@topic <> ":kept") == 1
      assert_delivered(subscriber)
      assert_working_registry()
    end

    test "the NIF bridge deleted, purged and loaded afresh: the VM survives, a restart heals" do
      subscriber = spawn_subscriber()

      # The current code becomes old and is purged, then a fresh copy loads the library
      # again. Nobody calls the bridge meanwhile: a call to the deleted module would load
      # it on its own (interactive mode) and race the load below, and concurrent loads of
      # a module with @on_load can hang the code server in OTP 25 (erlang/otp#7466).
      # The server is held still until the old dispatcher has been tried: its periodic
      # check of lost deliveries calls the bridge too, crashes on the old dispatcher, and
      # its restart makes a new one that the calls below would accept (seen on a slow
      # machine).
      server = Process.whereis(ExAtlas.Fly.Dispatcher.Registry)
      :ok = :sys.suspend(server)

      quietly(fn ->
        :code.purge(Native)
        true = :code.delete(Native)
        :code.purge(Native)
        {:module, Native} = :code.load_file(Native)
      end)

      # The dispatcher made by the old copy is a resource of the old library's type, which
      # the new copy does not accept: every call with it raises ArgumentError, under load too.
      assert_raise ArgumentError, fn -> Dispatcher.count(@topic) end
      workers = start_workers(2, 2)
      Process.sleep(100)
      outcomes = stop_workers(workers)
      assert outcomes.other == 0 and outcomes.ok == 0, inspect(outcomes)
      assert Process.whereis(ExAtlas.Fly.Dispatcher.Registry) == server
      quietly(fn -> :ok = :sys.resume(server) end)

      # The old registry's monitors still fire into the old library's code, which stays
      # mapped: a subscriber of it dying must not take the VM down.
      kill_all([subscriber])

      # A restart gives a working registry on the fresh code. The old dispatcher cannot be
      # closed by the new code (its terminate/2 raises, logged), so it goes with its last
      # reference.
      quietly(fn ->
        :ok = Application.stop(:ex_atlas)
        {:ok, _} = Application.ensure_all_started(:ex_atlas)
      end)

      assert_working_registry()
      assert_one_set_of_senders()
    end
  end

  describe "VM shutdown with full lanes" do
    test "init:stop/0 and System.halt/0 both end the VM promptly" do
      ebin = Path.join(:code.lib_dir(:ex_atlas), "ebin")

      # kill_then_init_stop: each sender, the server, the watchdog and the supervisor are
      # killed under that load first (issue 9 §3). Promptly means that the stop waits out
      # no timeout of ours, which supervisor reports tell whatever the machine's speed
      # (the VM's script watches for them): no supervisor had to kill one of our
      # processes because its shutdown time ran out, and none failed to start one
      # because it gave up waiting for its predecessor (a server waits up to 10 s for
      # the server of a killed supervisor to finish closing; a restart caught in that
      # wait holds the stop until it ends). The time from :init.stop/0 to the exit is
      # printed (the issue's figure: within 5 s), not asserted.
      runs =
        for mode <- ["init_stop", "halt", "kill_then_init_stop"] do
          Task.async(fn -> {mode, run_vm(ebin, mode, 120_000)} end)
        end

      for {mode, {status, output}} <- Task.await_many(runs, :infinity) do
        assert output =~ "FULL", "#{mode}: the lanes were not full before the stop:\n#{output}"

        if mode in ["init_stop", "kill_then_init_stop"] do
          # Issue 19 §4: :init.stop/0 is a path by which the application stops too. An
          # application started before :ex_atlas stops after it, and its prep_stop/1
          # counts the subscribers that got the closing exit signal by then.
          assert [_, told, of] = Regex.run(~r/TOLD (\d+) OF (\d+)/, output), output
          assert told == of, "#{mode}: only #{told} of #{of} subscribers were told"

          refute output =~ "SHUTDOWN_ERROR",
                 "#{mode}: a process was killed when its shutdown time ran out:\n" <>
                   first_line(output, "SHUTDOWN_ERROR")

          refute output =~ "START_ERROR",
                 "#{mode}: a start gave up waiting:\n" <> first_line(output, "START_ERROR")
        end

        assert status == 0, "#{mode}: exit status #{status}:\n#{output}"

        IO.puts(
          "\nlifecycle, VM #{mode} with full lanes: exited 0; #{first_line(output, "FULL")}" <>
            stop_time(output) <> told(output)
        )
      end
    end
  end

  # --- workers -------------------------------------------------------------------------

  # Producers dispatch and sync, churners subscribe (plain and with backpressure) and
  # unsubscribe, all counting what happened; anything but :ok or ArgumentError stops them.
  defp start_workers(producers, churners) do
    parent = self()

    for kind <- List.duplicate(:producer, producers) ++ List.duplicate(:churner, churners) do
      spawn_monitor(fn ->
        # A churner subscribed when the registry closes is told with an exit signal, as a
        # subscriber of the original Registry was through its link; it traps it and goes on.
        if kind == :churner, do: Process.flag(:trap_exit, true)
        work(kind, parent, %{ok: 0, argument_error: 0})
      end)
    end
  end

  defp work(kind, parent, counts) do
    receive do
      {:stop, ^parent} -> send(parent, {:worked, self(), counts})
    after
      0 ->
        result =
          try do
            step(kind)
            :ok
          rescue
            ArgumentError -> :argument_error
          end

        # The mailbox gets what this process subscribed to; keep it small.
        flush()
        work(kind, parent, Map.update!(counts, result, &(&1 + 1)))
    end
  end

  defp step(:producer) do
    :ok = Dispatcher.dispatch(@topic, {:lifecycle, self()})
    if :rand.uniform(10) == 1, do: :ok = Dispatcher.sync()
  end

  defp step(:churner) do
    if :rand.uniform(2) == 1,
      do: :ok = Dispatcher.subscribe(@topic),
      else: :ok = Dispatcher.subscribe_with_backpressure(@topic, threshold: 1_000)

    true = Dispatcher.count(@topic) >= 0
    :ok = Dispatcher.unsubscribe(@topic)
  end

  defp flush do
    receive do
      {:lifecycle, _} -> flush()
      {:ex_atlas_fly_backpressure_evict, _} -> flush()
    after
      0 -> :ok
    end
  end

  # Returns the summed counts; a worker that died of anything else counts in :other.
  defp stop_workers(workers) do
    for {pid, _} <- workers, do: send(pid, {:stop, self()})

    Enum.reduce(workers, %{ok: 0, argument_error: 0, other: 0, died: []}, fn {pid, ref}, acc ->
      receive do
        {:worked, ^pid, counts} ->
          receive(do: ({:DOWN, ^ref, :process, ^pid, _} -> :ok))

          %{
            acc
            | ok: acc.ok + counts.ok,
              argument_error: acc.argument_error + counts.argument_error
          }

        {:DOWN, ^ref, :process, ^pid, reason} ->
          %{acc | other: acc.other + 1, died: [reason | acc.died]}
      after
        60_000 -> flunk("worker #{inspect(pid)} is stuck")
      end
    end)
  end

  # --- checks --------------------------------------------------------------------------

  defp assert_working_registry do
    topic = @topic <> ":after"
    :ok = Dispatcher.subscribe(topic)
    :ok = Dispatcher.dispatch(topic, {:works, topic})
    :ok = Dispatcher.sync()
    assert_received {:works, ^topic}
    assert Dispatcher.count(topic) == 1
    :ok = Dispatcher.unsubscribe(topic)
    assert Dispatcher.count(topic) == 0
  end

  # Restarts left no sender process of an earlier registry behind.
  defp assert_one_set_of_senders do
    senders =
      for pid <- Process.list(),
          {:dictionary, dictionary} <- [Process.info(pid, :dictionary)],
          dictionary[:"$initial_call"] == {Sender, :init, 1},
          do: pid

    assert length(senders) == stats().lanes
  end

  defp spawn_subscriber do
    parent = self()

    pid =
      spawn(fn ->
        :ok = Dispatcher.subscribe(@topic <> ":kept")
        send(parent, {:subscribed, self()})
        forward(parent)
      end)

    assert_receive {:subscribed, ^pid}, 5_000
    pid
  end

  defp forward(parent) do
    receive do
      message -> send(parent, {:forwarded, self(), message}) && forward(parent)
    end
  end

  defp assert_delivered(subscriber) do
    :ok = Dispatcher.dispatch(@topic <> ":kept", :still_subscribed)
    :ok = Dispatcher.sync()
    assert_receive {:forwarded, ^subscriber, :still_subscribed}, 5_000
    kill_all([subscriber])
  end

  defp await_soft_purge(module) do
    eventually(
      "old code of #{inspect(module)} purged",
      fn -> :code.soft_purge(module) end,
      30_000
    )
  end

  defp quietly(fun) do
    ExUnit.CaptureLog.capture_log(fn ->
      send(self(), {:quietly, fun.()})
      # Reports of other processes (the code server's on_load warning) arrive a moment later.
      Process.sleep(50)
      Logger.flush()
    end)

    assert_received {:quietly, result}
    result
  end

  # --- a VM of its own ---------------------------------------------------------------

  # Starts `elixir` on the build's ebin, fills the lanes with a tiny capacity, prints the
  # stats with FULL, stops the VM the given way and returns {exit status, output}.
  defp run_vm(ebin, mode, timeout) do
    script =
      Path.join(
        System.tmp_dir!(),
        "ex_atlas_full_#{mode}_#{System.unique_integer([:positive])}.exs"
      )

    File.write!(script, vm_script(mode))
    elixir = System.find_executable("elixir") || flunk("elixir not on PATH")

    port =
      Port.open({:spawn_executable, elixir}, [
        :binary,
        :exit_status,
        :stderr_to_stdout,
        args: ["-pa", ebin, script]
      ])

    {:os_pid, os_pid} = Port.info(port, :os_pid)
    deadline = System.monotonic_time(:millisecond) + timeout

    try do
      collect_vm(port, os_pid, deadline, "")
    after
      File.rm(script)
    end
  end

  defp collect_vm(port, os_pid, deadline, output) do
    receive do
      {^port, {:data, data}} ->
        collect_vm(port, os_pid, deadline, output <> data)

      {^port, {:exit_status, status}} ->
        {status, output <> "\nEXITED #{System.os_time(:millisecond)}"}
    after
      max(deadline - System.monotonic_time(:millisecond), 0) ->
        System.cmd("kill", ["-9", Integer.to_string(os_pid)])
        flunk("the VM did not exit within the timeout; output so far:\n#{output}")
    end
  end

  defp vm_script(mode) do
    """
    # Prints SHUTDOWN_ERROR for each child a supervisor killed because its shutdown time
    # ran out, and START_ERROR for each child it could not start (supervisor reports,
    # whether or not the console logs those).
    defmodule ShutdownWatch do
      def log(%{msg: {:report, %{label: {:supervisor, :shutdown_error}, report: report}}}, _) do
        IO.puts("SHUTDOWN_ERROR \#{inspect(report[:offender][:id])} \#{inspect(report[:reason])}")
      end

      def log(%{msg: {:report, %{label: {:supervisor, :start_error}, report: report}}}, _) do
        IO.puts("START_ERROR \#{inspect(report[:offender][:id])} \#{inspect(report[:reason])}")
      end

      def log(_event, _config), do: :ok
    end

    :ok = :logger.add_handler(:shutdown_watch, ShutdownWatch, %{level: :all})

    # Started before :ex_atlas, so stopped after it: its prep_stop/1 reports how many of
    # the subscribers got the registry's closing exit signal by then.
    defmodule ToldProbe do
      use Application
      def start(_type, _args), do: Supervisor.start_link([], strategy: :one_for_one)

      def prep_stop(state) do
        told = :persistent_term.get(:told)
        wait = fn wait, left ->
          if :counters.get(told, 1) < 20_000 and left > 0,
            do: Process.sleep(10) && wait.(wait, left - 1),
            else: :ok
        end
        wait.(wait, 500)
        IO.puts("TOLD \#{:counters.get(told, 1)} OF 20000")
        state
      end
    end

    :persistent_term.put(:told, :counters.new(1, []))
    :ok = :application.load({:application, :told_probe,
      [description: ~c"probe", vsn: ~c"1", modules: [ToldProbe], registered: [],
       applications: [:kernel, :stdlib], mod: {ToldProbe, []}]})
    {:ok, _} = Application.ensure_all_started(:told_probe)

    Application.put_env(:ex_atlas, :fly, queue_capacity: 2, lanes: 2)
    {:ok, _} = Application.ensure_all_started(:ex_atlas)
    alias ExAtlas.Fly.Dispatcher
    alias ExAtlas.Fly.Dispatcher.Backend.Registry, as: RegistryBackend

    parent = self()
    told = :persistent_term.get(:told)
    # Subscribers that never read: every delivery stays in a mailbox. They trap exits
    # and count the registry's closing signal.
    for _ <- 1..20_000 do
      spawn(fn ->
        Process.flag(:trap_exit, true)
        :ok = Dispatcher.subscribe("full")
        send(parent, :subscribed)
        receive do
          {:EXIT, _, {:shutdown, :ex_atlas_dispatcher_closed}} -> :counters.add(told, 1, 1)
        end
        Process.sleep(:infinity)
      end)
    end
    for _ <- 1..20_000, do: receive(do: (:subscribed -> :ok))

    # Producers that never stop: every lane at its bound, the producers waiting for room.
    for id <- 1..8 do
      spawn(fn ->
        Stream.iterate(1, &(&1 + 1))
        |> Enum.each(&Dispatcher.dispatch("full", {:full, id, &1, :binary.copy("x", 200)}))
      end)
    end

    full = fn full ->
      stats = RegistryBackend.stats()
      if stats.max_in_flight >= stats.queue_capacity and stats.waiting > 0,
        do: stats,
        else: Process.sleep(5) && full.(full)
    end

    IO.puts("FULL " <> inspect(Map.take(full.(full), [:in_flight, :max_in_flight, :queue_capacity, :waiting])))

    case "#{mode}" do
      "init_stop" ->
        IO.puts("STOPPING #{System.os_time(:millisecond)}")
        :init.stop()
        Process.sleep(:infinity)

      "kill_then_init_stop" ->
        kill = fn pid -> Process.exit(pid, :kill) && Process.sleep(200) end
        Enum.each(ExAtlas.Fly.Dispatcher.Server.senders(), kill)
        for name <- [Dispatcher.registry_name(), ExAtlas.Fly.Dispatcher.Watchdog, ExAtlas.Fly.Dispatcher.Supervisor] do
          if pid = Process.whereis(name), do: kill.(pid)
        end
        IO.puts("STOPPING #{System.os_time(:millisecond)}")
        :init.stop()
        Process.sleep(:infinity)

      "halt" ->
        System.halt()
    end
    """
  end

  # "STOPPING <monotonic ms>" is printed just before :init.stop/0; "EXITED <ms>" by the
  # collector when the port closed, on the same machine's monotonic clock (OS-wide).
  defp stop_time(output) do
    with [_, stop] <- Regex.run(~r/STOPPING (\d+)/, output),
         [_, exit] <- Regex.run(~r/EXITED (\d+)/, output) do
      "; :init.stop/0 to exit #{String.to_integer(exit) - String.to_integer(stop)} ms"
    else
      _ -> ""
    end
  end

  defp told(output) do
    case first_line(output, "TOLD") do
      "" -> ""
      line -> "; " <> line
    end
  end

  defp first_line(output, prefix) do
    output |> String.split("\n") |> Enum.find("", &String.starts_with?(&1, prefix))
  end
end
