defmodule ExAtlas.Fly.Dispatcher do
  @moduledoc """
  Broadcasts Fly.io log and deploy events to subscriber processes.

  Subscribers call `subscribe/1` and match the messages in `handle_info/2`; producers
  call `dispatch/2`. The messages are whatever the producer dispatches; ExAtlas itself
  sends these shapes:

      {:ex_atlas_fly_logs, app, entries}
      {:ex_atlas_fly_deploy, ticket_id, line}
      {:ex_atlas_fly_backpressure_evict, topic}
      {:ex_atlas_fly_gap, topic, missed}
      {:ex_atlas_fly_behind, topic}

  ## Modes

  The mode is read from the application environment on every call:

      config :ex_atlas, :fly, dispatcher: :registry

  * `:registry` (default) - a duplicate-key registry of local pids kept in a Rust NIF.
    `dispatch/2` hands a shared snapshot of the topic's subscribers and the message to
    one sender process per lane and returns; the senders deliver it, so the caller's
    cost does not grow with the number of subscribers.
  * `:phoenix_pubsub` - `Phoenix.PubSub.subscribe/2`, `unsubscribe/2` and `broadcast/3`
    on `config :ex_atlas, :fly, pubsub: MyApp.PubSub`. Falls back to `:registry` when
    Phoenix.PubSub is not loaded or `:pubsub` is unset.
  * `{:mfa, {mod, fun, extra}}` - `dispatch/2` calls
    `apply(mod, fun, [topic, message | extra])`; a raise, throw or exit is logged and
    `dispatch/2` still returns `:ok`. `subscribe/1` and `unsubscribe/1` do nothing.

  ## Guarantees of the `:registry` mode

  * Messages dispatched by one process reach each subscriber in the order dispatched,
    across topics too, as a `send/2` loop would deliver them.
  * Nothing dispatched after `unsubscribe/1` returns reaches the unsubscribed process.
  * A subscriber that exits is removed from every topic by a process monitor.
  * Memory is bounded: each lane holds at most `:queue_capacity` dispatches in flight
    (default 1 024). When it is full, `dispatch/2` waits for room in a plain `receive`
    (first come, first served), holding no scheduler thread; nothing is dropped.
  * No NIF call holds a normal scheduler for longer than a plain `send/2` loop's
    timeslice (about 0.5 ms, plus one send), whatever the number of subscribers or the
    size of the message.
  * `sync/0` returns once everything the caller dispatched before is in the
    subscribers' mailboxes.
  * With `config :ex_atlas, :fly, replay: n`, each topic keeps its `n` most recent
    dispatches (within `:replay_memory` bytes over all topics), and
    `subscribe(topic, replay: k)` delivers them before anything live, each dispatch
    exactly once (see `subscribe/2`).
  * The registry outlives a crash of any of its processes (a sender, the server, the
    watchdog): subscriptions and watches are kept. What a killed sender had not
    delivered is counted (`lost_deliveries` in the stats) and logged. When the registry
    is closed (its supervisor stops or is killed, or the application stops), every
    subscriber gets the exit signal `{:shutdown, :ex_atlas_dispatcher_closed}`, as the
    links of the original `Registry` told its subscribers.

  ## Other settings

      config :ex_atlas, :fly,
        enabled: true,          # false: the :ex_atlas application starts no registry
        lanes: 2,               # fan-out lanes, one sender process each; default: schedulers online
        queue_capacity: 1_024,  # dispatches in flight per lane before dispatch/2 waits
        delivery: :scheduler    # or :dirty, see below

  `lanes` used to be called `sender_threads`; the old key still works, with a
  deprecation warning when the registry starts (`lanes` wins when both are set).

  Each lane's sender process delivers its batches through NIF calls that send with the
  sender's own process environment (which lets the VM copy straight onto each receiver's
  heap). With `delivery: :scheduler` (default) a call sends for about 0.5 ms at most on
  the sender's normal scheduler and reports it as a whole timeslice, so the sender is
  preempted between calls like any send loop, whatever the message size. With
  `delivery: :dirty` everything past a batch's first timeslice is sent from dirty CPU
  schedulers; on a 2-core machine it delivers more slowly, because the dirty threads then
  compete with the schedulers for the cores (figures in the repository's
  `bench/README.md`).

  ## Telemetry

  When the host has `:telemetry` (an optional dependency, as Phoenix.PubSub is), these
  events are emitted; their measurements and metadata are listed in the README's
  "Telemetry" section, and `stats/0` gives the registry's figures for pollers:

    * `[:ex_atlas, :fly, :dispatcher, :evict]` - the watchdog evicted a slow subscriber;
    * `[:ex_atlas, :fly, :dispatcher, :skip]` - the watchdog started or stopped skipping
      a slow subscriber (`on_slow: :skip`);
    * `[:ex_atlas, :fly, :dispatcher, :wait, :start | :stop]` - a producer waited for
      room in a full lane;
    * `[:ex_atlas, :fly, :dispatcher, :cluster, :drop]` - dispatches dropped for a node
      (cluster mode);
    * `[:ex_atlas, :fly, :dispatcher, :lost]` - deliveries lost with a sender that exited.

  ## Example

      iex> :ok = ExAtlas.Fly.Dispatcher.subscribe("logs:my-app")
      iex> :ok = ExAtlas.Fly.Dispatcher.dispatch("logs:my-app", {:ex_atlas_fly_logs, "my-app", []})
      iex> :ok = ExAtlas.Fly.Dispatcher.sync()
      iex> receive do
      ...>   {:ex_atlas_fly_logs, app, entries} -> {app, entries}
      ...> end
      {"my-app", []}
      iex> ExAtlas.Fly.Dispatcher.unsubscribe("logs:my-app")
      :ok
  """

  require Logger

  alias ExAtlas.Fly.Dispatcher.{Backend, Cluster, Config}

  @typedoc "A topic: any binary, for example `\"logs:\" <> app_name`."
  @type topic :: binary()

  @typedoc "The figures of `stats/0`."
  @type stats :: %{
          subscriptions: non_neg_integer(),
          topics: non_neg_integer(),
          subscribers: non_neg_integer(),
          lanes: non_neg_integer(),
          queue_capacity: non_neg_integer(),
          in_flight: non_neg_integer(),
          peak_in_flight: non_neg_integer(),
          delivered_batches: non_neg_integer(),
          dispatches: non_neg_integer(),
          deliveries: non_neg_integer(),
          waiting: non_neg_integer(),
          lost_batches: non_neg_integer(),
          lost_deliveries: non_neg_integer(),
          replay_messages: non_neg_integer(),
          replay_bytes: non_neg_integer(),
          replay_cuts: non_neg_integer(),
          replay_missed: non_neg_integer(),
          skipping: non_neg_integer(),
          skipped: non_neg_integer(),
          cluster: %{node() => %{queued: non_neg_integer(), dropped: non_neg_integer()}}
        }

  @registry ExAtlas.Fly.Dispatcher.Registry

  @doc """
  Subscribes the calling process to `topic`.

  Subscribing twice delivers every message twice, as with `Registry` and
  `keys: :duplicate`. Raises `ArgumentError` when `topic` is not a binary.
  """
  @spec subscribe(topic()) :: :ok
  def subscribe(topic) when is_binary(topic) do
    case Config.backend() do
      {Backend.Registry, _} -> Backend.Registry.subscribe(topic, nil)
      {backend, arg} -> backend.subscribe(topic, arg)
    end
  end

  def subscribe(topic), do: check_topic!(topic)

  @doc """
  Subscribes the calling process to `topic`, with options.

    * `:replay` - a non-negative integer `n` (default `0`). In `:registry` mode, before
      anything dispatched to `topic` after this call, the caller receives the topic's
      `n` most recent dispatches (as many as are kept, when fewer), as the messages that
      were dispatched, oldest first. Every dispatch to the topic from the first replayed
      on reaches the caller exactly once, in the replay or live, or is counted in a gap
      notice, and each producer's order holds across the two. Nobody waits for the
      caller: if it falls too far behind while it catches up, what is no longer kept for
      it is skipped, and it receives `{:ex_atlas_fly_gap, topic, missed}` in the place
      of the `missed` dispatches (notices in a row add up). See "Replay" in the README.

  The `:replay` setting (`config :ex_atlas, :fly, replay: 100`) says how many
  dispatches are kept per topic, within `:replay_memory` bytes over all topics; with
  the default `replay: 0` nothing is kept and this is `subscribe/1`. In the
  `:phoenix_pubsub` and `{:mfa, _}` modes, which keep no history, a `:replay` above 0 is
  ignored with a warning, `[ExAtlas.Fly.Dispatcher] replay only works in :registry mode;
  falling back to plain subscribe/1`, logged once per start of the `:ex_atlas`
  application and mode.

  `subscribe(topic, [])` is `subscribe(topic)`. Raises `ArgumentError` when `topic` is
  not a binary, or on an unknown option or a bad value.

      iex> :ok = ExAtlas.Fly.Dispatcher.subscribe("doc:replay", replay: 10)
      iex> ExAtlas.Fly.Dispatcher.unsubscribe("doc:replay")
      :ok
  """
  @spec subscribe(topic(), [{:replay, non_neg_integer()}]) :: :ok
  def subscribe(topic, opts) do
    check_topic!(topic)
    replay = replay_option!(opts)

    case Config.backend() do
      {Backend.Registry, _} ->
        Backend.Registry.subscribe_replay(topic, replay)

      {backend, arg} = mode ->
        :ok = backend.subscribe(topic, arg)
        if replay > 0, do: warn_no_replay(topic, mode)
        :ok
    end
  end

  defp replay_option!(opts) when is_list(opts) do
    if List.improper?(opts), do: bad_options!(opts)

    Enum.reduce(opts, 0, fn
      {:replay, n}, _ when is_integer(n) and n >= 0 ->
        n

      {:replay, n}, _ ->
        raise ArgumentError,
              "expected :replay to be a non-negative integer, got: #{inspect(n)}"

      {key, _}, _ ->
        raise ArgumentError,
              "unknown subscribe/2 option #{inspect(key)}; expected :replay"

      _other, _ ->
        bad_options!(opts)
    end)
  end

  defp replay_option!(opts), do: bad_options!(opts)

  @spec bad_options!(term()) :: no_return()
  defp bad_options!(opts) do
    raise ArgumentError,
          "expected subscribe/2 options to be a keyword list, got: #{inspect(opts)}"
  end

  # Once per application start and mode (ExAtlas.Fly.Dispatcher.Warnings), not per call.
  @doc false
  @spec warn_no_replay(binary(), {module(), term()}) :: :ok
  def warn_no_replay(topic, mode) do
    ExAtlas.Fly.Dispatcher.Warnings.once({:no_replay, mode}, fn ->
      Logger.warning(
        "[ExAtlas.Fly.Dispatcher] replay only works in :registry mode; falling back to " <>
          "plain subscribe/1 (topic #{inspect(topic)}, subscriber #{inspect(self())}; " <>
          "said once per start of the :ex_atlas application)",
        topic: topic
      )
    end)
  end

  @doc """
  Removes every subscription of the calling process to `topic`.

  Unsubscribing from a topic the process never subscribed to returns `:ok`.
  """
  @spec unsubscribe(topic()) :: :ok
  def unsubscribe(topic) when is_binary(topic) do
    :ok =
      case Config.backend() do
        {Backend.Registry, _} -> Backend.Registry.unsubscribe(topic, nil)
        {backend, arg} -> backend.unsubscribe(topic, arg)
      end

    ExAtlas.Fly.Dispatcher.Watchdog.unsubscribed(topic)
  end

  def unsubscribe(topic), do: check_topic!(topic)

  @doc """
  Sends `message` to every subscriber of `topic` and returns `:ok`.

  In `:registry` mode the message is handed to the sender processes and this returns
  before delivery (a dispatch to at most 16 subscriptions whose lanes are idle is sent
  before returning); use `sync/0` to wait for delivery.
  """
  @spec dispatch(topic(), term()) :: :ok
  def dispatch(topic, message) when is_binary(topic) do
    # The default mode by a direct call (here and in subscribe/1, unsubscribe/1): an
    # apply through a variable module costs about as much as a small topic's NIF call.
    case Config.backend() do
      {Backend.Registry, _} -> Backend.Registry.dispatch(topic, message, nil)
      {backend, arg} -> backend.dispatch(topic, message, arg)
    end
  end

  def dispatch(topic, _message), do: check_topic!(topic)

  @doc """
  Subscribes the calling process to `topic` and evicts it if it falls behind.

  In `:registry` mode the caller's mailbox length (`Process.info(pid, :message_queue_len)`)
  is read every `:poll_ms`. When it stays above `:threshold` on consecutive polls for at
  least `:cooldown_ms`, the subscriber is evicted:

    1. all of its subscriptions to `topic` are removed from the registry, as its own
       `unsubscribe/1` would: nothing dispatched afterwards reaches it (messages already
       being delivered may still arrive);
    2. it receives `{:ex_atlas_fly_backpressure_evict, topic}`, once; calling
       `unsubscribe/1` from `handle_info/2` then is harmless;
    3. `[ExAtlas.Fly.Dispatcher] evicting slow subscriber #PID<...> from topic "...": N
       messages queued, above the threshold of T` is logged at warning level with the
       metadata `topic:`, `subscriber:`, `queue_len:` and `threshold:`.

  A poll at or below the threshold resets the cooldown. The watch ends, leaving nothing
  behind, when the subscriber exits, calls `unsubscribe/1` for `topic`, or is evicted. Each
  topic is watched on its own. Calling this twice for one topic subscribes twice (each
  message arrives twice, as with `subscribe/1`) under one watch that takes the latest
  options; eviction removes both subscriptions and sends one sentinel.

  One process of ExAtlas's supervision tree, started with the registry, polls every
  watched subscriber. It is not linked to them: a crash on either side leaves the other
  running.

  Options (`ArgumentError` on an unknown key or a bad value):

    * `:threshold` - mailbox length that counts as behind, a positive integer (`10_000`);
    * `:poll_ms` - milliseconds between polls, a positive integer up to `4_294_967_295`
      (`1_000`);
    * `:cooldown_ms` - how long the mailbox must stay above the threshold before the
      eviction, a non-negative integer (`0`: the first poll above it evicts);
    * `:replay` - as in `subscribe/2` (`0`). The replayed messages are in the mailbox
      when the watch starts: a `:threshold` below their number evicts at the first
      poll unless the subscriber reads them first;
    * `:on_slow` - `:evict` (the default: as above), `:skip` or `:catch_up`.

  With `on_slow: :skip` the subscriber is not evicted. Where it would be, the topic's
  dispatches are no longer sent to it, and counted; once a poll finds its mailbox at or
  below half the threshold, the process that sends it its next message on `topic` first
  sends `{:ex_atlas_fly_gap, topic, missed}`, `missed` being exactly the dispatches it
  was not sent (once per dispatch, whatever its number of subscriptions). One notice per
  episode, placed at the gap; order holds on both sides of it (for an off-heap subscriber:
  per producer, and the notice before the next message of the producer that sent it).
  Unsubscribing or exiting meanwhile leaves nothing behind. The README's "Slow
  subscribers that stay" section has the details and a LiveView example.

  With `on_slow: :catch_up` (only with `replay` configured: `config :ex_atlas, :fly,
  replay: n`, else `ArgumentError`) the subscriber is not evicted either. Where it would
  be, it is *parked*: its subscriptions to `topic` leave the registry, and the topic's
  later dispatches wait for it in the history, within replay's bounds (`replay_memory`
  and its caps per joiner). Once a poll finds its mailbox at or below half the
  threshold, the watchdog sends it `{:ex_atlas_fly_behind, topic}`, and it calls
  `catch_up/1`: it then receives, in order and once each, what was dispatched to `topic`
  while it was parked, with `{:ex_atlas_fly_gap, topic, missed}` in place of what the
  history no longer held, and is subscribed again (with one subscription). Until it calls
  `catch_up/1` it receives nothing on `topic`.

  In the `:phoenix_pubsub` and `{:mfa, _}` modes this is `subscribe/1` plus a warning,
  `[ExAtlas.Fly.Dispatcher] subscribe_with_backpressure/2 only works in :registry mode;
  falling back to plain subscribe/1`, logged once per start of the `:ex_atlas`
  application and mode. Raises `ArgumentError` when `topic` is not a binary.
  """
  @spec subscribe_with_backpressure(topic(), keyword()) :: :ok
  def subscribe_with_backpressure(topic, opts \\ []) do
    check_topic!(topic)
    ExAtlas.Fly.Dispatcher.Watchdog.subscribe(topic, opts)
  end

  @doc """
  For a subscriber parked by `subscribe_with_backpressure(topic, on_slow: :catch_up)`,
  which was sent `{:ex_atlas_fly_behind, topic}`: sends the caller what was dispatched to
  `topic` while it was parked, oldest first, then subscribes it again. Call it from the
  subscriber itself (a LiveView's `handle_info/2`).

  Options:

    * `:max` - a positive integer, or `:infinity` (the default). With a number, it sends
      the caller at most that many messages; if more are kept, it stays parked and sends
      itself `{:ex_atlas_fly_behind, topic}` after them, so that it comes back for more
      once it has handled those. A subscriber that is behind is then never sent more
      than it asked for at once.

  The guarantee: every dispatch to `topic` reaches the caller exactly once, either as the
  message or inside the `missed` count of a `{:ex_atlas_fly_gap, topic, missed}` notice
  placed where it would have been; and the messages of each producer arrive in the order
  it dispatched them, across the parking (for a subscriber with an off-heap message queue
  too). Before sending anything it waits, in a plain `receive`, until the dispatches from
  before it was parked have been delivered to it: at most as long as the lanes take to
  send what they hold, unless a producer is suspended in the middle of such a dispatch.
  Like a replay, it costs the caller, not the producers: nobody waits for it, and if it
  falls further behind while it catches up, it is cut and told, as a joiner is.

  Returns `:ok`; at once when the caller is not parked on `topic` (a notice it already
  acted on, or a subscription that ended), and in the `:phoenix_pubsub` and `{:mfa, _}`
  modes. Raises `ArgumentError` when `topic` is not a binary or an option is bad.
  """
  @spec catch_up(topic(), keyword()) :: :ok
  def catch_up(topic, opts \\ []) do
    check_topic!(topic)
    max = catch_up_max!(opts)

    case Config.backend() do
      {Backend.Registry, _} -> Backend.Registry.unpark(topic, max)
      _other_mode -> :ok
    end
  end

  defp catch_up_max!(opts) when is_list(opts) do
    case opts do
      [] ->
        :infinity

      [max: max] when (is_integer(max) and max > 0) or max == :infinity ->
        max

      [max: max] ->
        raise ArgumentError,
              "expected :max to be a positive integer or :infinity, got: #{inspect(max)}"

      _ ->
        raise ArgumentError,
              "expected catch_up/2 options to be [] or [max: n], got: #{inspect(opts)}"
    end
  end

  defp catch_up_max!(opts) do
    raise ArgumentError,
          "expected catch_up/2 options to be a keyword list, got: #{inspect(opts)}"
  end

  @doc """
  Returns once every message the calling process dispatched before is in its
  subscribers' mailboxes.

  In the `:phoenix_pubsub` and `:mfa` modes dispatch is already synchronous and this
  returns `:ok` at once.
  """
  @spec sync() :: :ok
  def sync do
    {backend, arg} = Config.backend()
    backend.sync(arg)
  end

  @doc """
  `sync(:cluster)`: in cluster mode, returns once everything the caller dispatched before
  is in its subscribers' mailboxes on this node and on every other connected node; a
  barrier through each node's link and relay, one message each way per node. Returns
  `{:error, {:no_answer, nodes}}` when some nodes did not answer within `timeout` ms
  (default 5 000), for example a node suspended or cut off; answers that come later are
  discarded (they go to a process alias that is gone by then), never left in the
  caller's mailbox. Outside cluster mode it is `sync/0`.
  """
  @spec sync(:cluster, timeout()) :: :ok | {:error, {:no_answer, [node()]}}
  def sync(:cluster, timeout \\ 5_000) do
    case Config.backend() do
      {Backend.Registry, _} -> Cluster.sync(timeout)
      {backend, arg} -> backend.sync(arg)
    end
  end

  @doc """
  Number of subscriptions to `topic` (duplicates counted), in constant time.

  Only the `:registry` mode keeps subscribers; the other modes return `0`.
  """
  @spec count(topic()) :: non_neg_integer()
  def count(topic) do
    check_topic!(topic)
    {backend, arg} = Config.backend()
    backend.count(topic, arg)
  end

  @doc """
  The subscribers of `topic`, one entry per subscription, like `Registry.lookup/2`.

  Only the `:registry` mode keeps subscribers; the other modes return `[]`.
  """
  @spec subscribers(topic()) :: [pid()]
  def subscribers(topic) do
    check_topic!(topic)
    {backend, arg} = Config.backend()
    backend.subscribers(topic, arg)
  end

  @doc """
  The registry's figures, for dashboards and metrics pollers (`:telemetry_poller`,
  PromEx, LiveDashboard); counters count since the registry started.

    * `:subscriptions` - subscriptions, duplicates counted; `:topics` - topics with at
      least one subscription; `:subscribers` - distinct subscribed processes;
    * `:lanes` - fan-out lanes (one sender process each) and `:queue_capacity`, the
      dispatches each lane may hold in flight;
    * `:in_flight` - batches handed to the senders and not yet delivered, all lanes
      together (a batch is one dispatch's share of one lane); `:peak_in_flight` - the
      most any one lane has held;
    * `:delivered_batches` - batches delivered by the senders;
    * `:dispatches` - `dispatch/2` calls made to this node's registry (each counted
      once, whatever its number of subscribers; in cluster mode also those the relay
      dispatches for other nodes);
    * `:deliveries` - messages sent to subscriptions by those dispatches, on every path
      (a small topic's producer sending itself, a lane's sender, `delivery: :dirty`);
      a subscription counts once per dispatch, duplicates each, and a subscriber that
      has exited but is not yet removed counts too. Replayed messages (`subscribe/2`)
      are not counted. After `sync/0` it counts everything the caller dispatched;
    * `:waiting` - producers waiting for room in a full lane now (see the `:wait`
      telemetry events);
    * `:lost_batches`, `:lost_deliveries` - what senders that exited had not delivered;
    * `:replay_messages`, `:replay_bytes` - the dispatches kept for replay (see
      `subscribe/2`), over all topics, and their size as accounted against
      `:replay_memory`; `0` when `:replay` is `0`;
    * `:cluster` - in cluster mode, per node with a link (connected, or away for less
      than twice the 10 s hold time), the messages queued for it (`:queued`,
      unacknowledged ones included) and those dropped for it since its link started
      (`:dropped`: queue full, lost with the connection or its relay, or away longer
      than the hold time; see the README); `%{}` outside cluster mode.

  Counting topics walks all of them on a dirty scheduler: poll it every few seconds, not
  per dispatch. Raises `ArgumentError` in `:registry` mode when no registry runs. The
  `:phoenix_pubsub` and `{:mfa, _}` modes keep no subscribers and no lanes: every figure
  is `0` and `:cluster` is `%{}`, as `count/1` answers `0` there.

      iex> stats = ExAtlas.Fly.Dispatcher.stats()
      iex> stats.lanes > 0 and stats.cluster == %{}
      true
  """
  @spec stats() :: stats()
  def stats do
    {backend, arg} = Config.backend()
    backend.stats(arg)
  end

  @doc """
  True when the configured mode needs the registry process (the `:registry` mode, or
  `:phoenix_pubsub` falling back to it).
  """
  @spec needs_registry?() :: boolean()
  def needs_registry?, do: Config.registry_mode?()

  @doc """
  The registered name of the registry's server process (ExAtlas 0.5.0 returned an Elixir
  `Registry` here). It is not a `Registry`: `Registry.lookup(registry_name(), topic)`
  fails with "unknown registry". `subscribers/1` replaces it (one pid per subscription;
  `for pid <- subscribers(topic), do: {pid, nil}` has `Registry.lookup/2`'s shape), and
  `count/1` replaces counting its result.
  """
  @spec registry_name() :: atom()
  def registry_name, do: @registry

  @doc """
  A child specification that starts the registry and its slow-consumer watchdog (see
  `subscribe_with_backpressure/2`) under a small supervisor, for hosts that run them in
  their own supervision tree (with `config :ex_atlas, :fly, enabled: false`).

  Starting it while a registry already runs is harmless: the child is ignored, and a
  warning names the options it was given, which cannot take effect then.
  Options, overriding the application environment: `:lanes` (1 to 1 024; the deprecated
  `:sender_threads` still works, with a warning), `:queue_capacity` (1 to 1 000 000),
  `:delivery` (`:dirty` or `:scheduler`), `:cluster` (a boolean), `:cluster_queue`
  (1 to 10 000 000), `:replay` (0 to 1 000 000 dispatches kept per topic) and
  `:replay_memory` (bytes kept over all topics, at least 1).
  """
  @spec child_spec(keyword()) :: Supervisor.child_spec()
  def child_spec(opts \\ []) do
    opts = check_child_opts!(opts)

    %{
      id: __MODULE__,
      start: {ExAtlas.Fly.Dispatcher.Supervisor, :start_link, [opts]},
      type: :supervisor
    }
  end

  defp check_child_opts!(opts) when is_list(opts) do
    # Enum.each/2 would fail with FunctionClauseError at an improper tail.
    if List.improper?(opts) do
      raise ArgumentError,
            "expected child_spec options to be a keyword list, got: #{inspect(opts)}"
    end

    Enum.each(opts, fn
      {:lanes, value} ->
        Config.check_lanes!(value, ":lanes")

      # Deprecated; Config.lanes/1 warns when the registry starts.
      {:sender_threads, value} ->
        Config.check_lanes!(value, ":sender_threads")

      {:queue_capacity, value} ->
        Config.check_queue_capacity!(value, ":queue_capacity")

      {:delivery, value} ->
        Config.check_delivery!(value, ":delivery")

      {:cluster, value} ->
        Config.check_cluster!(value, ":cluster")

      {:cluster_queue, value} ->
        Config.check_cluster_queue!(value, ":cluster_queue")

      {:replay, value} ->
        Config.check_replay!(value, ":replay")

      {:replay_memory, value} ->
        Config.check_replay_memory!(value, ":replay_memory")

      other ->
        raise ArgumentError,
              "unknown ExAtlas.Fly.Dispatcher option #{inspect(other)}; expected " <>
                ":lanes, :queue_capacity, :delivery, :cluster, :cluster_queue, :replay " <>
                "or :replay_memory"
    end)

    opts
  end

  defp check_child_opts!(other) do
    raise ArgumentError,
          "expected child_spec options to be a keyword list, got: #{inspect(other)}"
  end

  @doc false
  @spec check_topic!(term()) :: :ok
  def check_topic!(topic) when is_binary(topic), do: :ok

  def check_topic!(topic) do
    raise ArgumentError, "expected topic to be a binary, got: #{inspect(topic)}"
  end
end
