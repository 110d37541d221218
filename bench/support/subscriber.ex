defmodule FanoutBench.Subscriber do
  @moduledoc false
  # One subscriber process serves every contender. Messages are
  # `{:ex_atlas_fly_logs, app, entries}` whose `app` ("app1".."app4") names the contender;
  # the subscriber bumps that contender's slot of a shared `:atomics` (set to -expected by
  # the driver before each round) and the subscriber whose `add_get` reaches 0 tells the
  # waiter, so nobody spins while waiting for a round to complete.

  @doc "Spawns `count` subscribers that report completed rounds to `waiter`."
  @spec spawn_many(pos_integer(), :atomics.atomics_ref(), pid()) :: [pid()]
  def spawn_many(count, counters, waiter) do
    # They trap exits: the :ex_atlas application restarts between passes, and closing the
    # registry tells its subscribers with an exit signal; they subscribe again anyway.
    for _ <- 1..count do
      spawn(fn ->
        Process.flag(:trap_exit, true)
        loop(counters, waiter)
      end)
    end
  end

  @doc """
  Runs `fun_for.(index)` inside each subscriber (index from 0) and waits until every one
  has run it. The functions run concurrently, one per subscriber.
  """
  @spec run_in_each([pid()], (non_neg_integer() -> (() -> term()))) :: :ok
  def run_in_each(pids, fun_for) do
    ref = make_ref()

    count =
      pids
      |> Enum.with_index()
      |> Enum.reduce(0, fn {pid, index}, sent ->
        case fun_for.(index) do
          nil ->
            sent

          fun ->
            send(pid, {:run, self(), ref, fun})
            sent + 1
        end
      end)

    await(ref, count)
  end

  defp await(_ref, 0), do: :ok

  defp await(ref, left) do
    receive do
      {:ran, ^ref, :ok} -> await(ref, left - 1)
      {:ran, ^ref, other} -> raise "a subscriber's setup returned #{inspect(other)}"
    after
      120_000 -> raise "subscribers did not finish their setup (#{left} missing)"
    end
  end

  defp loop(counters, waiter) do
    receive do
      {:ex_atlas_fly_logs, <<"app", digit>>, _entries} ->
        index = digit - ?0
        if :atomics.add_get(counters, index, 1) == 0, do: send(waiter, {:fanout_done, index})
        loop(counters, waiter)

      {:run, from, ref, fun} ->
        send(from, {:ran, ref, fun.()})
        loop(counters, waiter)

      {:EXIT, _from, _reason} ->
        loop(counters, waiter)
    end
  end
end
