defmodule ExAtlas.Fly.Dispatcher.Backend.PhoenixPubSub do
  @moduledoc false
  # `dispatcher: :phoenix_pubsub`: the host's Phoenix.PubSub server, through its three
  # documented functions only. Phoenix.PubSub is an optional dependency of the host, so
  # it may be absent when this compiles.

  @behaviour ExAtlas.Fly.Dispatcher.Backend

  @compile {:no_warn_undefined, Phoenix.PubSub}

  @doc "True when Phoenix.PubSub is loaded (or loadable)."
  @spec available?() :: boolean()
  def available?, do: Code.ensure_loaded?(Phoenix.PubSub)

  @impl true
  def subscribe(topic, pubsub) do
    :ok = Phoenix.PubSub.subscribe(pubsub, topic)
  end

  @impl true
  def unsubscribe(topic, pubsub) do
    :ok = Phoenix.PubSub.unsubscribe(pubsub, topic)
  end

  @impl true
  def dispatch(topic, message, pubsub) do
    # broadcast/3 returns :ok or {:error, term}; the original contract returns :ok.
    _ = Phoenix.PubSub.broadcast(pubsub, topic, message)
    :ok
  end

  # Phoenix.PubSub's local broadcast sends from the caller before returning, and its
  # subscriber list is not part of the contract we use.
  @impl true
  def sync(_pubsub), do: :ok

  @impl true
  def count(_topic, _pubsub), do: 0

  @impl true
  def subscribers(_topic, _pubsub), do: []

  @impl true
  def stats(_pubsub), do: ExAtlas.Fly.Dispatcher.Backend.zero_stats()
end
