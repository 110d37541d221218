defmodule ExAtlas.Fly.Dispatcher.Server do
  @moduledoc false
  # Owns the life of the NIF dispatcher and runs its sender processes.
  #
  # The dispatcher (registry, lanes, subscriber monitors) is a NIF resource published in
  # :persistent_term, and in the NIF itself for Native.dispatch/2 (Native.publish/1), so
  # callers reach it without a message round trip (a dispatch without even a lookup in
  # Elixir), and so it outlives this process: a server that crashes or is killed is
  # restarted by its supervisor and adopts the published dispatcher, subscriptions and
  # all. Senders are linked to the server; one that exits is replaced at once for its
  # lane. Both are set and cleared together, here only; the :persistent_term copy serves
  # every other call, which reads it without a write to memory another scheduler shares.
  #
  # The dispatcher is closed only when the server is stopped on purpose (:normal,
  # :shutdown, {:shutdown, _}) or when its supervisor is gone, since then nothing would
  # restart a server to adopt it. When the supervisor gives up restarting a crashing
  # server (restart intensity), `ExAtlas.Fly.Dispatcher.Closer`, its first child, closes
  # the dispatcher the dead server left as the supervisor stops. Closing releases every monitor, wakes every waiting
  # producer (its dispatch/2 raises ArgumentError) and sends every subscriber the exit
  # signal `closed_reason/0`, as the links of the original Registry did: a subscriber
  # that does not trap exits stops, and its supervisor starts it again, subscribing anew.
  #
  # What a dead sender had not delivered is counted by the NIF (the resource monitors the
  # senders and reclaims a dead one's batches, giving their credits back); this process
  # logs it and emits the `:lost` telemetry event, checking every second.

  use GenServer

  require Logger

  alias ExAtlas.Fly.Dispatcher.{Config, Native, Sender, Telemetry}

  @key {__MODULE__, :dispatcher}
  # An :atomics of {lost_batches, lost_deliveries} already logged, kept beside the
  # dispatcher so that a restarted server does not log the same loss twice.
  @reported_key {__MODULE__, :reported}
  @closed_reason {:shutdown, :ex_atlas_dispatcher_closed}
  @lost_check_ms 1_000
  # As long as the supervisor gives a server to stop.
  @predecessor_timeout 10_000

  @spec start_link(keyword()) :: GenServer.on_start()
  def start_link(opts) do
    case GenServer.start_link(__MODULE__, opts, name: ExAtlas.Fly.Dispatcher.registry_name()) do
      # Our supervisor is unique by name, so the name is held by the server of a
      # supervisor that was just killed, still closing its registry: wait for it.
      {:error, {:already_started, old}} ->
        ref = Process.monitor(old)

        receive do
          {:DOWN, ^ref, :process, ^old, _} -> start_link(opts)
        after
          @predecessor_timeout -> {:error, {:already_started, old}}
        end

      other ->
        other
    end
  end

  @doc "The published dispatcher, or nil."
  @spec lookup() :: Native.dispatcher() | nil
  def lookup, do: :persistent_term.get(@key, nil)

  @doc "The current sender process of each lane (fewer while one is being replaced)."
  @spec senders() :: [pid()]
  def senders do
    case lookup() do
      nil -> []
      dispatcher -> for sender <- Native.senders(dispatcher), is_pid(sender), do: sender
    end
  end

  @doc "The exit reason every subscriber gets when the registry is closed."
  @spec closed_reason() :: {:shutdown, :ex_atlas_dispatcher_closed}
  def closed_reason, do: @closed_reason

  @doc """
  Closes the published dispatcher, if any, for the `:ex_atlas` application's stop:
  `:orphan` only when no server owns it any more (its supervisor gave up restarting it,
  or was stopped); `:any` whoever owns it, when its own tree did not finish shutting down
  (it is about to be killed).
  """
  @spec close_published(:orphan | :any) :: :ok
  def close_published(owner) when owner in [:orphan, :any] do
    with dispatcher when dispatcher != nil <- lookup(),
         true <- owner == :any or GenServer.whereis(ExAtlas.Fly.Dispatcher.registry_name()) == nil do
      close(dispatcher)
    else
      _ -> :ok
    end
  end

  @impl true
  def init(opts) do
    Process.flag(:trap_exit, true)
    delivery = Keyword.get_lazy(opts, :delivery, &Config.delivery/0)

    dispatcher =
      case lookup() do
        nil -> publish(opts)
        adopted -> adopted
      end

    senders = dispatcher |> Native.senders() |> Enum.map(fn _ -> start_sender(delivery) end)
    :ok = Native.set_senders(dispatcher, senders)
    Process.send_after(self(), :check_lost, @lost_check_ms)

    {:ok,
     %{
       dispatcher: dispatcher,
       delivery: delivery,
       senders: List.to_tuple(senders),
       parent: parent()
     }}
  end

  defp publish(opts) do
    lanes = Config.lanes(opts)
    capacity = Keyword.get_lazy(opts, :queue_capacity, &Config.queue_capacity/0)
    dispatcher = Native.new(lanes, capacity, Config.replay(opts), Config.replay_memory(opts))
    :persistent_term.put(@reported_key, :atomics.new(2, signed: false))
    :persistent_term.put(@key, dispatcher)
    :ok = Native.publish(dispatcher)
    dispatcher
  end

  defp start_sender(delivery) do
    {:ok, pid} = Sender.start_link(delivery)
    pid
  end

  # proc_lib's first ancestor, as a pid: a restarted supervisor registered under the same
  # name must not pass for the one that started us.
  defp parent do
    case Process.get(:"$ancestors") do
      [parent | _] when is_pid(parent) -> parent
      [name | _] when is_atom(name) -> Process.whereis(name)
      _ -> nil
    end
  end

  @impl true
  def handle_info({:EXIT, pid, reason}, state) do
    case lane_of(state.senders, pid) do
      nil ->
        {:noreply, state}

      lane ->
        sender = start_sender(state.delivery)
        senders = put_elem(state.senders, lane, sender)
        :ok = Native.set_senders(state.dispatcher, Tuple.to_list(senders))

        Logger.warning(
          "[ExAtlas.Fly.Dispatcher] the sender of lane #{lane} exited " <>
            "(#{inspect(reason)}); started another, subscriptions are kept",
          lane: lane,
          reason: reason
        )

        # Its monitor in the NIF reclaims its batches about now: log the loss soon.
        Process.send_after(self(), :check_lost, 100)
        {:noreply, %{state | senders: senders}}
    end
  end

  def handle_info(:check_lost, state) do
    report_lost(state.dispatcher)
    Process.send_after(self(), :check_lost, @lost_check_ms)
    {:noreply, state}
  end

  def handle_info(_other, state), do: {:noreply, state}

  @impl true
  def terminate(reason, state) do
    if on_purpose?(reason) or not alive?(state.parent) do
      report_lost(state.dispatcher)
      Enum.each(Tuple.to_list(state.senders), &Process.exit(&1, :shutdown))
      close(state.dispatcher)
    end
  end

  defp on_purpose?(:normal), do: true
  defp on_purpose?(:shutdown), do: true
  defp on_purpose?({:shutdown, _}), do: true
  defp on_purpose?(_crash), do: false

  defp alive?(nil), do: false
  defp alive?(pid), do: Process.alive?(pid)

  defp lane_of(senders, pid) do
    Enum.find(0..(tuple_size(senders) - 1), fn lane -> elem(senders, lane) == pid end)
  end

  defp report_lost(dispatcher) do
    {batches, deliveries} = Native.lost(dispatcher)

    with reported when reported != nil <- :persistent_term.get(@reported_key, nil),
         new when new > 0 <- deliveries - :atomics.get(reported, 2) do
      new_batches = batches - :atomics.get(reported, 1)
      :atomics.put(reported, 1, batches)
      :atomics.put(reported, 2, deliveries)

      Logger.error(
        "[ExAtlas.Fly.Dispatcher] #{new} deliveries in #{new_batches} dispatches were " <>
          "lost: the sender process holding them exited (#{deliveries} lost in all)",
        lost_deliveries: new,
        lost_batches: new_batches
      )

      Telemetry.lost(new, new_batches)
    end

    :ok
  end

  defp close(dispatcher) do
    if lookup() == dispatcher do
      :ok = Native.publish(:undefined)
      :persistent_term.erase(@key)
      :persistent_term.erase(@reported_key)
    end

    subscribers = Native.close(dispatcher)
    Enum.each(subscribers, &Process.exit(&1, @closed_reason))

    # Supervisor reports are not logged by default: say why subscribers were stopped.
    if subscribers != [] do
      Logger.info(
        "[ExAtlas.Fly.Dispatcher] registry closed; #{length(subscribers)} subscribers got " <>
          "the exit signal #{inspect(@closed_reason)}",
        subscribers: length(subscribers)
      )
    end

    :ok
  end
end
