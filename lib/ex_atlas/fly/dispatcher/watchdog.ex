defmodule ExAtlas.Fly.Dispatcher.Watchdog do
  @moduledoc false
  # Slow-consumer eviction behind `ExAtlas.Fly.Dispatcher.subscribe_with_backpressure/2`.
  #
  # One process (this GenServer, started beside the registry by
  # `ExAtlas.Fly.Dispatcher.Supervisor`) watches every subscription. One poller was chosen
  # over one process per subscription by bench/watchdog.exs (its design comparison; the
  # figures are in bench/results/watchdog.md): per-subscription processes wake the
  # schedulers once per subscription and poll, which costs several times the scheduler
  # time, CPU time and memory of one poller walking a map. So: one poller, with one timer
  # per distinct `:poll_ms`. Its cost grows linearly with the watches.
  #
  # State:
  #   * `groups`: poll_ms => %{timer: ref, polls: n, watches: %{{pid, topic} => watch}};
  #     a group exists only while it holds a watch, and so does its timer.
  #   * `subscribers`: pid => {monitor ref, %{topic => true}}; one monitor per watched pid,
  #     never a link, so neither side's crash takes the other down.
  #   * an ETS table {{pid, topic}, poll_ms, threshold, cooldown_ms, on_slow}: every watch with its
  #     options, the index that finds a watch's group, and what `unsubscribed/1` reads in
  #     the caller so unwatched callers of `unsubscribe/1` never message this process.
  #     Our supervisor creates and owns it (`create_table/0`), so it outlives a crash of
  #     this process, and a restarted watchdog resumes every watch from it (a cooldown
  #     under way starts again);
  #   * an :atomics counting the watches, so that while there are none `unsubscribe/1`
  #     does not even look in the table.
  #
  # A watch is per (subscriber, topic). Subscribing twice with backpressure to one topic
  # makes two registry entries (two deliveries per dispatch) and one watch with the latest
  # options; eviction removes all of the subscriber's entries for the topic, as
  # `unsubscribe/1` would, and sends one sentinel.
  #
  # Eviction calls `Native.unsubscribe_pid/3`: a normal-scheduler NIF whose work grows with
  # that one pid's subscriptions, not with the registry.
  #
  # `on_slow: :skip` watches are not evicted: where an `:evict` watch would be, the NIF's
  # skip table is told to skip the subscription (`Backend.Registry.skip(:start, ...)`), and
  # once a poll finds the mailbox at or below half the threshold, to stop (`:stop`); the
  # next process that sends the subscriber a message on the topic sends the gap notice
  # first. The watchdog never sends the notice. A watch that ends (unsubscribe, exit)
  # clears the subscription's entry; a restarted watchdog stops every skip it inherits
  # (the next message brings the notice) and starts again from its polls.
  #
  # `on_slow: :catch_up` watches park the subscriber instead (`Backend.Registry.park/2`:
  # out of the registry, its dispatches kept in the history) and, at the same recovery,
  # send it `{:ex_atlas_fly_behind, topic}`; it then calls catch_up/2 itself. Each such
  # watch holds one count of the topic's `:catch_up` watches in the NIF (taken by the
  # caller before it subscribes, given back here when the watch ends or is replaced),
  # which makes the topic's dispatches tracked. A restarted watchdog sends the notice to
  # each `:catch_up` subscriber that its predecessor left parked (the NIF knows which).

  use GenServer

  require Logger

  alias ExAtlas.Fly.Dispatcher.Backend
  alias ExAtlas.Fly.Dispatcher.Config
  alias ExAtlas.Fly.Dispatcher.Telemetry

  @table __MODULE__
  # The number of watches, in an :atomics published once per watchdog start, so callers of
  # unsubscribe/1 skip the ETS lookup while nothing is watched.
  @count_key {__MODULE__, :watches}
  @defaults [threshold: 10_000, poll_ms: 1_000, cooldown_ms: 0, on_slow: :evict]
  # `:erlang.start_timer/3` refuses times near 2^62 ms; a poll every 2^32 - 1 ms (49 days)
  # is already far past any useful interval.
  @max_poll_ms 4_294_967_295

  @typedoc """
  Validated options, each present once and in this order: replay, threshold, poll_ms,
  cooldown_ms, on_slow. The watchdog matches the last four in that order, once
  `subscribe/2` has taken replay out.
  """
  @type options :: [
          replay: non_neg_integer(),
          threshold: pos_integer(),
          poll_ms: pos_integer(),
          cooldown_ms: non_neg_integer(),
          on_slow: :evict | :skip | :catch_up
        ]

  ## Caller side

  @doc """
  Subscribes the caller to `topic` and watches its mailbox (`:registry` mode), or falls
  back to a plain subscription with a warning. `topic` is already checked.
  """
  @spec subscribe(binary(), keyword()) :: :ok
  def subscribe(topic, opts) do
    opts = validate!(opts)
    {replay, opts} = Keyword.pop(opts, :replay)

    case Config.backend() do
      {Backend.Registry, _arg} ->
        # Raises the registry's own "not running" error first, then checks the watchdog
        # before subscribing, so a failure leaves no unwatched subscription behind.
        _ = Backend.Registry.dispatcher!()
        watchdog = GenServer.whereis(__MODULE__) || raise not_started()
        catch_up? = opts[:on_slow] == :catch_up
        # Counted before the subscription exists, so that every dispatch that can reach
        # it is tracked (see Backend.Registry.unpark/1); raises without a history.
        if catch_up?, do: :ok = Backend.Registry.watch_parking(topic, true)

        try do
          :ok = Backend.Registry.subscribe_replay(topic, replay)
          watch(watchdog, topic, opts)
        rescue
          error ->
            # No watch holds the count: give it back.
            if catch_up?, do: :ok = Backend.Registry.watch_parking(topic, false)
            reraise error, __STACKTRACE__
        end

      {backend, arg} = mode ->
        :ok = backend.subscribe(topic, arg)
        if replay > 0, do: ExAtlas.Fly.Dispatcher.warn_no_replay(topic, mode)

        ExAtlas.Fly.Dispatcher.Warnings.once({:no_backpressure, mode}, fn ->
          Logger.warning(
            "[ExAtlas.Fly.Dispatcher] subscribe_with_backpressure/2 only works in " <>
              ":registry mode; falling back to plain subscribe/1 (topic #{inspect(topic)}, " <>
              "subscriber #{inspect(self())}; said once per start of the :ex_atlas application)",
            topic: topic
          )
        end)
    end
  end

  defp watch(watchdog, topic, opts) do
    GenServer.call(watchdog, {:watch, self(), topic, opts})
  catch
    # The watchdog stopped during the call, almost always because the application (and
    # the registry, with the caller's new entry) is stopping: callers see ArgumentError,
    # as from every other call then. After a crash of the watchdog alone, the entry stays,
    # unwatched; the caller was told the call failed.
    :exit, {reason, _} when reason != :timeout -> raise not_started()
  end

  @doc """
  Ends the caller's watch on `topic`, if any; called by `unsubscribe/1` after the registry
  removed the caller. Costs one :atomics read while nothing is watched, plus one ETS lookup
  while something is; the watchdog hears only from watched callers.
  """
  @spec unsubscribed(binary()) :: :ok
  def unsubscribed(topic) do
    key = {self(), topic}

    if any_watches?() and watched?(key) do
      try do
        GenServer.call(__MODULE__, {:unwatch, key})
      catch
        # The watchdog stopped meanwhile: its watches went with it.
        :exit, _ -> :ok
      end
    else
      :ok
    end
  end

  defp any_watches? do
    case :persistent_term.get(@count_key, nil) do
      nil -> false
      count -> :atomics.get(count, 1) > 0
    end
  end

  defp watched?(key) do
    :ets.member(@table, key)
  rescue
    # No table: no watchdog runs (the application is stopped).
    ArgumentError -> false
  end

  @doc """
  Validates `subscribe_with_backpressure/2` options; returns them with defaults filled in.
  Raises `ArgumentError` naming the bad key or value.
  """
  @spec validate!(term()) :: options()
  def validate!(opts) when is_list(opts) do
    check_each!(opts, opts)

    [{:replay, Keyword.get(opts, :replay, 0)}] ++
      Enum.map(@defaults, fn {key, default} -> {key, Keyword.get(opts, key, default)} end)
  end

  def validate!(other), do: not_keyword!(other)

  defp check_each!([], _opts), do: :ok

  defp check_each!([{key, value} | rest], opts) do
    case key do
      :threshold -> positive!(:threshold, value, nil)
      :poll_ms -> positive!(:poll_ms, value, @max_poll_ms)
      :cooldown_ms when is_integer(value) and value >= 0 -> :ok
      :cooldown_ms -> bad!(:cooldown_ms, "a non-negative integer", value)
      :replay when is_integer(value) and value >= 0 -> :ok
      :replay -> bad!(:replay, "a non-negative integer", value)
      :on_slow when value in [:evict, :skip, :catch_up] -> :ok
      :on_slow -> bad!(:on_slow, ":evict, :skip or :catch_up", value)
      _ -> unknown!(key)
    end

    check_each!(rest, opts)
  end

  # An element that is not a pair, or an improper tail.
  defp check_each!(_other, opts), do: not_keyword!(opts)

  @spec not_keyword!(term()) :: no_return()
  defp not_keyword!(opts) do
    raise ArgumentError,
          "expected subscribe_with_backpressure/2 options to be a keyword list, got: " <>
            inspect(opts)
  end

  defp positive!(_key, value, nil) when is_integer(value) and value > 0, do: :ok
  defp positive!(_key, value, max) when is_integer(value) and value > 0 and value <= max, do: :ok
  defp positive!(key, value, nil), do: bad!(key, "a positive integer", value)
  defp positive!(key, value, max), do: bad!(key, "a positive integer up to #{max}", value)

  @spec bad!(atom(), String.t(), term()) :: no_return()
  defp bad!(key, expected, value) do
    raise ArgumentError,
          "expected #{inspect(key)} to be #{expected}, got: #{inspect(value)}"
  end

  @spec unknown!(term()) :: no_return()
  defp unknown!(key) do
    raise ArgumentError,
          "unknown subscribe_with_backpressure/2 option #{inspect(key)}; " <>
            "expected :threshold, :poll_ms, :cooldown_ms, :on_slow or :replay"
  end

  defp not_started do
    ArgumentError.exception(
      "the ExAtlas.Fly.Dispatcher watchdog is not running (it starts and stops with the " <>
        "registry): " <> Backend.Registry.not_running_cause()
    )
  end

  @doc false
  @spec stats() :: %{
          watches: non_neg_integer(),
          subscribers: non_neg_integer(),
          timers: non_neg_integer()
        }
  def stats, do: GenServer.call(__MODULE__, :stats)

  @doc false
  # For tests: the watch of `pid` on `topic`, or nil. `polls` counts the polls of its
  # `poll_ms` group so far; `above_threshold` says whether the last poll found the mailbox
  # above the threshold (the cooldown is running).
  @spec watch_info(pid(), binary()) :: map() | nil
  def watch_info(pid, topic), do: GenServer.call(__MODULE__, {:watch_info, {pid, topic}})

  ## The poller

  @doc """
  Creates the table of watches and the watch counter, owned by the calling process (the
  dispatcher's supervisor), so that they outlive a crash of the watchdog.
  """
  @spec create_table() :: :ok
  def create_table do
    @table = :ets.new(@table, [:set, :public, :named_table, read_concurrency: true])
    :persistent_term.put(@count_key, :atomics.new(1, signed: false))
    :ok
  end

  @doc false
  @spec start_link(keyword()) :: GenServer.on_start()
  def start_link(_opts), do: GenServer.start_link(__MODULE__, [], name: __MODULE__)

  @impl true
  def init([]) do
    # Started on its own (not by our supervisor): the table is ours, for our lifetime.
    if :ets.whereis(@table) == :undefined, do: create_table()
    count = :persistent_term.get(@count_key)
    :atomics.put(count, 1, :ets.info(@table, :size))
    state = %{table: @table, count: count, groups: %{}, subscribers: %{}}
    {:ok, :ets.foldl(&resume/2, state, @table)}
  end

  # A watch left by an earlier watchdog: monitor its subscriber again (a dead one sends
  # :DOWN at once) and put it back in its poll group.
  defp resume({{pid, topic} = key, poll_ms, threshold, cooldown_ms, on_slow}, state) do
    # A skip the earlier watchdog started would never be stopped: stop it (the next
    # message brings its notice), and let the polls start it again if need be.
    :ok = end_skip(on_slow, true, :stop, {pid, topic})
    watch = new_watch(threshold, cooldown_ms, on_slow, nil)

    state
    |> add_subscriber(pid, topic)
    |> put_in_group(poll_ms, key, watch)
  end

  @impl true
  def handle_call({:watch, pid, topic, opts}, _from, state) do
    [threshold: threshold, poll_ms: poll_ms, cooldown_ms: cooldown_ms, on_slow: on_slow] = opts
    key = {pid, topic}

    # A second watch of the same subscription keeps its cooldown, takes the new options.
    {above_since, state} =
      case :ets.lookup(state.table, key) do
        [{^key, old_poll, _threshold, _cooldown_ms, old_on_slow}] ->
          watch = state.groups[old_poll].watches[key]
          # Skipping no more (now `:evict`) or from a fresh poll: stop, the notice follows.
          :ok = end_skip(old_on_slow, watch.skipping, :stop, key)
          # Each `:catch_up` watch holds one count, taken by its caller: the new one holds
          # its own.
          if old_on_slow == :catch_up, do: :ok = unwatch_parking(topic)
          {watch.above_since, drop_from_group(state, old_poll, key)}

        [] ->
          :atomics.add(state.count, 1, 1)
          {nil, add_subscriber(state, pid, topic)}
      end

    watch = new_watch(threshold, cooldown_ms, on_slow, above_since)
    :ets.insert(state.table, {key, poll_ms, threshold, cooldown_ms, on_slow})
    {:reply, :ok, put_in_group(state, poll_ms, key, watch)}
  end

  def handle_call({:unwatch, key}, _from, state) do
    {:reply, :ok, unwatch(state, key)}
  end

  def handle_call({:watch_info, key}, _from, state) do
    info =
      case :ets.lookup(state.table, key) do
        [{^key, poll_ms, _threshold, _cooldown_ms, _on_slow}] ->
          group = state.groups[poll_ms]
          watch = group.watches[key]

          %{
            threshold: watch.threshold,
            poll_ms: poll_ms,
            cooldown_ms: watch.cooldown_ms,
            on_slow: watch.on_slow,
            skipping: watch.skipping,
            above_threshold: watch.above_since != nil,
            polls: group.polls
          }

        [] ->
          nil
      end

    {:reply, info, state}
  end

  def handle_call(:stats, _from, state) do
    watches = Enum.reduce(state.groups, 0, fn {_, g}, acc -> acc + map_size(g.watches) end)

    stats = %{
      watches: watches,
      subscribers: map_size(state.subscribers),
      timers: map_size(state.groups)
    }

    {:reply, stats, state}
  end

  @impl true
  def handle_info({:timeout, timer, {:poll, poll_ms}}, state) do
    case state.groups do
      %{^poll_ms => %{timer: ^timer} = group} -> {:noreply, poll(state, poll_ms, group)}
      # A timer cancelled too late: its group went or was re-armed.
      _ -> {:noreply, state}
    end
  end

  def handle_info({:DOWN, ref, :process, pid, _reason}, state) do
    case state.subscribers do
      %{^pid => {^ref, topics}} ->
        state = %{state | subscribers: Map.delete(state.subscribers, pid)}

        state =
          Enum.reduce(Map.keys(topics), state, fn topic, acc -> unwatch(acc, {pid, topic}) end)

        {:noreply, state}

      _ ->
        {:noreply, state}
    end
  end

  def handle_info(_other, state), do: {:noreply, state}

  defp poll(state, poll_ms, group) do
    now = System.monotonic_time(:millisecond)

    {watches, actions} =
      :maps.fold(
        fn key, watch, acc -> check(key, watch, now, acc) end,
        {group.watches, []},
        group.watches
      )

    group = %{group | watches: watches, timer: arm(poll_ms), polls: group.polls + 1}
    state = %{state | groups: Map.put(state.groups, poll_ms, group)}
    Enum.reduce(actions, state, &act/2)
  end

  defp check({pid, _topic} = key, watch, now, {watches, actions} = acc) do
    case Process.info(pid, :message_queue_len) do
      {:message_queue_len, len} when len > watch.threshold ->
        since = watch.above_since || now

        cond do
          watch.skipping ->
            acc

          now - since >= watch.cooldown_ms and watch.on_slow != :evict ->
            watch = %{watch | skipping: true}
            {Map.put(watches, key, watch), [{:skip, key, len, watch.on_slow} | actions]}

          now - since >= watch.cooldown_ms ->
            {watches, [{:evict, key, len, watch.threshold} | actions]}

          watch.above_since == since ->
            acc

          true ->
            {Map.put(watches, key, %{watch | above_since: since}), actions}
        end

      # The hysteresis: skipping stops at half the threshold, not just below it.
      {:message_queue_len, len} when watch.skipping and len * 2 <= watch.threshold ->
        watch = %{watch | skipping: false, above_since: nil}
        {Map.put(watches, key, watch), [{:resume, key, len, watch.on_slow} | actions]}

      {:message_queue_len, _len} when watch.skipping ->
        acc

      {:message_queue_len, _len} when watch.above_since != nil ->
        {Map.put(watches, key, %{watch | above_since: nil}), actions}

      # At or below the threshold, or the process is gone (its :DOWN is on the way).
      _ ->
        acc
    end
  end

  defp new_watch(threshold, cooldown_ms, on_slow, above_since) do
    %{
      threshold: threshold,
      cooldown_ms: cooldown_ms,
      on_slow: on_slow,
      above_since: above_since,
      skipping: false
    }
  end

  defp act({:evict, key, len, threshold}, state), do: evict(key, len, threshold, state)

  defp act({:skip, {pid, topic}, len, :skip}, state) do
    _started = skip(:start, topic, pid)
    Telemetry.skip(:start, topic, pid, len, 0, :skip)
    state
  end

  # Parked: its dispatches on the topic wait in the history for it (within replay's
  # bounds) until it calls catch_up/1, which the notice at its recovery asks it to.
  defp act({:skip, {pid, topic} = key, len, :catch_up}, state) do
    if park(topic, pid) do
      Telemetry.skip(:start, topic, pid, len, 0, :catch_up)
      state
    else
      # Not parked (catching up, or not subscribed): not skipping either, so that a later
      # poll tries again rather than wait for a recovery that may never come.
      not_skipping(state, key)
    end
  end

  defp act({:resume, {pid, topic}, len, :skip}, state) do
    skipped = skip(:stop, topic, pid)
    Telemetry.skip(:stop, topic, pid, len, skipped, :skip)
    state
  end

  defp act({:resume, {pid, topic}, len, :catch_up}, state) do
    send(pid, {:ex_atlas_fly_behind, topic})
    Telemetry.skip(:stop, topic, pid, len, 0, :catch_up)
    state
  end

  # Stops (`:stop`) or forgets (`:clear`) the skip of a `:skip` watch, when `now?`. A
  # `:catch_up` watch that stops while its subscriber is parked (the watch replaced, or a
  # restarted watchdog) tells it to catch up, as its recovery would; one that ends
  # (`:clear`) gives back its count, its subscriber's parking having gone with the
  # subscription (unsubscribe/1, exit).
  defp end_skip(:skip, true, action, {pid, topic}) do
    _skipped = skip(action, topic, pid)
    :ok
  end

  defp end_skip(:catch_up, now?, :stop, {pid, topic}) do
    if now? and parked?(topic, pid), do: send(pid, {:ex_atlas_fly_behind, topic})
    :ok
  end

  defp end_skip(:catch_up, _now?, :clear, {_pid, topic}) do
    unwatch_parking(topic)
  end

  defp end_skip(_on_slow, _now?, _action, _key), do: :ok

  defp park(topic, pid) do
    Backend.Registry.park(topic, pid)
  rescue
    # No registry runs (it is being restarted): the subscription went with it.
    ArgumentError -> false
  end

  defp parked?(topic, pid) do
    Backend.Registry.parked?(topic, pid)
  rescue
    # A registry being closed: its parking goes with it.
    ArgumentError -> false
  end

  defp unwatch_parking(topic) do
    Backend.Registry.watch_parking(topic, false)
  rescue
    # No registry runs, or none with a history: the count went with it.
    ArgumentError -> :ok
  end

  defp skip(action, topic, pid) do
    Backend.Registry.skip(action, topic, pid)
  rescue
    # No registry runs (it is being restarted): its skip table went with it.
    ArgumentError -> 0
  end

  defp evict({pid, topic} = key, len, threshold, state) do
    # Zero removed: the subscriber left the topic on its own (its unsubscribe is on the
    # way to us) or the registry was restarted; there is nothing to evict.
    if remove_entries(topic, pid) > 0 do
      send(pid, {:ex_atlas_fly_backpressure_evict, topic})

      Logger.warning(
        "[ExAtlas.Fly.Dispatcher] evicting slow subscriber #{inspect(pid)} from topic " <>
          "#{inspect(topic)}: #{len} messages queued, above the threshold of #{threshold}",
        topic: topic,
        subscriber: pid,
        queue_len: len,
        threshold: threshold
      )

      Telemetry.evict(topic, pid, len, threshold)
    end

    unwatch(state, key)
  end

  defp remove_entries(topic, pid) do
    Backend.Registry.evict(topic, pid)
  rescue
    # No registry runs (it is being restarted): its entries are gone already.
    ArgumentError -> 0
  end

  defp unwatch(state, {pid, topic} = key) do
    case :ets.take(state.table, key) do
      [{^key, poll_ms, _threshold, _cooldown_ms, on_slow}] ->
        :atomics.sub(state.count, 1, 1)
        :ok = end_skip(on_slow, true, :clear, key)

        state
        |> drop_from_group(poll_ms, key)
        |> drop_subscriber(pid, topic)

      [] ->
        state
    end
  end

  defp not_skipping(state, key) do
    case :ets.lookup(state.table, key) do
      [{^key, poll_ms, _threshold, _cooldown_ms, _on_slow}] ->
        watch = %{state.groups[poll_ms].watches[key] | skipping: false, above_since: nil}
        put_in_group(state, poll_ms, key, watch)

      [] ->
        state
    end
  end

  defp put_in_group(state, poll_ms, key, watch) do
    group =
      case state.groups do
        %{^poll_ms => group} -> %{group | watches: Map.put(group.watches, key, watch)}
        _ -> %{timer: arm(poll_ms), watches: %{key => watch}, polls: 0}
      end

    %{state | groups: Map.put(state.groups, poll_ms, group)}
  end

  defp drop_from_group(state, poll_ms, key) do
    group = Map.fetch!(state.groups, poll_ms)
    watches = Map.delete(group.watches, key)

    if map_size(watches) == 0 do
      # Cancelled here; a tick already in our mailbox no longer matches a group's timer.
      :ok = :erlang.cancel_timer(group.timer, async: true, info: false)
      %{state | groups: Map.delete(state.groups, poll_ms)}
    else
      %{state | groups: Map.put(state.groups, poll_ms, %{group | watches: watches})}
    end
  end

  defp add_subscriber(state, pid, topic) do
    entry =
      case state.subscribers do
        %{^pid => {ref, topics}} -> {ref, Map.put(topics, topic, true)}
        _ -> {Process.monitor(pid), %{topic => true}}
      end

    %{state | subscribers: Map.put(state.subscribers, pid, entry)}
  end

  defp drop_subscriber(state, pid, topic) do
    case state.subscribers do
      %{^pid => {ref, topics}} when map_size(topics) == 1 ->
        # No :flush: it would scan the whole mailbox, and after a mass exit or unsubscribe
        # that is thousands of messages per call. A :DOWN already queued is ignored above.
        Process.demonitor(ref)
        %{state | subscribers: Map.delete(state.subscribers, pid)}

      %{^pid => {ref, topics}} ->
        entry = {ref, Map.delete(topics, topic)}
        %{state | subscribers: Map.put(state.subscribers, pid, entry)}

      _ ->
        state
    end
  end

  defp arm(poll_ms), do: :erlang.start_timer(poll_ms, self(), {:poll, poll_ms})
end
