defmodule ExAtlas.Fly.Dispatcher.Telemetry do
  @moduledoc false
  # `:telemetry` events, emitted only when the host has `:telemetry` (an optional
  # dependency, as Phoenix.PubSub is: nothing here needs it to compile). The events and
  # their shapes are listed in the README ("Telemetry").
  #
  # Whether `:telemetry` is there is asked at every event with
  # `function_exported?(:telemetry, :execute, 3)`: one lookup in the VM's export table, no
  # code loading. A handler can only be attached through the `:telemetry` module, so when
  # that module is not loaded nobody listens and skipping is exact; asking each time
  # (instead of once at start) also sees a `:telemetry` loaded later. None of these events
  # is on the common dispatch path anyway: a wait happens only when a lane is full.

  @compile {:no_warn_undefined, :telemetry}

  @prefix [:ex_atlas, :fly, :dispatcher]

  @typedoc "What `wait_start/1` hands to `wait_stop/1`; nil when nobody listens."
  @type span :: {integer(), map()} | nil

  @doc "`[:ex_atlas, :fly, :dispatcher, :evict]`: the watchdog evicted a slow subscriber."
  @spec evict(binary(), pid(), non_neg_integer(), pos_integer()) :: :ok
  def evict(topic, pid, queue_len, threshold) do
    execute([:evict], %{queue_len: queue_len, threshold: threshold}, %{
      topic: topic,
      subscriber: pid
    })
  end

  @doc """
  `[:ex_atlas, :fly, :dispatcher, :skip]`: the watchdog started (`phase: :start`) or
  stopped (`phase: :stop`) skipping a slow subscriber's dispatches on `topic`; `skipped`
  is the dispatches the episode skipped (`0` at its start), `queue_len` the mailbox the
  poll found. `on_slow` in the metadata: `:skip`, or `:catch_up` (the subscriber was
  parked; `skipped` is `0`, as what it skipped waits for it in the history).
  """
  @spec skip(
          :start | :stop,
          binary(),
          pid(),
          non_neg_integer(),
          non_neg_integer(),
          :skip | :catch_up
        ) :: :ok
  def skip(phase, topic, pid, queue_len, skipped, on_slow \\ :skip) do
    execute([:skip], %{queue_len: queue_len, skipped: skipped}, %{
      topic: topic,
      subscriber: pid,
      phase: phase,
      on_slow: on_slow
    })
  end

  @doc """
  `[:ex_atlas, :fly, :dispatcher, :wait, :start]`: a producer starts waiting for room in
  a full lane (`reason: :full`, the only reason there is). Returns what `wait_stop/1`
  needs.
  """
  @spec wait_start(binary(), :full) :: span()
  def wait_start(topic, reason \\ :full) do
    if enabled?() do
      start = System.monotonic_time()
      # The context pairs start and stop, as `:telemetry.span/3` does.
      metadata = %{topic: topic, reason: reason, telemetry_span_context: make_ref()}

      :telemetry.execute(
        @prefix ++ [:wait, :start],
        %{system_time: System.system_time(), monotonic_time: start},
        metadata
      )

      {start, metadata}
    end
  end

  @doc "`[:ex_atlas, :fly, :dispatcher, :wait, :stop]`: the wait that `span` began ended."
  @spec wait_stop(span()) :: :ok
  def wait_stop(nil), do: :ok

  def wait_stop({start, metadata}) do
    stop = System.monotonic_time()
    execute([:wait, :stop], %{duration: stop - start, monotonic_time: stop}, metadata)
  end

  @doc """
  `[:ex_atlas, :fly, :dispatcher, :replay, :cut]`: a subscriber catching up on its replay
  fell so far behind that `missed` dispatches were not kept for it; it has just told
  itself so with `{:ex_atlas_fly_gap, topic, missed}`.
  """
  @spec replay_cut(binary(), pid(), pos_integer()) :: :ok
  def replay_cut(topic, pid, missed),
    do: execute([:replay, :cut], %{missed: missed}, %{topic: topic, subscriber: pid})

  @doc "`[:ex_atlas, :fly, :dispatcher, :cluster, :drop]`: dispatches dropped for `node`."
  @spec cluster_drop(node(), pos_integer()) :: :ok
  def cluster_drop(node, count), do: execute([:cluster, :drop], %{count: count}, %{node: node})

  @doc "`[:ex_atlas, :fly, :dispatcher, :lost]`: deliveries lost with a killed sender."
  @spec lost(non_neg_integer(), non_neg_integer()) :: :ok
  def lost(deliveries, batches),
    do: execute([:lost], %{deliveries: deliveries, batches: batches}, %{})

  defp execute(event, measurements, metadata) do
    if enabled?(), do: :telemetry.execute(@prefix ++ event, measurements, metadata)
    :ok
  end

  defp enabled?, do: function_exported?(:telemetry, :execute, 3)
end
