defmodule FanoutBench.Churn do
  @moduledoc false
  # Subscribe/unsubscribe throughput, NIF vs Registry, from 1 or more concurrent worker
  # processes. Each worker owns `k` distinct topics and, per repetition, runs `cycles`
  # times each of these phases, timing each phase itself:
  #
  #   * subscribe:   subscribe to all k topics (the first one sets up the monitor/link);
  #   * unsubscribe: unsubscribe from all k (the last one releases it);
  #   * pairs:       subscribe + unsubscribe of each topic in turn (so a monitor or link
  #                  is set up and released every time, as for short-lived subscribers).
  #
  # Workers start together; the throughput of a repetition is the sum of the workers' own
  # rates (they run side by side). Contenders alternate inside each repetition; the first
  # repetition is a warm-up.

  alias FanoutBench.{Contenders, Stats}

  @contenders [:nif, :registry]
  @phases [:subscribe, :unsubscribe, :pairs]

  @doc "Runs the churn benchmark; one row per (contender, workers)."
  @spec run([pos_integer()], pos_integer(), pos_integer(), pos_integer()) :: [map()]
  def run(worker_counts, k, cycles, reps) do
    for workers <- worker_counts, row <- run_workers(workers, k, cycles, reps), do: row
  end

  defp run_workers(workers, k, cycles, reps) do
    pids = for w <- 1..workers, do: spawn_link(fn -> worker(topics(w, k), cycles) end)

    samples =
      Enum.reduce(0..reps, %{}, fn rep, acc ->
        order = if rem(rep, 2) == 0, do: @contenders, else: Enum.reverse(@contenders)

        Enum.reduce(order, acc, fn contender, acc ->
          rates = run_once(pids, contender, k * cycles)

          if rep == 0,
            do: acc,
            else: Map.update(acc, contender, [rates], &[rates | &1])
        end)
      end)

    Enum.each(pids, &send(&1, :stop))

    for contender <- @contenders do
      runs = Map.fetch!(samples, contender)

      phases =
        Map.new(@phases, fn phase ->
          {phase, Stats.summarize(Enum.map(runs, &Map.fetch!(&1, phase)))}
        end)

      Map.merge(
        %{contender: contender, workers: workers, k: k, cycles: cycles, reps: reps},
        phases
      )
    end
  end

  defp topics(worker, k), do: for(i <- 1..k, do: "churn:#{worker}:#{i}")

  # Operations per second of each phase, summed over the workers.
  defp run_once(pids, contender, ops) do
    ref = make_ref()
    Enum.each(pids, &send(&1, {:churn, contender, self(), ref}))

    pids
    |> Enum.map(fn _ ->
      receive do
        {:churned, ^ref, times} -> times
      after
        120_000 -> raise "churn worker did not finish its #{contender} phases"
      end
    end)
    |> Enum.reduce(%{}, fn times, acc ->
      Enum.reduce(times, acc, fn {phase, ns}, acc ->
        Map.update(acc, phase, ops / (ns / 1.0e9), &(&1 + ops / (ns / 1.0e9)))
      end)
    end)
  end

  defp worker(topics, cycles) do
    receive do
      {:churn, contender, from, ref} ->
        times =
          Enum.reduce(1..cycles, %{}, fn _, acc ->
            Enum.reduce(@phases, acc, fn phase, acc ->
              ns = timed(fn -> run_phase(phase, contender, topics) end)
              Map.update(acc, phase, ns, &(&1 + ns))
            end)
          end)

        send(from, {:churned, ref, times})
        worker(topics, cycles)

      :stop ->
        :ok
    end
  end

  defp timed(fun) do
    t0 = System.monotonic_time()
    fun.()
    System.convert_time_unit(System.monotonic_time() - t0, :native, :nanosecond)
  end

  defp run_phase(:subscribe, c, topics), do: Enum.each(topics, &Contenders.subscribe(c, &1))
  defp run_phase(:unsubscribe, c, topics), do: Enum.each(topics, &Contenders.unsubscribe(c, &1))

  defp run_phase(:pairs, c, topics) do
    Enum.each(topics, fn topic ->
      Contenders.subscribe(c, topic)
      Contenders.unsubscribe(c, topic)
    end)
  end
end
