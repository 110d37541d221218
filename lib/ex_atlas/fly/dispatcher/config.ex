defmodule ExAtlas.Fly.Dispatcher.Config do
  @moduledoc false
  # Reads `config :ex_atlas, :fly, ...` on every call (hosts may change it at runtime, as
  # with the original) and turns the `:dispatcher` value into a backend and its argument.

  require Logger

  alias ExAtlas.Fly.Dispatcher.{Backend, Warnings}

  import Bitwise, only: [<<<: 2]

  @default_queue_capacity 1_024
  @default_replay_memory 64 * 1024 * 1024
  @default_cluster_queue 10_000
  # Picked from bench/fanout.exs: see the `delivery:` notes in ExAtlas.Fly.Dispatcher.
  @default_delivery :scheduler

  @type mode :: :registry | :phoenix_pubsub | {:mfa, {module(), atom(), list()}}

  @spec fly() :: keyword()
  def fly do
    case :application.get_env(:ex_atlas, :fly) do
      {:ok, config} when is_list(config) ->
        config

      :undefined ->
        []

      {:ok, other} ->
        raise ArgumentError,
              "expected `config :ex_atlas, :fly` to be a keyword list, got: #{inspect(other)}"
    end
  end

  @doc "The configured mode, validated."
  @spec mode() :: mode()
  def mode, do: mode(fly())

  defp mode(config) do
    case :lists.keyfind(:dispatcher, 1, config) do
      false ->
        :registry

      {_, :registry} ->
        :registry

      {_, :phoenix_pubsub} ->
        :phoenix_pubsub

      {_, {:mfa, {mod, fun, extra}} = mode}
      when is_atom(mod) and is_atom(fun) and is_list(extra) ->
        mode

      {_, other} ->
        raise ArgumentError,
              "unknown ExAtlas.Fly.Dispatcher mode #{inspect(other)} in " <>
                "`config :ex_atlas, :fly, dispatcher: ...`; expected :registry, " <>
                ":phoenix_pubsub or {:mfa, {module, function, extra_args}}"
    end
  end

  @doc """
  The backend module and its argument for the configured mode. `:phoenix_pubsub` falls
  back to the registry when `Phoenix.PubSub` is not loaded or `:pubsub` is unset, as the
  original did. Runs on every call of the public API (one read of the application
  environment), so it is kept to the bare minimum.
  """
  @spec backend() :: {module(), term()}
  def backend do
    config = fly()

    case mode(config) do
      :registry ->
        {Backend.Registry, nil}

      :phoenix_pubsub ->
        pubsub = Keyword.get(config, :pubsub)

        cond do
          pubsub == nil ->
            warn_pubsub_fallback(pubsub, "`config :ex_atlas, :fly, pubsub: ...` is unset")

          not Backend.PhoenixPubSub.available?() ->
            warn_pubsub_fallback(pubsub, "Phoenix.PubSub is not loaded")

          true ->
            {Backend.PhoenixPubSub, pubsub}
        end

      {:mfa, mfa} ->
        {Backend.MFA, mfa}
    end
  end

  # The fallback the original made silently: said once per application start.
  defp warn_pubsub_fallback(pubsub, why) do
    Warnings.once({:pubsub_fallback, pubsub}, fn ->
      Logger.warning(
        "[ExAtlas.Fly.Dispatcher] dispatcher: :phoenix_pubsub, but #{why}: using the " <>
          ":registry mode instead (said once per start of the :ex_atlas application)"
      )
    end)

    {Backend.Registry, nil}
  end

  # The keys this dispatcher reads, and those the rest of the ExAtlas SDK reads from the
  # same `config :ex_atlas, :fly` (its token storage, log streamer and Fly.io client):
  # accepted without a word, since hosts share the one configuration.
  @dispatcher_keys [
    :dispatcher,
    :pubsub,
    :enabled,
    :lanes,
    :sender_threads,
    :queue_capacity,
    :delivery,
    :cluster,
    :cluster_queue,
    :replay,
    :replay_memory
  ]
  @sdk_keys [
    :api_key,
    :token_storage,
    :storage_path,
    :log_endpoint,
    :poll_interval_ms,
    :fly_config_file_enabled,
    :cli_timeout_ms
  ]

  @doc "The keys of `config :ex_atlas, :fly` that are read (by us or by the ExAtlas SDK)."
  @spec known_keys() :: [atom()]
  def known_keys, do: @dispatcher_keys ++ @sdk_keys

  @doc """
  Logs a warning naming each key of `config :ex_atlas, :fly` that nothing reads (a typo
  such as `replay_memmory:`), and the known keys. Called when the application starts.
  Raising would break hosts whose configuration carries keys of a newer SDK.
  """
  @spec warn_unknown_keys() :: :ok
  def warn_unknown_keys do
    case for({key, _} <- fly(), key not in @dispatcher_keys and key not in @sdk_keys, do: key) do
      [] ->
        :ok

      unknown ->
        Logger.warning(
          "[ExAtlas.Fly.Dispatcher] unknown key(s) in `config :ex_atlas, :fly`: " <>
            "#{Enum.map_join(Enum.uniq(unknown), ", ", &inspect/1)}; ignored. The dispatcher " <>
            "reads #{Enum.map_join(@dispatcher_keys, ", ", &inspect/1)}; the ExAtlas SDK " <>
            "reads #{Enum.map_join(@sdk_keys, ", ", &inspect/1)}"
        )
    end
  end

  @doc "Whether the `:ex_atlas` application should start the registry."
  @spec start_registry?() :: boolean()
  def start_registry? do
    Keyword.get(fly(), :enabled, true) != false and registry_mode?()
  end

  @doc "True when calls resolve to the NIF registry."
  @spec registry_mode?() :: boolean()
  def registry_mode?, do: match?({Backend.Registry, _}, backend())

  @doc """
  Fan-out lanes (one sender process each): the `:lanes` of `opts` (child_spec options),
  else of `config :ex_atlas, :fly`, else schedulers online. `:sender_threads`, the old
  name of the key, is still read, with a deprecation warning; `:lanes` wins when both
  are set. Called once per registry start.
  """
  @spec lanes(keyword()) :: pos_integer()
  def lanes(opts \\ []) do
    with nil <-
           lanes_in(opts, ":lanes", ":sender_threads", "ExAtlas.Fly.Dispatcher child_spec option"),
         nil <-
           lanes_in(
             fly(),
             "`config :ex_atlas, :fly, lanes: ...`",
             "`config :ex_atlas, :fly, sender_threads: ...`",
             "`config :ex_atlas, :fly` key"
           ) do
      :erlang.system_info(:schedulers_online)
    end
  end

  defp lanes_in(keyword, lanes_where, old_where, kind) do
    case {Keyword.fetch(keyword, :lanes), Keyword.fetch(keyword, :sender_threads)} do
      {:error, :error} ->
        nil

      {{:ok, lanes}, :error} ->
        check_lanes!(lanes, lanes_where)

      {:error, {:ok, old}} ->
        old = check_lanes!(old, old_where)

        Logger.warning(
          "[ExAtlas.Fly.Dispatcher] the #{kind} :sender_threads is deprecated: " <>
            "use :lanes (the same setting: fan-out lanes, one sender process each)",
          sender_threads: old
        )

        old

      {{:ok, lanes}, {:ok, old}} ->
        lanes = check_lanes!(lanes, lanes_where)
        old = check_lanes!(old, old_where)

        Logger.warning(
          "[ExAtlas.Fly.Dispatcher] the #{kind} :sender_threads is deprecated and " <>
            "ignored: :lanes is set too, and wins (lanes: #{lanes}, " <>
            "sender_threads: #{old}); remove :sender_threads",
          lanes: lanes,
          sender_threads: old
        )

        lanes
    end
  end

  @doc "Dispatches each lane holds in flight before a dispatcher waits for room."
  @spec queue_capacity() :: pos_integer()
  def queue_capacity do
    fly()
    |> Keyword.get(:queue_capacity, @default_queue_capacity)
    |> check_queue_capacity!("`config :ex_atlas, :fly, queue_capacity: ...`")
  end

  @doc "How sender processes deliver: `:dirty` or `:scheduler` (see the Sender module)."
  @spec delivery() :: :dirty | :scheduler
  def delivery do
    fly()
    |> Keyword.get(:delivery, @default_delivery)
    |> check_delivery!("`config :ex_atlas, :fly, delivery: ...`")
  end

  @doc "Dispatches kept per topic for replay (`:replay`, default 0: none)."
  @spec replay(keyword()) :: non_neg_integer()
  def replay(opts \\ []) do
    case Keyword.fetch(opts, :replay) do
      {:ok, value} ->
        check_replay!(value, ":replay")

      :error ->
        fly() |> Keyword.get(:replay, 0) |> check_replay!("`config :ex_atlas, :fly, replay: ...`")
    end
  end

  @doc "Bytes of kept dispatches over all topics at most (`:replay_memory`, default 64 MiB)."
  @spec replay_memory(keyword()) :: pos_integer()
  def replay_memory(opts \\ []) do
    case Keyword.fetch(opts, :replay_memory) do
      {:ok, value} ->
        check_replay_memory!(value, ":replay_memory")

      :error ->
        fly()
        |> Keyword.get(:replay_memory, @default_replay_memory)
        |> check_replay_memory!("`config :ex_atlas, :fly, replay_memory: ...`")
    end
  end

  @doc false
  @spec check_replay!(term(), String.t()) :: non_neg_integer()
  def check_replay!(value, _where) when is_integer(value) and value in 0..1_000_000, do: value
  def check_replay!(value, where), do: bad!(where, "an integer from 0 to 1000000", value)

  @doc false
  @spec check_replay_memory!(term(), String.t()) :: pos_integer()
  def check_replay_memory!(value, _where) when is_integer(value) and value in 1..(1 <<< 48),
    do: value

  def check_replay_memory!(value, where),
    do: bad!(where, "an integer from 1 to #{1 <<< 48} (bytes)", value)

  @doc "Cluster mode (`:cluster`, default false): forward to other nodes over `:pg`."
  @spec cluster?() :: boolean()
  def cluster? do
    fly()
    |> Keyword.get(:cluster, false)
    |> check_cluster!("`config :ex_atlas, :fly, cluster: ...`")
  end

  @doc "Messages each remote node may have queued before dispatches to it are dropped."
  @spec cluster_queue() :: pos_integer()
  def cluster_queue do
    fly()
    |> Keyword.get(:cluster_queue, @default_cluster_queue)
    |> check_cluster_queue!("`config :ex_atlas, :fly, cluster_queue: ...`")
  end

  @doc false
  @spec check_cluster!(term(), String.t()) :: boolean()
  def check_cluster!(value, _where) when is_boolean(value), do: value
  def check_cluster!(value, where), do: bad!(where, "true or false", value)

  @doc false
  @spec check_cluster_queue!(term(), String.t()) :: pos_integer()
  def check_cluster_queue!(value, _where) when is_integer(value) and value in 1..10_000_000,
    do: value

  def check_cluster_queue!(value, where),
    do: bad!(where, "an integer from 1 to 10000000", value)

  @doc false
  @spec check_lanes!(term(), String.t()) :: pos_integer()
  def check_lanes!(value, _where) when is_integer(value) and value in 1..1_024,
    do: value

  def check_lanes!(value, where),
    do: bad!(where, "an integer from 1 to 1024", value)

  @doc false
  @spec check_queue_capacity!(term(), String.t()) :: pos_integer()
  def check_queue_capacity!(value, _where) when is_integer(value) and value in 1..1_000_000,
    do: value

  def check_queue_capacity!(value, where),
    do: bad!(where, "an integer from 1 to 1000000", value)

  @doc false
  @spec check_delivery!(term(), String.t()) :: :dirty | :scheduler
  def check_delivery!(value, _where) when value in [:dirty, :scheduler], do: value
  def check_delivery!(value, where), do: bad!(where, ":dirty or :scheduler", value)

  @spec bad!(String.t(), String.t(), term()) :: no_return()
  defp bad!(where, expected, value) do
    raise ArgumentError, "expected #{where} to be #{expected}, got: #{inspect(value)}"
  end
end
