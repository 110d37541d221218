defmodule ExAtlas.Test.Commanded do
  @moduledoc """
  A subscriber that only runs the test's commands, so that its mailbox grows while it
  waits: for tests of slow subscribers (the watchdog's eviction, `on_slow: :skip`).

      pid = spawn_commanded(fn -> :ok = Dispatcher.subscribe_with_backpressure(t, opts) end)
      messages = run_in(pid, fn -> drain() end)
      send(pid, :stop)
  """

  import ExUnit.Assertions

  @doc """
  Spawns a process that runs `setup` (its subscriptions), reports `{:watching, pid}` to
  the caller, then runs `command_loop/1`; returns its pid once it reported.
  """
  @spec spawn_commanded((() -> any())) :: pid()
  def spawn_commanded(setup) do
    parent = self()

    pid =
      spawn(fn ->
        setup.()
        send(parent, {:watching, self()})
        command_loop(parent)
      end)

    assert_receive {:watching, ^pid}, 5_000
    pid
  end

  @doc """
  Runs each `{:run, fun}` sent to this process and answers `{:ran, self(), result}` to
  `parent`; returns on `:stop`. Everything else stays in the mailbox.
  """
  @spec command_loop(pid()) :: :ok
  def command_loop(parent) do
    receive do
      {:run, fun} ->
        send(parent, {:ran, self(), fun.()})
        command_loop(parent)

      :stop ->
        :ok
    end
  end

  @doc """
  Runs `fun` inside `pid` (after everything already in its mailbox, in a selective
  receive) and returns the result.
  """
  @spec run_in(pid(), (() -> result)) :: result when result: term()
  def run_in(pid, fun) do
    send(pid, {:run, fun})
    assert_receive {:ran, ^pid, result}, 10_000
    result
  end
end
