defmodule ExAtlas.Fly.Dispatcher.Reliability.SchedulerTest do
  # Item 5 of the reliability suite: with a very large topic, no NIF call keeps a normal
  # scheduler busy for long. `:erlang.system_monitor/2` reports every time a process ran
  # uninterrupted for 2 ms or more (`long_schedule`); a NIF whose cost grows with the
  # topic would show up at every call.
  #
  # long_schedule measures wall-clock time, so it also sees the OS taking a core away from
  # a scheduler thread. On a shared two-core machine that happens whatever runs: killing
  # 100 000 processes that never subscribed gave 23-32 events here, and processes that only
  # wait in `receive` get events while the dirty schedulers deliver. The test is built so
  # that such noise cannot decide it while a slow NIF still must:
  #
  # * the probe process yields before and after every API call, so each call runs in a
  #   scheduling slice of its own, and a slow call is seen at every call;
  # * slices in which the probe only woke up inside `sync/0`'s `receive`, saw one of the
  #   senders' replies and went back to waiting contain no NIF call and are not counted;
  # * a phase with a counted event runs again, up to 4 attempts; it fails only if one and
  #   the same call was slow in every attempt (a slow NIF is slow at every call; the OS
  #   hits a random one), or the exits went over their rate every time;
  # * for the mass kill, the exits themselves are counted against a rate: a `down`
  #   callback taking 2 ms would put nearly every one of the exits over the threshold,
  #   noise a few hundredths of a percent of them (printed beside a baseline of processes
  #   that never subscribed, killed the same way);
  # * the senders' own slices, while they deliver log batches to the whole topic, are held
  #   to what a plain send loop gets in the same run, sending the same message to the same
  #   subscribers as often (both traced, `:running`): the time-weighted median of the
  #   senders' slices may be at most @loop_factor times the loop's. A delivery that is not
  #   cut into timeslices runs whole batches in one call (5 000 copies of an 8 KiB batch
  #   take over 10 ms), the loop a few hundred sends a slice; an attempt over the bound
  #   runs again, up to @attempts.
  use ExUnit.Case, async: false

  import ExAtlas.Test.Reliability

  alias ExAtlas.Fly.Dispatcher
  alias ExAtlas.Fly.Dispatcher.Backend.Registry, as: RegistryBackend

  @moduletag timeout: :infinity

  @short 10_000
  @soak 100_000
  @attempts 4
  @rounds 30
  @threshold_ms 2
  # At most this share of the killed processes may see a long_schedule (1 %).
  @kill_rate_limit 100
  @topic "scheduler"
  # Dispatches of the delivery phase, each one batch per lane.
  @deliveries 5
  # The senders' time-weighted median slice may be this many times the send loop's.
  @loop_factor 2

  test "#{@short} subscribers: API calls and killing them all cause no long_schedule" do
    safety(@short)
  end

  @tag :soak
  test "#{@soak} subscribers: API calls and killing them all cause no long_schedule (soak)" do
    safety(@soak)
  end

  defp safety(n) do
    assert :erlang.system_monitor() == :undefined,
           "another process holds the system monitor: #{inspect(:erlang.system_monitor())}"

    :erlang.system_monitor(self(), [{:long_schedule, @threshold_ms}])

    try do
      subscribers = spawn_subscribers(n, true)

      {api_attempts, api_other} =
        attempt("API calls with #{n} subscribers on the topic", fn _ -> nil end, fn nil ->
          probe = spawn_probe(@rounds)
          await_probe(probe)
          {[probe], []}
        end)

      message = {:ex_atlas_fly_logs, "scheduler-app", log_entries(20)}

      {delivery_attempts, delivery} =
        within_loops(
          fn -> senders_and_loops(@topic, subscribers, message, @deliveries) end,
          @loop_factor,
          @attempts
        )

      baseline = baseline_kill_events(n)

      prepare = fn
        1 -> subscribers
        _ -> spawn_subscribers(n, true)
      end

      {kill_attempts, kill_other} =
        attempt("killing #{n} subscribers at once", prepare, fn pids ->
          # The probe keeps calling the API while the monitors fire.
          probe = spawn_probe(@rounds)
          killer = kill(pids)
          await_probe(probe)

          eventually(
            "the registry dropped every killed subscriber",
            fn -> Dispatcher.count(@topic) == 0 end,
            120_000
          )

          {[probe], [killer | pids]}
        end)

      IO.puts(
        "\nscheduler safety, #{n} subscribers: API phase clean in attempt #{api_attempts}, " <>
          "kill phase in attempt #{kill_attempts}; delivery in attempt " <>
          "#{delivery_attempts}, time-weighted median slice of the senders " <>
          "#{delivery.senders} us, of a send loop doing the same #{delivery.loop} us; " <>
          "long_schedule events of exiting " <>
          "never-subscribed processes (baseline): #{baseline}; of other processes " <>
          "(senders, subscribers receiving, ExUnit): #{api_other + kill_other}"
      )
    after
      :erlang.system_monitor(:undefined)
    end
  end

  # Runs `prepare.(attempt)` unwatched, then `phase` on its result, until an attempt in
  # which the probe processes `phase` names saw no counted event and the mass processes it
  # names stayed under the rate. After @attempts attempts without one, it fails if a
  # probe slice (the API call it ran, by its in/out location) was slow in every attempt or
  # the mass processes went over the rate in every attempt. Returns the attempt number and
  # the count of other processes' events.
  defp attempt(what, prepare, phase, number \\ 1, failures \\ []) do
    context = prepare.(number)
    flush_events()
    {probes, masses} = phase.(context)
    events = flush_events()
    probes = MapSet.new(probes)
    masses = MapSet.new(masses)

    probe_events = for {pid, info} = event <- events, pid in probes, not waiting?(info), do: event
    mass_events = for {pid, _} = event <- events, pid in masses, do: event
    other = length(events) - length(probe_events) - length(mass_events)
    limit = div(MapSet.size(masses), @kill_rate_limit)
    failures = [{probe_events, mass_events} | failures]

    cond do
      probe_events == [] and length(mass_events) <= limit ->
        report_retries(what, tl(failures), limit)
        {number, other}

      number < @attempts ->
        attempt(what, prepare, phase, number + 1, failures)

      true ->
        slow_every_time =
          failures
          |> Enum.map(fn {probe_events, _} -> MapSet.new(probe_events, &slice/1) end)
          |> Enum.reduce(&MapSet.intersection/2)

        over_rate_every_time = Enum.all?(failures, fn {_, mass} -> length(mass) > limit end)

        if MapSet.size(slow_every_time) > 0 or over_rate_every_time do
          flunk(
            "#{what}: long_schedule (>= #{@threshold_ms} ms) in all #{@attempts} attempts; " <>
              "slow in every attempt: #{inspect(MapSet.to_list(slow_every_time))}, " <>
              "exits over the rate in every attempt: #{over_rate_every_time}\n" <>
              Enum.map_join(Enum.reverse(failures), "\n", &format_failure(&1, limit))
          )
        end

        report_retries(what, failures, limit)
        {number, other}
    end
  end

  # Where a probe slice began and ended: with a yield on each side of every API call, this
  # names the call (op_subscribe, op_dispatch, ...).
  defp slice({_pid, info}), do: {info[:in], info[:out]}

  defp report_retries(what, failures, limit) do
    for failure <- Enum.reverse(failures) do
      IO.puts("\n#{what}: an attempt saw long_schedule: #{format_failure(failure, limit)}")
    end
  end

  defp format_failure({probe_events, mass_events}, limit) do
    "probe #{inspect(probe_events)}; #{length(mass_events)} exiting processes (limit " <>
      "#{limit}), first: #{inspect(Enum.take(mass_events, 3))}"
  end

  # The probe woke up in sync/0's receive for one sender's reply and went back to waiting
  # for the others: no NIF ran in that slice.
  defp waiting?(info) do
    sync_receive?(info[:in]) and sync_receive?(info[:out])
  end

  defp sync_receive?({RegistryBackend, fun, _}), do: String.starts_with?("#{fun}", "-sync/")
  defp sync_receive?(_), do: false

  defp baseline_kill_events(n) do
    pids = spawn_subscribers(n, false)
    flush_events()
    killer = kill(pids)
    watched = MapSet.new([killer | pids])
    Enum.count(flush_events(), fn {pid, _} -> pid in watched end)
  end

  # Kills `pids` from a process of its own and returns its pid once all are dead.
  defp kill(pids) do
    refs = Enum.map(pids, &Process.monitor/1)
    killer = spawn(fn -> Enum.each(pids, &Process.exit(&1, :kill)) end)

    for ref <- refs do
      receive do
        {:DOWN, ^ref, :process, _, _} -> :ok
      after
        120_000 -> flunk("a killed process did not go down")
      end
    end

    killer
  end

  defp flush_events(acc \\ []) do
    receive do
      {:monitor, pid, :long_schedule, info} -> flush_events([{pid, info} | acc])
    after
      0 -> Enum.reverse(acc)
    end
  end

  defp spawn_subscribers(n, subscribe?) do
    pids =
      spawn_ready(n, fn ready ->
        if subscribe?, do: :ok = Dispatcher.subscribe(@topic)
        ready.()
        drain()
      end)

    for pid <- pids, do: Process.unlink(pid)
    if subscribe?, do: assert(Dispatcher.count(@topic) == n)
    pids
  end

  defp drain do
    receive do
      _ -> drain()
    end
  end

  # A process that only calls the API: subscribe (a duplicate every other round), dispatch,
  # count, sync and unsubscribe, each in a scheduling slice of its own.
  defp spawn_probe(rounds) do
    parent = self()

    spawn(fn ->
      for round <- 1..rounds do
        op_subscribe()
        if rem(round, 2) == 0, do: op_subscribe()
        op_dispatch(round)
        op_count()
        op_sync()
        op_unsubscribe()
        flush_mailbox()
      end

      send(parent, {:probed, self()})
    end)
  end

  defp op_subscribe do
    :erlang.yield()
    :ok = Dispatcher.subscribe(@topic)
    :erlang.yield()
  end

  defp op_dispatch(round) do
    :erlang.yield()
    :ok = Dispatcher.dispatch(@topic, {:probe, round})
    :erlang.yield()
  end

  defp op_count do
    :erlang.yield()
    true = Dispatcher.count(@topic) > 0
    :erlang.yield()
  end

  defp op_sync do
    :erlang.yield()
    :ok = Dispatcher.sync()
    :erlang.yield()
  end

  defp op_unsubscribe do
    :erlang.yield()
    :ok = Dispatcher.unsubscribe(@topic)
    :erlang.yield()
  end

  defp await_probe(probe) do
    receive do
      {:probed, ^probe} -> :ok
    after
      300_000 -> flunk("the probe did not finish")
    end
  end

  defp flush_mailbox do
    receive do
      _ -> flush_mailbox()
    after
      0 -> :ok
    end
  end
end
