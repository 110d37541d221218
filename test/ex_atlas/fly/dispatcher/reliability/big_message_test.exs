defmodule ExAtlas.Fly.Dispatcher.Reliability.BigMessageTest do
  # Issue 9 §1 of the reliability suite: however big the message, a sender's NIF call
  # returns after about one timeslice (1 ms), so the VM preempts the senders as it would
  # any send loop. Before the fix, 256 copies of a 0.8 MiB log batch per call held a
  # scheduler for up to 485 ms.
  #
  # The senders' scheduling is traced (`:running`, with timestamps) while they deliver
  # big log batches: of the time they ran, at most @long_share_limit % may be spent in
  # slices (scheduled in to scheduled out) longer than @long_us. Not the worst slice:
  # wall-clock slices on a shared 2-core machine have a tail of OS preemption (plain send
  # loops show it too; bench/safety.exs compares the worst slices with a plain loop's),
  # while unbounded NIF calls put nearly all of the running time in long slices (99 % and
  # more at 200 KiB, tried by removing the bound; bounded: 2 % at 200 KiB, up to about
  # 40 % at 800 KiB, where a single copy into a fresh heap takes milliseconds). An attempt over the limit runs again, up to @attempts
  # times, as in scheduler_test.exs.
  use ExUnit.Case, async: false

  import ExAtlas.Test.FlyEnv, only: [restart_app: 1, unique_topic: 1]
  import ExAtlas.Test.Reliability

  alias ExAtlas.Fly.Dispatcher
  alias ExAtlas.Fly.Dispatcher.Server

  @moduletag timeout: :infinity

  @long_us 5_000
  @long_share_limit 75
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
        {attempt, slices} = attempt(fn -> sender_slices(topic, message, dispatches) end)
        sorted = Enum.sort(slices)

        IO.puts(
          "\nbig messages, #{n} subscribers, #{kib} KiB x #{dispatches}: #{length(sorted)} " <>
            "sender slices in attempt #{attempt}, median #{median(sorted)} us, worst " <>
            "#{List.last(sorted)} us, #{long_share(slices)} % of the time in slices over " <>
            "#{@long_us} us"
        )
      end
    after
      kill_all(subscribers)
    end
  end

  # Runs `fun` until the share of long slices is within the limit; flunks after @attempts.
  defp attempt(fun, attempt \\ 1, shares \\ []) do
    slices = fun.()
    share = long_share(slices)

    cond do
      share <= @long_share_limit ->
        {attempt, slices}

      attempt < @attempts ->
        attempt(fun, attempt + 1, [share | shares])

      true ->
        flunk(
          "the senders spent #{inspect(Enum.reverse([share | shares]))} % of their " <>
            "running time in slices over #{@long_us} us, in every attempt"
        )
    end
  end

  # Percent of the running time spent in slices longer than @long_us.
  defp long_share([]), do: 0

  defp long_share(slices) do
    long = slices |> Enum.filter(&(&1 > @long_us)) |> Enum.sum()
    div(100 * long, max(Enum.sum(slices), 1))
  end

  defp median([]), do: 0
  defp median(sorted), do: Enum.at(sorted, div(length(sorted), 2))

  # How long (us) the senders ran each time they were scheduled in while `count`
  # dispatches of `message` were delivered.
  defp sender_slices(topic, message, count) do
    senders = Server.senders()
    for sender <- senders, do: :erlang.trace(sender, true, [:running, :monotonic_timestamp])
    for _ <- 1..count, do: :ok = Dispatcher.dispatch(topic, message)
    :ok = Dispatcher.sync()
    for sender <- senders, do: :erlang.trace(sender, false, [:running])
    # Tracing is off; what it sent before is in the mailbox, in order per sender.
    events = collect([])

    Enum.flat_map(senders, fn sender ->
      events
      |> Enum.filter(&(elem(&1, 0) == sender))
      |> Enum.chunk_every(2, 1, :discard)
      |> Enum.flat_map(fn
        [{_, :in, t_in}, {_, :out, t_out}] -> [div(t_out - t_in, 1_000)]
        _ -> []
      end)
    end)
  end

  defp collect(acc) do
    receive do
      {:trace_ts, pid, in_out, _mfa, ts} when in_out in [:in, :out] ->
        collect([{pid, in_out, ts} | acc])
    after
      100 -> Enum.reverse(acc)
    end
  end

  defp log_entries(count) do
    for i <- 1..count do
      %{
        "timestamp" => "2026-11-30T07:00:#{rem(i, 60)}Z",
        "level" => "info",
        "message" => "GET /api/items/#{i} 200 in #{rem(i * 7, 900)}ms",
        "instance" => "9080e6f3a5d287",
        "region" => "ams"
      }
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
