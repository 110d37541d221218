defmodule ExAtlas.Fly.Dispatcher.ReplayTimesliceTest do
  # The README ("Schedulers"): no NIF call holds a normal scheduler for more than about
  # half a millisecond plus one send, "no longer than a plain `send/2` loop's timeslice";
  # a subscriber catching up on its replay sends itself its history in such calls
  # (`Native.replay/2`, one timeslice at a time).
  #
  # Measured against a plain send loop in the same run, never against a number: a joiner
  # replays 500 log batches of 200 lines (about 17 KiB encoded), with its
  # `Native.replay/2` calls traced (call to return, wall clock), and a process sends the
  # same 500 terms to another process in a plain loop, its scheduling slices traced (4 000
  # reductions each). The median call must be no longer than the loop's median slice. A
  # bound by time keeps the calls at 0.5 ms plus one message (about 0.58 ms here, against
  # 0.7-1.9 ms for the loop's slices); without it a call sends a whole chunk of the
  # history (up to 64 batches or 1 MiB: about 3.6 ms), and the test fails (checked by
  # deleting the time check in `nif/replay.rs`'s `send_chunk`). Medians, because the OS
  # may take a core away from any single call or slice on a shared machine; and up to
  # three attempts, of which one must pass: a missing bound is slow in every attempt,
  # noise is not.
  use ExUnit.Case, async: false

  import ExAtlas.Test.FlyEnv

  alias ExAtlas.Fly.Dispatcher
  alias ExAtlas.Fly.Dispatcher.Native

  @moduletag timeout: 120_000
  @batches 500
  @attempts 3

  setup do
    restart_app(replay: @batches, replay_memory: 64 * 1024 * 1024)
    on_exit(fn -> :erlang.trace_pattern({Native, :replay, 2}, false, [:local]) end)
    :ok
  end

  test "a joiner's replay calls are no longer than a plain send loop's slices" do
    topic = unique_topic("replay:timeslice")
    batches = for n <- 1..@batches, do: log_batch(n)
    for batch <- batches, do: :ok = Dispatcher.dispatch(topic, batch)
    1 = :erlang.trace_pattern({Native, :replay, 2}, [{:_, [], [{:return_trace}]}], [:local])

    results = attempt(topic, batches, @attempts, [])

    assert Enum.any?(results, fn {calls, slices} -> median(calls) <= median(slices) end),
           "replay calls vs the loop's slices, median (max), us, per attempt: " <>
             Enum.map_join(results, "; ", fn {calls, slices} ->
               "#{length(calls)} calls #{median(calls)} (#{Enum.max(calls)}) vs " <>
                 "#{length(slices)} slices #{median(slices)} (#{Enum.max(slices)})"
             end)
  end

  defp attempt(_topic, _batches, 0, results), do: results

  defp attempt(topic, batches, left, results) do
    calls = replay_calls(topic, batches)
    slices = loop_slices(batches)
    # The history is big enough to need many calls at 0.5 ms each (40-50 here): what is
    # compared is a bound. Without the time check the chunks make fewer than 10.
    assert length(calls) >= 10

    if median(calls) <= median(slices),
      do: [{calls, slices} | results],
      else: attempt(topic, batches, left - 1, [{calls, slices} | results])
  end

  # A joiner's `Native.replay/2` calls, each from its call to its return, in us.
  defp replay_calls(topic, batches) do
    parent = self()

    joiner =
      spawn(fn ->
        receive do: (:go -> :ok)
        :ok = Dispatcher.subscribe(topic, replay: @batches)
        send(parent, {:joined, self(), collect([])})
      end)

    1 = :erlang.trace(joiner, true, [:call, :monotonic_timestamp])
    send(joiner, :go)
    assert_receive {:joined, ^joiner, got}, 60_000
    # It has its whole history, in order: the calls measured did the whole replay.
    assert got == batches
    events = trace_events(joiner, [])

    durations =
      for [{:call, called}, {:return, returned}] <- Enum.chunk_every(events, 2),
          do: to_us(returned - called)

    assert length(durations) * 2 == length(events)
    durations
  end

  # The scheduling slices of a process sending `batches` to another one in a loop, in us.
  defp loop_slices(batches) do
    parent = self()
    sink = spawn(fn -> receive do: (:stop -> :ok) end)

    loop =
      spawn(fn ->
        receive do: (:go -> :ok)
        Enum.each(batches, &send(sink, &1))
        send(parent, {:looped, self()})
      end)

    1 = :erlang.trace(loop, true, [:running, :monotonic_timestamp])
    send(loop, :go)
    assert_receive {:looped, ^loop}, 60_000
    events = trace_events(loop, [])
    send(sink, :stop)

    for [{:in, went_in}, {:out, went_out}] <- Enum.chunk_every(events, 2),
        do: to_us(went_out - went_in)
  end

  defp collect(acc) do
    receive do
      {:ex_atlas_fly_logs, _app, _entries} = batch -> collect([batch | acc])
    after
      0 -> Enum.reverse(acc)
    end
  end

  # Tracing of a process ends with it: what it traced is all in the mailbox once a
  # `trace_delivered` answer comes.
  defp trace_events(pid, acc) do
    ref = :erlang.trace_delivered(pid)
    assert_receive {:trace_delivered, ^pid, ^ref}, 10_000
    drain(pid, acc)
  end

  defp drain(pid, acc) do
    receive do
      {:trace_ts, ^pid, :call, _mfa, ts} -> drain(pid, [{:call, ts} | acc])
      {:trace_ts, ^pid, :return_from, _mfa, _result, ts} -> drain(pid, [{:return, ts} | acc])
      {:trace_ts, ^pid, :in, _mfa, ts} -> drain(pid, [{:in, ts} | acc])
      {:trace_ts, ^pid, :out, _mfa, ts} -> drain(pid, [{:out, ts} | acc])
      {:trace_ts, ^pid, _other, _, _} -> drain(pid, acc)
    after
      0 -> Enum.reverse(acc)
    end
  end

  defp to_us(ns), do: System.convert_time_unit(ns, :nanosecond, :microsecond)

  defp median(values), do: values |> Enum.sort() |> Enum.at(div(length(values), 2))

  defp log_batch(n) do
    entries =
      for i <- 1..200,
          do: %{"line" => "batch #{n} line #{i}: some log text", "ts" => i, "level" => :info}

    {:ex_atlas_fly_logs, "app-#{n}", entries}
  end
end
