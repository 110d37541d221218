defmodule FanoutBench.Contenders do
  @moduledoc false
  # The four ways to fan one message out to the local subscribers of a topic, and the
  # subscription side of each. Each contender has a 1-based index: its `:atomics` slot and
  # the digit of its message tag.

  @registry FanoutBench.Registry
  @scope FanoutBench.PG

  @contenders [:nif, :registry, :pg, :plain]

  @doc "Contenders in their fixed order."
  @spec all() :: [atom()]
  def all, do: @contenders

  @doc "The `:atomics` slot and tag digit of a contender."
  @spec index(atom()) :: 1..4
  def index(:nif), do: 1
  def index(:registry), do: 2
  def index(:pg), do: 3
  def index(:plain), do: 4

  @doc "Human name of a contender."
  @spec label(atom()) :: String.t()
  def label(:nif), do: "ExAtlas NIF"
  def label(:registry), do: "Registry.dispatch"
  def label(:pg), do: ":pg + send loop"
  def label(:plain), do: "plain send loop"

  @doc """
  The benchmark message of a contender: `{:ex_atlas_fly_logs, app, entries}` where `app`
  is "app1".."app4" (same size for all, so every contender copies the same bytes).
  """
  @spec message(atom(), list()) :: tuple()
  def message(contender, entries) do
    {:ex_atlas_fly_logs, "app" <> Integer.to_string(index(contender)), entries}
  end

  @doc "20 small maps, like a batch of Fly log lines."
  @spec entries() :: [map()]
  def entries do
    for i <- 1..20 do
      %{
        "timestamp" => "2025-01-01T12:00:#{String.pad_leading(Integer.to_string(i), 2, "0")}Z",
        "message" => "GET /healthz 200 in #{i}ms",
        "level" => "info",
        "instance" => "e784079b449483",
        "region" => "ams"
      }
    end
  end

  @doc "Starts the `Registry` (as the original: `keys: :duplicate`, default partitions) and the `:pg` scope."
  @spec start_peers() :: :ok
  def start_peers do
    {:ok, _} = Registry.start_link(keys: :duplicate, name: @registry)
    {:ok, _} = :pg.start_link(@scope)
    :ok
  end

  @doc "Registers the calling process under `topics` in the Registry."
  @spec join_registry([binary()]) :: :ok
  def join_registry(topics) do
    Enum.each(topics, fn topic -> {:ok, _} = Registry.register(@registry, topic, nil) end)
  end

  @doc """
  Joins `pids` to the :pg group `topic` in one call. (:pg keeps a group's members as one
  list, so 100 000 single joins would copy it 100 000 times.)
  """
  @spec join_pg(binary(), [pid()]) :: :ok
  def join_pg(topic, pids), do: :pg.join(@scope, topic, pids)

  @doc "Subscribes the calling process to `topics` in the NIF registry."
  @spec join_nif([binary()]) :: :ok
  def join_nif(topics), do: Enum.each(topics, &ExAtlas.Fly.Dispatcher.subscribe/1)

  @doc """
  Sends `message` to every subscriber of `topic` the way `contender` does; `plain_lists`
  maps a topic to its pid list for the plain loop.
  """
  @spec dispatch(atom(), binary(), term(), %{binary() => [pid()]}) :: term()
  def dispatch(:nif, topic, message, _plain_lists) do
    ExAtlas.Fly.Dispatcher.dispatch(topic, message)
  end

  # The original ExAtlas implementation, verbatim in shape.
  def dispatch(:registry, topic, message, _plain_lists) do
    Registry.dispatch(@registry, topic, fn entries ->
      for {pid, _} <- entries, do: send(pid, message)
    end)
  end

  def dispatch(:pg, topic, message, _plain_lists) do
    for pid <- :pg.get_local_members(@scope, topic), do: send(pid, message)
  end

  def dispatch(:plain, topic, message, plain_lists) do
    send_all(Map.fetch!(plain_lists, topic), message)
  end

  defp send_all([pid | rest], message) do
    send(pid, message)
    send_all(rest, message)
  end

  defp send_all([], _message), do: :ok

  @doc "Subscribe/unsubscribe of the churn benchmark: NIF or Registry, for the caller."
  @spec subscribe(:nif | :registry, binary()) :: term()
  def subscribe(:nif, topic), do: ExAtlas.Fly.Dispatcher.subscribe(topic)
  def subscribe(:registry, topic), do: Registry.register(@registry, topic, nil)

  @spec unsubscribe(:nif | :registry, binary()) :: :ok
  def unsubscribe(:nif, topic), do: ExAtlas.Fly.Dispatcher.unsubscribe(topic)
  def unsubscribe(:registry, topic), do: Registry.unregister(@registry, topic)

  @doc "Bytes held by the ETS tables of the Registry (key, pid and meta tables)."
  @spec registry_ets_bytes() :: non_neg_integer()
  def registry_ets_bytes do
    sup = Process.whereis(@registry)
    owners = [sup | for({_, pid, _, _} <- Supervisor.which_children(sup), do: pid)]
    ets_bytes(owners)
  end

  @doc "Bytes held by the ETS table(s) of the :pg scope."
  @spec pg_ets_bytes() :: non_neg_integer()
  def pg_ets_bytes, do: ets_bytes([Process.whereis(@scope)])

  defp ets_bytes(owners) do
    word = :erlang.system_info(:wordsize)

    :ets.all()
    |> Enum.filter(&(:ets.info(&1, :owner) in owners))
    |> Enum.map(&(:ets.info(&1, :memory) * word))
    |> Enum.sum()
  end

  @doc "Bytes the NIF reports as allocated (its Rust heap)."
  @spec nif_bytes() :: non_neg_integer()
  def nif_bytes, do: ExAtlas.Fly.Dispatcher.Backend.Registry.stats().allocated_bytes
end
