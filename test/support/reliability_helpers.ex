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
  @spec eventually(String.t(), (() -> term()), non_neg_integer()) :: term()
  def eventually(what, fun, timeout \\ 10_000) do
    deadline = System.monotonic_time(:millisecond) + timeout
    poll(what, fun, deadline)
  end

  defp poll(what, fun, deadline) do
    cond do
      result = fun.() ->
        result

      System.monotonic_time(:millisecond) > deadline ->
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
      "registry empty (subscriptions, subscribers and monitors 0)",
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
end
