defmodule ExAtlas.Test.PubSubStandIn do
  @moduledoc """
  A stand-in for the part of Phoenix.PubSub that the `:phoenix_pubsub` mode uses, built on
  Elixir's `Registry` with duplicate keys, as Phoenix.PubSub's local layer is.

  Phoenix.PubSub cannot be installed here (no hex), so tests define a module named
  `Phoenix.PubSub` at runtime that delegates to this one (see
  `ExAtlas.Test.FlyEnv.define_phoenix_pubsub!/0`). The three functions follow Phoenix.PubSub's
  documented contract:

    * `subscribe(pubsub, topic, opts \\\\ [])` subscribes the caller; returns `:ok`;
    * `unsubscribe(pubsub, topic)` removes the caller's subscriptions; returns `:ok`;
    * `broadcast(pubsub, topic, message, dispatcher \\\\ Phoenix.PubSub)` sends `message` to
      every subscriber of `topic`, the caller included; returns `:ok`.

  Each call is also reported to the process registered under `:pubsub_stand_in_calls`,
  when there is one, so tests can see which functions were used.
  """

  @doc "Starts a stand-in server registered as `name`."
  @spec start_link(keyword()) :: {:ok, pid()} | {:error, term()}
  def start_link(opts) do
    name = Keyword.fetch!(opts, :name)
    Registry.start_link(keys: :duplicate, name: name)
  end

  @doc "A child specification, like `{Phoenix.PubSub, name: MyApp.PubSub}`."
  @spec child_spec(keyword()) :: Supervisor.child_spec()
  def child_spec(opts) do
    %{id: Keyword.fetch!(opts, :name), start: {__MODULE__, :start_link, [opts]}}
  end

  @doc "Subscribes the caller to `topic` on `pubsub`."
  @spec subscribe(atom(), binary(), keyword()) :: :ok | {:error, term()}
  def subscribe(pubsub, topic, opts \\ []) when is_atom(pubsub) and is_binary(topic) do
    report({:subscribe, pubsub, topic})

    case Registry.register(pubsub, topic, Keyword.get(opts, :metadata)) do
      {:ok, _owner} -> :ok
      {:error, reason} -> {:error, reason}
    end
  end

  @doc "Removes every subscription of the caller to `topic` on `pubsub`."
  @spec unsubscribe(atom(), binary()) :: :ok
  def unsubscribe(pubsub, topic) when is_atom(pubsub) and is_binary(topic) do
    report({:unsubscribe, pubsub, topic})
    Registry.unregister(pubsub, topic)
  end

  @doc "Sends `message` to every subscriber of `topic` on `pubsub`."
  @spec broadcast(atom(), binary(), term(), module()) :: :ok | {:error, term()}
  def broadcast(pubsub, topic, message, _dispatcher \\ Phoenix.PubSub)
      when is_atom(pubsub) and is_binary(topic) do
    report({:broadcast, pubsub, topic, message})

    Registry.dispatch(pubsub, topic, fn entries ->
      for {pid, _metadata} <- entries, do: send(pid, message)
    end)
  end

  defp report(call) do
    case Process.whereis(:pubsub_stand_in_calls) do
      nil -> :ok
      pid -> send(pid, {:pubsub_stand_in, call})
    end

    :ok
  end
end
