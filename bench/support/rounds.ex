defmodule FanoutBench.Rounds do
  @moduledoc false
  # Timed dispatch rounds. One round: set the contender's counter to -expected, take the
  # time, dispatch, take the time (caller-blocked), then block in `receive` until the last
  # subscriber reports (end to end). Contenders run round-robin inside each repetition,
  # starting one further along each time, so drift, GC and the machine's other load hit
  # them alike.

  alias FanoutBench.{Contenders, CpuTime, Stats}

  @round_timeout 120_000

  @type ctx :: %{
          counters: :atomics.atomics_ref(),
          messages: %{atom() => tuple()},
          plain_lists: %{binary() => [pid()]},
          cpu: FanoutBench.CpuTime.handle() | nil,
          cpu_from: pos_integer(),
          cpu_overhead: map()
        }

  @doc """
  Fan-out to `n` subscribers of `topic`: `warmup` unrecorded repetitions, then `reps`
  recorded ones. Returns one row per contender.
  """
  @spec fanout(ctx(), binary(), pos_integer(), non_neg_integer(), pos_integer()) :: [map()]
  def fanout(ctx, topic, n, warmup, reps) do
    cpu? = ctx.cpu != nil and n >= ctx.cpu_from
    _ = repeat(ctx, warmup, fn _rep -> topic end, n, cpu?)
    samples = repeat(ctx, reps, fn _rep -> topic end, n, cpu?)

    for contender <- Contenders.all() do
      {callers, e2es, cpus} = unzip3(Map.fetch!(samples, contender))
      e2e = Stats.summarize(e2es)

      %{
        contender: contender,
        n: n,
        reps: reps,
        caller: Stats.summarize(callers),
        e2e: e2e,
        rate: n / (e2e.median / 1.0e9),
        cpu: cpu_per_delivery(cpus, n)
      }
    end
  end

  @doc """
  Many topics of `per_topic` subscribers each: repetition `i` dispatches to topic
  `rem(i, length(topics))`, every contender in turn. Returns one row per contender.
  """
  @spec many_topics(ctx(), tuple(), pos_integer(), non_neg_integer(), pos_integer()) :: [map()]
  def many_topics(ctx, topics, per_topic, warmup, reps) do
    count = tuple_size(topics)
    pick = fn rep -> elem(topics, rem(rep, count)) end
    _ = repeat(ctx, warmup, pick, per_topic, false)
    samples = repeat(ctx, reps, fn rep -> pick.(rep + warmup) end, per_topic, false)

    for contender <- Contenders.all() do
      {callers, e2es, _} = unzip3(Map.fetch!(samples, contender))
      e2e = Stats.summarize(e2es)

      %{
        contender: contender,
        reps: reps,
        caller: Stats.summarize(callers),
        e2e: e2e,
        rate: per_topic / (e2e.median / 1.0e9)
      }
    end
  end

  @doc """
  Burst: one dispatch to every topic back to back, then wait until all
  `tuple_size(topics) * per_topic` deliveries arrived. Caller time is for the whole burst.
  """
  @spec burst(ctx(), tuple(), pos_integer(), pos_integer()) :: [map()]
  def burst(ctx, topics, per_topic, reps) do
    list = Tuple.to_list(topics)
    expected = length(list) * per_topic

    samples =
      Enum.reduce(0..(reps - 1)//1, %{}, fn rep, acc ->
        Enum.reduce(rotate(Contenders.all(), rep), acc, fn contender, acc ->
          sample = burst_round(ctx, contender, list, expected, ctx.cpu != nil)
          Map.update(acc, contender, [sample], &[sample | &1])
        end)
      end)

    for contender <- Contenders.all() do
      {callers, e2es, cpus} = unzip3(Map.fetch!(samples, contender))
      e2e = Stats.summarize(e2es)

      %{
        contender: contender,
        reps: reps,
        dispatches: length(list),
        caller: Stats.summarize(callers),
        e2e: e2e,
        rate: expected / (e2e.median / 1.0e9),
        cpu: cpu_per_delivery(cpus, expected)
      }
    end
  end

  defp unzip3(samples) do
    {Enum.map(samples, &elem(&1, 0)), Enum.map(samples, &elem(&1, 1)),
     Enum.map(samples, &elem(&1, 2))}
  end

  # Median CPU ns per delivery of each thread class and of their sum, plus the median OS
  # run-queue wait per round; nil when CPU time was not sampled.
  defp cpu_per_delivery([nil | _], _deliveries), do: nil
  defp cpu_per_delivery([], _deliveries), do: nil

  defp cpu_per_delivery(cpus, deliveries) do
    classes = CpuTime.classes()

    per_class =
      Map.new(classes, fn class ->
        {class, Stats.summarize(Enum.map(cpus, &(&1[class] / deliveries))).median}
      end)

    total =
      cpus
      |> Enum.map(fn cpu -> Enum.sum(Enum.map(classes, &cpu[&1])) / deliveries end)
      |> Stats.summarize()

    Map.merge(per_class, %{
      total: total.median,
      wait_per_round: Stats.summarize(Enum.map(cpus, & &1.wait)).median
    })
  end

  defp repeat(ctx, reps, topic_for, expected, cpu?) do
    Enum.reduce(0..(reps - 1)//1, %{}, fn rep, acc ->
      topic = topic_for.(rep)

      Enum.reduce(rotate(Contenders.all(), rep), acc, fn contender, acc ->
        sample = round(ctx, contender, topic, expected, cpu?)
        Map.update(acc, contender, [sample], &[sample | &1])
      end)
    end)
  end

  defp rotate(list, by) do
    {front, back} = Enum.split(list, rem(by, length(list)))
    back ++ front
  end

  # CPU snapshots (when asked) are taken outside the timed span.
  defp round(ctx, contender, topic, expected, cpu?) do
    index = Contenders.index(contender)
    message = Map.fetch!(ctx.messages, contender)
    :atomics.put(ctx.counters, index, -expected)
    cpu0 = if cpu?, do: CpuTime.snapshot(ctx.cpu)
    t0 = System.monotonic_time()
    Contenders.dispatch(contender, topic, message, ctx.plain_lists)
    t1 = System.monotonic_time()
    await(ctx, contender, index)
    t2 = System.monotonic_time()
    cpu = if cpu?, do: CpuTime.delta(cpu0, CpuTime.snapshot(ctx.cpu), ctx.cpu_overhead)
    {ns(t1 - t0), ns(t2 - t0), cpu}
  end

  defp burst_round(ctx, contender, topics, expected, cpu?) do
    index = Contenders.index(contender)
    message = Map.fetch!(ctx.messages, contender)
    plain_lists = ctx.plain_lists
    :atomics.put(ctx.counters, index, -expected)
    cpu0 = if cpu?, do: CpuTime.snapshot(ctx.cpu)
    t0 = System.monotonic_time()
    Enum.each(topics, &Contenders.dispatch(contender, &1, message, plain_lists))
    t1 = System.monotonic_time()
    await(ctx, contender, index)
    t2 = System.monotonic_time()
    cpu = if cpu?, do: CpuTime.delta(cpu0, CpuTime.snapshot(ctx.cpu), ctx.cpu_overhead)
    {ns(t1 - t0), ns(t2 - t0), cpu}
  end

  defp await(ctx, contender, index) do
    receive do
      {:fanout_done, ^index} -> :ok
    after
      @round_timeout ->
        missing = -:atomics.get(ctx.counters, index)

        raise "#{Contenders.label(contender)}: #{missing} deliveries missing after #{@round_timeout} ms"
    end
  end

  defp ns(native), do: System.convert_time_unit(native, :native, :nanosecond)
end
