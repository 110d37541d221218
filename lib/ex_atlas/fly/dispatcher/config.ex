defmodule ExAtlas.Fly.Dispatcher.Config do
  @moduledoc false
  # Reads `config :ex_atlas, :fly, ...` on every call (hosts may change it at runtime, as
  # with the original) and turns the `:dispatcher` value into a backend and its argument.

  alias ExAtlas.Fly.Dispatcher.Backend

  @default_queue_capacity 1_024

  @type mode :: :registry | :phoenix_pubsub | {:mfa, {module(), atom(), list()}}

  @spec fly() :: keyword()
  def fly do
    case Application.get_env(:ex_atlas, :fly, []) do
      config when is_list(config) ->
        config

      other ->
        raise ArgumentError,
              "expected `config :ex_atlas, :fly` to be a keyword list, got: #{inspect(other)}"
    end
  end

  @doc "The configured mode, validated."
  @spec mode() :: mode()
  def mode do
    case Keyword.get(fly(), :dispatcher, :registry) do
      :registry ->
        :registry

      :phoenix_pubsub ->
        :phoenix_pubsub

      {:mfa, {mod, fun, extra}} = mode when is_atom(mod) and is_atom(fun) and is_list(extra) ->
        mode

      other ->
        raise ArgumentError,
              "unknown ExAtlas.Fly.Dispatcher mode #{inspect(other)} in " <>
                "`config :ex_atlas, :fly, dispatcher: ...`; expected :registry, " <>
                ":phoenix_pubsub or {:mfa, {module, function, extra_args}}"
    end
  end

  @doc """
  The backend module and its argument for the configured mode. `:phoenix_pubsub` falls
  back to the registry when `Phoenix.PubSub` is not loaded or `:pubsub` is unset, as the
  original did.
  """
  @spec backend() :: {module(), term()}
  def backend do
    case mode() do
      :registry ->
        {Backend.Registry, nil}

      :phoenix_pubsub ->
        pubsub = Keyword.get(fly(), :pubsub)

        if pubsub != nil and Backend.PhoenixPubSub.available?() do
          {Backend.PhoenixPubSub, pubsub}
        else
          {Backend.Registry, nil}
        end

      {:mfa, mfa} ->
        {Backend.MFA, mfa}
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

  @doc "Sender threads: `:sender_threads` or the number of online schedulers."
  @spec sender_threads() :: pos_integer()
  def sender_threads do
    positive!(:sender_threads, Keyword.get(fly(), :sender_threads, default_threads()))
  end

  @doc "Jobs each sender queue holds before a dispatcher waits for room."
  @spec queue_capacity() :: pos_integer()
  def queue_capacity do
    positive!(:queue_capacity, Keyword.get(fly(), :queue_capacity, @default_queue_capacity))
  end

  defp default_threads, do: :erlang.system_info(:schedulers_online)

  defp positive!(_key, value) when is_integer(value) and value > 0 and value <= 1_024, do: value

  defp positive!(key, value) do
    raise ArgumentError,
          "expected `config :ex_atlas, :fly, #{key}: ...` to be an integer from 1 to 1024, " <>
            "got: #{inspect(value)}"
  end
end
