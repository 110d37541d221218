defmodule ExAtlas.Test.Reliability do
  @moduledoc """
  Helpers shared by the reliability suite (`test/ex_atlas/fly/dispatcher/reliability`):
  NIF statistics, process and OS memory figures, and polling for effects that happen
  after a signal is handled.
  """

  alias ExAtlas.Fly.Dispatcher.Backend.Registry, as: RegistryBackend

  @doc "The running registry's NIF statistics as a map."
  @spec stats() :: %{atom() => non_neg_integer()}
  def stats, do: RegistryBackend.stats()

  @doc """
  Calls `fun` until it returns a truthy value and returns that value; flunks with
  `what` after `timeout` ms. Only a guard against effects that never happen.
  """
  @spec eventually(String.t() | (() -> String.t()), (() -> term()), non_neg_integer()) :: term()
  def eventually(what, fun, timeout \\ 10_000) do
    deadline = System.monotonic_time(:millisecond) + timeout
    poll(what, fun, deadline)
  end

  defp poll(what, fun, deadline) do
    cond do
      result = fun.() ->
        result

      System.monotonic_time(:millisecond) > deadline ->
        what = if is_function(what, 0), do: what.(), else: what
        ExUnit.Assertions.flunk("still not true after the timeout: #{what}")

      true ->
        Process.sleep(5)
        poll(what, fun, deadline)
    end
  end

  @doc "Waits until the registry holds no subscription, subscriber or monitor."
  @spec await_empty_registry(non_neg_integer()) :: %{atom() => non_neg_integer()}
  def await_empty_registry(timeout \\ 30_000) do
    eventually(
      fn ->
        # What is left, so that a failure says what leaked.
        left = Map.take(stats(), [:subscriptions, :subscribers, :monitors, :topics])
        "registry empty (subscriptions, subscribers and monitors 0); left: #{inspect(left)}"
      end,
      fn ->
        stats = stats()
        stats.subscriptions == 0 and stats.subscribers == 0 and stats.monitors == 0 and stats
      end,
      timeout
    )
  end

  @doc "A field of `/proc/self/status` in kB (`\"VmRSS\"`, `\"VmHWM\"`), or nil."
  @spec proc_status_kb(String.t()) :: non_neg_integer() | nil
  def proc_status_kb(field) do
    with {:ok, status} <- File.read("/proc/self/status"),
         [_, kb] <- Regex.run(~r/^#{field}:\s+(\d+) kB$/m, status) do
      String.to_integer(kb)
    else
      _ -> nil
    end
  end

  @doc "Resident set size of this OS process in kB (Linux), or nil."
  @spec rss_kb() :: non_neg_integer() | nil
  def rss_kb, do: proc_status_kb("VmRSS")

  @doc "Garbage-collects every process, so `:erlang.memory/1` shows live data only."
  @spec collect_garbage() :: :ok
  def collect_garbage do
    for pid <- Process.list(), do: :erlang.garbage_collect(pid)
    :ok
  end

  @doc "Starts `count` linked processes running `fun` and waits until all called `ready`."
  @spec spawn_ready(pos_integer(), ((() -> :ok) -> term())) :: [pid()]
  def spawn_ready(count, fun) do
    parent = self()
    ref = make_ref()

    pids =
      for _ <- 1..count do
        spawn_link(fn -> fun.(fn -> send(parent, {ref, :ready}) && :ok end) end)
      end

    for _ <- pids do
      receive do
        {^ref, :ready} -> :ok
      after
        60_000 -> ExUnit.Assertions.flunk("a spawned process never became ready")
      end
    end

    pids
  end

  @doc "Unlinks and kills `pids`, and waits until each is dead."
  @spec kill_all([pid()]) :: :ok
  def kill_all(pids) do
    refs = for pid <- pids, do: {pid, Process.monitor(pid)}
    for pid <- pids, do: Process.unlink(pid)
    for pid <- pids, do: Process.exit(pid, :kill)

    for {pid, ref} <- refs do
      receive do
        {:DOWN, ^ref, :process, ^pid, _} -> :ok
      after
        60_000 -> ExUnit.Assertions.flunk("#{inspect(pid)} did not die")
      end
    end

    :ok
  end

  @doc """
  Runs `fun` with `pids` traced (`:running`) and returns `{result, slices}`: how long (us
  of CPU time) they ran each time they were scheduled in meanwhile.

  The time stamps are the scheduler thread's CPU time (`cpu_timestamp`, a VM-wide trace
  flag, on only meanwhile): a slice is the time the process held its scheduler, not the
  wall-clock time during which the OS may also have run other programs on that core
  (on a shared machine, most of a wall-clock slice can be that).
  """
  @spec running_slices([pid()], (() -> result)) :: {result, [non_neg_integer()]}
        when result: var
  def running_slices(pids, fun) do
    _ = :erlang.trace(:all, true, [:cpu_timestamp])
    for pid <- pids, do: 1 = :erlang.trace(pid, true, [:running, :timestamp])

    result =
      try do
        fun.()
      after
        for pid <- pids, do: :erlang.trace(pid, false, [:running, :timestamp])
        _ = :erlang.trace(:all, false, [:cpu_timestamp])
      end

    # Every trace message of theirs sent so far is in the mailbox once this arrives.
    for pid <- pids do
      ref = :erlang.trace_delivered(pid)
      receive do: ({:trace_delivered, ^pid, ^ref} -> :ok)
    end

    events = take_running(pids, [])

    slices =
      Enum.flat_map(pids, fn pid ->
        events
        |> Enum.filter(&(elem(&1, 0) == pid))
        |> Enum.chunk_every(2, 1, :discard)
        |> Enum.flat_map(fn
          [{_, :in, t_in}, {_, :out, t_out}] -> [micros(t_out) - micros(t_in)]
          _ -> []
        end)
      end)

    {result, slices}
  end

  defp micros({mega, seconds, micro}), do: (mega * 1_000_000 + seconds) * 1_000_000 + micro

  defp take_running(pids, acc) do
    receive do
      {:trace_ts, pid, in_out, _mfa, ts} when in_out in [:in, :out] ->
        if pid in pids,
          do: take_running(pids, [{pid, in_out, ts} | acc]),
          else: take_running(pids, acc)
    after
      0 -> Enum.reverse(acc)
    end
  end

  @doc """
  The slices (us) of `loops` plain send loops running side by side, which send `message`
  to `pids` (each loop to its share of them), `times` times over: what processes doing
  that work get from the VM and the OS in this run. Compared with as many senders
  (`loops`: the lanes), the loops compete for the schedulers as the senders do.
  """
  @spec send_loop_slices([pid()], term(), pos_integer(), pos_integer()) :: [non_neg_integer()]
  def send_loop_slices(pids, message, times, loops \\ 1) do
    parent = self()
    shares = Enum.chunk_every(pids, div(length(pids) + loops - 1, loops))

    spawned =
      for share <- shares do
        spawn_link(fn ->
          receive do: (:go -> :ok)
          for _ <- 1..times, pid <- share, do: send(pid, message)
          send(parent, {:looped, self()})
          receive do: (:stop -> :ok)
        end)
      end

    {:ok, slices} =
      running_slices(spawned, fn ->
        for loop <- spawned, do: send(loop, :go)

        for loop <- spawned do
          receive do
            {:looped, ^loop} -> :ok
          after
            300_000 -> ExUnit.Assertions.flunk("a send loop did not finish")
          end
        end

        :ok
      end)

    for loop <- spawned, do: send(loop, :stop)
    slices
  end

  @doc """
  The time-weighted median of `slices`: half of the running time was spent in slices at
  least this long. A few long slices of OS noise do not move it; calls that are all
  too long do.
  """
  @spec weighted_median([non_neg_integer()]) :: non_neg_integer()
  def weighted_median([]), do: 0

  def weighted_median(slices) do
    half = Enum.sum(slices) / 2

    slices
    |> Enum.sort()
    |> Enum.reduce_while(0, fn slice, sum ->
      if sum + slice >= half, do: {:halt, {:median, slice}}, else: {:cont, sum + slice}
    end)
    |> then(fn {:median, slice} -> slice end)
  end

  @doc """
  The senders deliver `count` dispatches of `message` to `topic`, whose subscribers are
  `subscribers`; then as many plain send loops as there are senders send it to the same
  subscribers as often. Returns the time-weighted median slice (us of CPU time) of each,
  `%{senders: _, loop: _}`.
  """
  @spec senders_and_loops(binary(), [pid()], term(), pos_integer()) :: %{
          senders: non_neg_integer(),
          loop: non_neg_integer()
        }
  def senders_and_loops(topic, subscribers, message, count) do
    :ok = ExAtlas.Fly.Dispatcher.sync()
    senders = ExAtlas.Fly.Dispatcher.Server.senders()

    {:ok, by_senders} =
      running_slices(senders, fn ->
        for _ <- 1..count, do: :ok = ExAtlas.Fly.Dispatcher.dispatch(topic, message)
        ExAtlas.Fly.Dispatcher.sync()
      end)

    by_loop = send_loop_slices(subscribers, message, count, length(senders))
    %{senders: weighted_median(by_senders), loop: weighted_median(by_loop)}
  end

  @doc """
  Calls `measure` (a `senders_and_loops/4`) until the senders' median is at most `factor`
  times the loops'; flunks, with every attempt's figures, after `attempts` attempts over
  it. Returns `{attempt, medians}`.
  """
  @spec within_loops((() -> map()), pos_integer(), pos_integer()) :: {pos_integer(), map()}
  def within_loops(measure, factor, attempts, failures \\ []) do
    medians = measure.()
    attempt = length(failures) + 1

    cond do
      medians.senders <= factor * medians.loop ->
        {attempt, medians}

      attempt < attempts ->
        within_loops(measure, factor, attempts, [medians | failures])

      true ->
        ExUnit.Assertions.flunk(
          "the senders' slices were longer than #{factor} x plain send loops' doing the " <>
            "same work (time-weighted medians, us) in every attempt: " <>
            inspect(Enum.reverse([medians | failures]))
        )
    end
  end

  @doc "`count` Fly log entries, about 400 bytes each."
  @spec log_entries(pos_integer()) :: [map()]
  def log_entries(count) do
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
end
