defmodule ExAtlas.Test.SlowSubscribers do
  @moduledoc """
  Helpers for the tests of slow subscribers (`on_slow: :skip` and `:catch_up`): idle
  subscribers that make a topic big enough for the lanes, numbered dispatches, and a
  mailbox filled past the threshold while the watchdog cannot poll, so that its next poll
  sees exactly that mailbox.
  """

  import ExAtlas.Test.FlyEnv, only: [eventually: 1]
  import ExUnit.Assertions

  alias ExAtlas.Fly.Dispatcher
  alias ExAtlas.Fly.Dispatcher.Watchdog

  @doc """
  `count` linked subscribers of `topic` that take and drop everything: with more than 16
  subscriptions, a topic's dispatches go through the lanes' senders.
  """
  @spec idle_subscribers(binary(), non_neg_integer()) :: [pid()]
  def idle_subscribers(topic, count) do
    parent = self()

    for _ <- 1..count//1 do
      pid =
        spawn_link(fn ->
          :ok = Dispatcher.subscribe(topic)
          send(parent, {:idle, self()})
          idle()
        end)

      assert_receive {:idle, ^pid}
      pid
    end
  end

  defp idle do
    receive do
      _ -> idle()
    end
  end

  @doc "Dispatches `{:n, n}` for each `n` of `range`, then syncs."
  @spec dispatch_range(binary(), Enumerable.t()) :: :ok
  def dispatch_range(topic, range) do
    for n <- range, do: :ok = Dispatcher.dispatch(topic, {:n, n})
    :ok = Dispatcher.sync()
  end

  @doc """
  Fills `pid`'s mailbox with `range` while the watchdog cannot poll, then lets it poll
  and waits until its watch of `pid` on `topic` is skipping (`:skip`: skipped;
  `:catch_up`: parked).
  """
  @spec fill_until_skipping(pid(), binary(), Enumerable.t()) :: true
  def fill_until_skipping(pid, topic, range) do
    dog = Process.whereis(Watchdog)
    :ok = :sys.suspend(dog)
    dispatch_range(topic, range)
    :ok = :sys.resume(dog)
    eventually(fn -> Watchdog.watch_info(pid, topic).skipping end)
  end
end
