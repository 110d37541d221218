defmodule ExAtlas.Fly.Dispatcher.Backend do
  @moduledoc false
  # What every dispatch mode implements. `ExAtlas.Fly.Dispatcher` checks the arguments,
  # resolves the mode to a module and its argument (`ExAtlas.Fly.Dispatcher.Config`),
  # and delegates here. Topics are binaries by the time a backend sees them.

  @type arg :: term()

  @callback subscribe(topic :: binary(), arg()) :: :ok
  @callback unsubscribe(topic :: binary(), arg()) :: :ok
  @callback dispatch(topic :: binary(), message :: term(), arg()) :: :ok
  @doc "Returns once the caller's earlier dispatches are in the subscribers' mailboxes."
  @callback sync(arg()) :: :ok
  @callback count(topic :: binary(), arg()) :: non_neg_integer()
  @callback subscribers(topic :: binary(), arg()) :: [pid()]
  @doc "The figures of `ExAtlas.Fly.Dispatcher.stats/0`."
  @callback stats(arg()) :: ExAtlas.Fly.Dispatcher.stats()

  @doc "`stats/1` of a mode that keeps no subscribers and no lanes: every figure zero."
  @spec zero_stats() :: ExAtlas.Fly.Dispatcher.stats()
  def zero_stats do
    %{
      subscriptions: 0,
      topics: 0,
      subscribers: 0,
      lanes: 0,
      queue_capacity: 0,
      in_flight: 0,
      peak_in_flight: 0,
      delivered_batches: 0,
      dispatches: 0,
      deliveries: 0,
      waiting: 0,
      lost_batches: 0,
      lost_deliveries: 0,
      replay_messages: 0,
      replay_bytes: 0,
      replay_cuts: 0,
      replay_missed: 0,
      skipping: 0,
      skipped: 0,
      cluster: %{}
    }
  end
end
