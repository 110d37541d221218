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
end
