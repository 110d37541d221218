defmodule FanoutBench.CpuTime do
  @moduledoc false
  # CPU time of this VM's threads by class, from Linux's /proc/self/task/*/schedstat (ns
  # on CPU, ns waiting in the OS run queue). Wall-clock figures on a shared 2-core machine
  # move with everyone else's load; CPU time per delivery does much less, and the class
  # split (normal schedulers, dirty CPU, dirty I/O, other threads) shows where the work
  # runs. The wait column shows how long runnable VM threads waited for a core: the
  # machine's contention, from other programs or from our own threads.
  #
  # The files stay open (raw, read with pread at offset 0): a snapshot costs about 50 us
  # instead of milliseconds for open/read/close of 40 files. What is left is measured by
  # `overhead/1` and subtracted.

  @classes [:schedulers, :dirty_cpu, :dirty_io, :other]

  @type handle :: [{atom(), :file.io_device()}]
  @type snapshot :: %{atom() => {non_neg_integer(), non_neg_integer()}}

  @doc "Thread classes, in table order."
  @spec classes() :: [atom()]
  def classes, do: @classes

  @doc "Opens the schedstat file of every VM thread; nil when /proc is not there (not Linux)."
  @spec open() :: handle() | nil
  def open do
    with {:ok, tids} <- File.ls("/proc/self/task"),
         [_ | _] = handle <- Enum.flat_map(tids, &open_thread/1) do
      handle
    else
      _ -> nil
    end
  end

  defp open_thread(tid) do
    dir = "/proc/self/task/" <> tid

    with {:ok, comm} <- File.read(dir <> "/comm"),
         {:ok, fd} <- :file.open(dir <> "/schedstat", [:raw, :read, :binary]) do
      [{class(String.trim(comm)), fd}]
    else
      _ -> []
    end
  end

  defp class(comm) do
    cond do
      comm =~ ~r/^\d+_scheduler$/ -> :schedulers
      comm =~ ~r/^\d+_dirty_cpu/ -> :dirty_cpu
      comm =~ ~r/^\d+_dirty_io/ -> :dirty_io
      true -> :other
    end
  end

  @doc "CPU and run-queue wait ns per thread class, summed over the VM's threads."
  @spec snapshot(handle()) :: snapshot()
  def snapshot(handle) do
    Enum.reduce(handle, Map.new(@classes, &{&1, {0, 0}}), fn {class, fd}, acc ->
      case :file.pread(fd, 0, 128) do
        {:ok, stat} ->
          [run, wait | _] = String.split(stat)

          Map.update!(acc, class, fn {r, w} ->
            {r + String.to_integer(run), w + String.to_integer(wait)}
          end)

        # A thread that has ended.
        _ ->
          acc
      end
    end)
  end

  @doc """
  `later - earlier` minus `overhead` (see `overhead/1`): `%{class => cpu_ns, :wait => ns}`.
  """
  @spec delta(snapshot(), snapshot(), map()) :: %{atom() => integer()}
  def delta(earlier, later, overhead \\ %{}) do
    Enum.reduce(@classes, %{wait: 0}, fn class, acc ->
      {r0, w0} = Map.fetch!(earlier, class)
      {r1, w1} = Map.fetch!(later, class)

      acc
      |> Map.put(class, r1 - r0 - Map.get(overhead, class, 0))
      |> Map.update!(:wait, &(&1 + w1 - w0))
    end)
  end

  @doc """
  What taking a pair of snapshots costs (raw file reads run on dirty I/O schedulers):
  the median per class of 25 back-to-back pairs, to subtract from every delta.
  """
  @spec overhead(handle()) :: %{atom() => number()}
  def overhead(handle) do
    deltas = for _ <- 1..25, do: delta(snapshot(handle), snapshot(handle))

    Map.new(@classes, fn class ->
      values = deltas |> Enum.map(&Map.fetch!(&1, class)) |> Enum.sort()
      {class, Enum.at(values, div(length(values), 2))}
    end)
  end
end
