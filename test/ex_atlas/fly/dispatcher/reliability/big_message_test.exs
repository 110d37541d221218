defmodule ExAtlas.Fly.Dispatcher.Reliability.BigMessageTest do
  # Issue 9 §1 of the reliability suite: however big the message, a sender's NIF call
  # returns after about one timeslice, so the VM preempts the senders as it would any
  # send loop. Before the fix, 256 copies of a 0.8 MiB log batch per call held a
  # scheduler for up to 485 ms.
  #
  # The senders' scheduling is traced (`:running`, with timestamps) while they deliver
  # big log batches, and so is a plain send loop's that sends the same message to the
  # same subscribers as often, in the same run: the time-weighted median of the senders'
  # slices (half of their running time is in slices at least that long) may be at most
  # @loop_factor times the loop's. Wall-clock slices on a shared 2-core machine have a
  # tail of OS preemption, which the loop sees as much as the senders and which does not
  # move a median; calls that run too long (unbounded, or bounded by a longer time than a
  # loop's slice) move all of it. An attempt over the bound runs again, up to @attempts
  # times, as in scheduler_test.exs.
  use ExUnit.Case, async: false

  import ExAtlas.Test.FlyEnv, only: [restart_app: 1, unique_topic: 1]
  import ExAtlas.Test.Reliability

  alias ExAtlas.Fly.Dispatcher

  @moduletag timeout: :infinity

  @loop_factor 2
  @attempts 4

  setup do
    restart_app(lanes: 2)
  end

  test "1 000 subscribers, log batches of about 8 KiB, 200 KiB and 800 KiB: short slices" do
    bounded_slices(1_000, [20, 500, 2_000], 3)
  end

  @tag :soak
  test "3 000 subscribers, log batches of 8 KiB to 800 KiB, 10 rounds: short slices (soak)" do
    bounded_slices(3_000, [20, 500, 2_000], 10)
  end

  defp bounded_slices(n, sizes, dispatches) do
    topic = unique_topic("big")
    subscribers = spawn_sinks(n, topic)

    try do
      for entries <- sizes do
        message = {:ex_atlas_fly_logs, "big-app", log_entries(entries)}
        kib = div(:erts_debug.flat_size(message) * :erlang.system_info(:wordsize), 1024)

        {attempt, medians} =
          within_loops(
            fn -> senders_and_loops(topic, subscribers, message, dispatches) end,
            @loop_factor,
            @attempts
          )

        IO.puts(
          "\nbig messages, #{n} subscribers, #{kib} KiB x #{dispatches}: time-weighted " <>
            "median slice of the senders #{medians.senders} us, of a send loop doing the " <>
            "same #{medians.loop} us (attempt #{attempt})"
        )
      end
    after
      kill_all(subscribers)
    end
  end

  defp spawn_sinks(n, topic) do
    spawn_ready(n, fn ready ->
      :ok = Dispatcher.subscribe(topic)
      ready.()
      sink()
    end)
  end

  defp sink do
    receive do
      _ -> sink()
    end
  end
end
