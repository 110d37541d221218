defmodule ExAtlas.Fly.Dispatcher.Backend.Registry do
  @moduledoc false
  # The default mode: the Rust NIF registry, with fan-out by one sender process per lane.

  @behaviour ExAtlas.Fly.Dispatcher.Backend

  require Logger

  alias ExAtlas.Fly.Dispatcher.{Cluster, Config, Native, ReplyAlias, Sender, Server, Telemetry}

  @room :"$ex_atlas_room"
  @successor_poll_ms 5

  @impl true
  def subscribe(topic, _arg), do: subscribe_replay(topic, 0)

  @doc """
  Subscribes the caller to `topic`, first delivering to it the `replay` most recent
  dispatches kept for the topic (as many as are kept, when fewer).
  """
  @spec subscribe_replay(binary(), non_neg_integer()) :: :ok
  def subscribe_replay(topic, replay) do
    # OTP orders messages per sending process only, and may fetch an off-heap queue's
    # messages from different senders out of the order they were sent: such a
    # subscriber gets every message from the dispatching process itself.
    {:message_queue_data, queue} = Process.info(self(), :message_queue_data)
    dispatcher = dispatcher!()
    direct = queue == :off_heap

    result =
      case replay > 0 and Native.join(dispatcher, topic, replay, direct) do
        :ok ->
          catch_up(dispatcher, topic)

        :plain ->
          warn_nothing_kept(dispatcher, topic, replay)
          Native.subscribe(dispatcher, topic, direct)

        false ->
          Native.subscribe(dispatcher, topic, direct)

        other ->
          other
      end

    case result do
      :ok -> :ok
      # The caller is exiting (its monitor could not be set): nothing to keep, and it will
      # never read a message, as with Registry.register/3 from a dying process.
      :not_alive -> :ok
      # Its subscription was removed while it caught up (the watchdog evicted it, which
      # tells it so): as if it had subscribed, then been evicted.
      :removed -> :ok
      :closed -> not_running!(:call)
      :too_many_topics -> raise ArgumentError, "the registry holds too many topics (2^32)"
    end
  end

  # A replay asked of a registry that keeps nothing (`replay: 0`, the default) is a
  # plain subscribe; said once per registry start, not per call.
  defp warn_nothing_kept(dispatcher, topic, replay) do
    key = {__MODULE__, :warned_nothing_kept}

    if :persistent_term.get(key, nil) != dispatcher do
      :persistent_term.put(key, dispatcher)

      Logger.warning(
        "[ExAtlas.Fly.Dispatcher] subscribe/2 asked for replay: #{replay}, but no " <>
          "dispatch is kept (config :ex_atlas, :fly, replay: 0): nothing to replay " <>
          "(topic #{inspect(topic)}, subscriber #{inspect(self())}; said once per " <>
          "registry start)",
        topic: topic
      )
    end

    :ok
  end

  # The caller sends itself its history, a timeslice at a time, while dispatches to the
  # topic are kept for it in the NIF; once it has sent itself the last, the NIF adds it to
  # the registry, under the lock every dispatch to the topic takes. Nobody waits for it:
  # if it falls too far behind, what was not kept for it is skipped, and it tells itself
  # so ({:ex_atlas_fly_gap, topic, missed}, in its place in the stream). Before each call
  # it fetches its signal queue (a receive does that), so that what it sent itself is in
  # its message queue before anything is sent to it live: OTP may otherwise buffer a
  # process's signals per sender, and then fetch a live message from another process
  # ahead of them.
  @doc false
  @spec catch_up(Native.dispatcher(), binary()) :: atom()
  def catch_up(dispatcher, topic) do
    case Native.replay(dispatcher, topic) do
      :more ->
        fetch_signals()
        catch_up(dispatcher, topic)

      {:gap, missed} ->
        Telemetry.replay_cut(topic, self(), missed)
        fetch_signals()
        catch_up(dispatcher, topic)

      done ->
        done
    end
  end

  @doc """
  `ExAtlas.Fly.Dispatcher.catch_up/2`: the caller, parked on `topic` by the watchdog
  (`on_slow: :catch_up`), sends itself what was kept for it, then is back in the registry;
  with `max` (a positive integer) at most that many messages, and then, if more are kept,
  it is parked again and sends itself `{:ex_atlas_fly_behind, topic}` after them. It first
  waits (in a plain `receive`, a millisecond or more at a time) while dispatches from
  before it was parked are still being sent to it: one of them would otherwise reach it
  after a later one of the same producer. `:ok` at once when it is not parked.
  """
  @spec unpark(binary(), pos_integer() | :infinity) :: :ok
  def unpark(topic, max \\ :infinity) do
    dispatcher = dispatcher!()
    unpark(dispatcher, topic, max, 1)
  end

  defp unpark(dispatcher, topic, max, pause) do
    case Native.unpark(dispatcher, topic) do
      :ok ->
        # What those sent it is fetched before anything it sends itself.
        fetch_signals()

        result =
          if max == :infinity,
            do: catch_up(dispatcher, topic),
            else: catch_up_to(dispatcher, topic, max)

        case result do
          :closed -> not_running!(:call)
          :too_many_topics -> raise ArgumentError, "the registry holds too many topics (2^32)"
          # :ok (back in the registry, or parked again with more to come), or removed or
          # exiting meanwhile, as subscribe_replay/2 answers.
          _ -> :ok
        end

      :wait ->
        receive do
        after
          pause -> unpark(dispatcher, topic, max, min(pause * 2, 16))
        end

      :not_parked ->
        :ok
    end
  end

  # catch_up/2 with at most `left` more messages: then parked again, and told to come
  # back (its notice after what it sent itself).
  defp catch_up_to(dispatcher, topic, left) when left > 0 do
    case Native.replay_up_to(dispatcher, topic, min(left, 64)) do
      {:more, sent} ->
        fetch_signals()
        catch_up_to(dispatcher, topic, left - sent)

      {:gap, missed, sent} ->
        Telemetry.replay_cut(topic, self(), missed)
        fetch_signals()
        catch_up_to(dispatcher, topic, left - sent)

      done ->
        done
    end
  end

  defp catch_up_to(dispatcher, topic, _left) do
    case Native.repark(dispatcher, topic) do
      :ok ->
        send(self(), {:ex_atlas_fly_behind, topic})
        :ok

      # Removed meanwhile (unsubscribed, evicted): nothing more comes.
      :not_joining ->
        :removed
    end
  end

  @doc """
  For the watchdog: one more (`true`) or one fewer `on_slow: :catch_up` watch on `topic`.
  Raises `ArgumentError` when the registry keeps no history (`replay: 0`), which
  `:catch_up` needs, or when no registry runs.
  """
  @spec watch_parking(binary(), boolean()) :: :ok
  def watch_parking(topic, more) do
    case Native.watch_parking(dispatcher!(), topic, more) do
      :ok ->
        :ok

      :plain ->
        raise ArgumentError,
              "on_slow: :catch_up needs the registry to keep recent dispatches, and it " <>
                "keeps none: set `config :ex_atlas, :fly, replay: n` (n > 0, with " <>
                "`replay_memory:` as its bound), or use on_slow: :skip"
    end
  end

  @doc """
  For the watchdog: parks `pid` on `topic` (`on_slow: :catch_up`). True when it is parked
  now (by this call or an earlier one); false when it could not be: it has no
  subscription to `topic`, or it is catching up on it (not yet back in the registry; a
  later poll parks it, if it is still behind then). Raises `ArgumentError` when no
  registry runs.
  """
  @spec park(binary(), pid()) :: boolean()
  def park(topic, pid) do
    direct = Process.info(pid, :message_queue_data) == {:message_queue_data, :off_heap}
    Native.park(dispatcher!(), topic, pid, direct) in [:ok, :parked]
  end

  @doc """
  For the watchdog: whether `pid` is parked on `topic` now (false when no registry runs:
  its parking went with it).
  """
  @spec parked?(binary(), pid()) :: boolean()
  def parked?(topic, pid) do
    case Server.lookup() do
      nil -> false
      dispatcher -> Native.is_parked(dispatcher, topic, pid)
    end
  end

  defp fetch_signals do
    ref = make_ref()

    receive do
      ^ref -> :ok
    after
      0 -> :ok
    end
  end

  @impl true
  def unsubscribe(topic, _arg) do
    :ok = Native.unsubscribe(dispatcher!(), topic)
  end

  @impl true
  def dispatch(topic, message, _arg) do
    # This node first, then, in cluster mode, the other nodes. Order is kept per node, so
    # which node starts first does not matter to it; a dispatch that raises reaches no
    # node.
    if deliver_here(topic, message), do: Cluster.forward(topic, message), else: :ok
  end

  @doc """
  Dispatches to this node's subscribers only (the cluster relay's way in).
  """
  @spec dispatch_local(binary(), term()) :: :ok
  def dispatch_local(topic, message) do
    _forward? = deliver_here(topic, message)
    :ok
  end

  # Hands the dispatch to this node's lanes (waiting for room if need be). True when the
  # other nodes may need it too: the NIF answered :forward (a relay is set), or the
  # dispatch had to wait, which the NIF does not answer for; Cluster.forward/2 then finds
  # out itself.
  defp deliver_here(topic, message, retry? \\ true) do
    case Native.dispatch(topic, message) do
      :ok ->
        false

      :forward ->
        true

      # A lane was full, or the timeslice ran out: the rest waits in `pending`.
      {full_or_more, pending} when full_or_more in [:full, :more] ->
        :ok = make_room(pending, topic, message)
        true

      # No registry: start it if the mode was switched to :registry at runtime (see
      # dispatcher!/0), or raise naming why it is not running.
      :closed when retry? ->
        _ = dispatcher!()
        deliver_here(topic, message, false)

      :closed ->
        not_running!(:call)
    end
  end

  # A lane was full. The rest of the dispatch waits in `pending`; the caller queues for
  # the lane's next free credit and waits for it in a plain receive (`await_room/2`, the
  # current function a waiting producer shows), holding no scheduler thread: it can be
  # killed, inspected and preempted as usual. Credits are handed out first come, first
  # served; one freed by a delivered (or dropped) batch comes with exactly one
  # {:"$ex_atlas_room", pending} message, so nothing is left in the mailbox. Only a real
  # wait (a `:wait` answer) is reported to telemetry, as one start/stop span however
  # many lanes it waits for in turn.
  #
  # `{:more, pending}` (and `:more` from resume) means the caller's timeslice ran out
  # with messages it sends itself still to send: calling again lets the VM preempt it
  # first, as a send loop would be.
  defp make_room(pending, topic, message) do
    case Native.resume(pending, message) do
      :ok ->
        :ok

      :more ->
        make_room(pending, topic, message)

      :wait ->
        span = Telemetry.wait_start(topic)
        result = await_room(pending, message)
        Telemetry.wait_stop(span)
        if result == :closed, do: not_running!(:waiting), else: :ok

      :closed ->
        not_running!(:waiting)
    end
  end

  defp await_room(pending, message) do
    receive do
      {@room, ^pending} -> :ok
    end

    go_on(pending, message)
  end

  defp go_on(pending, message) do
    case Native.resume(pending, message) do
      :wait -> await_room(pending, message)
      :more -> go_on(pending, message)
      done -> done
    end
  end

  # Every sender handles a caller's requests in the order the caller made them, so once
  # each has answered, everything the caller dispatched before is delivered. A sender
  # that dies first had its undelivered batches counted and logged as lost, but what
  # reached its lane after it died is parked for its successor: ask that one too (it
  # pulls what is parked before it answers). Once the registry is closed nothing more is
  # delivered, and there is nothing left to wait for.
  #
  # The senders answer to a process alias, not to the caller's pid: once this returns
  # (or the caller gives up, killed in the wait) no answer reaches the caller's mailbox.
  @impl true
  def sync(_arg) do
    dispatcher = dispatcher!()

    ReplyAlias.within(Sender.synced_tag(), fn reply_to ->
      dispatcher
      |> Native.senders()
      |> Enum.with_index(fn sender, lane -> ask(sender, lane, reply_to) end)
      |> Enum.each(&await_sender(&1, dispatcher, reply_to))
    end)
  end

  defp ask(sender, lane, reply_to) when is_pid(sender) do
    ref = make_ref()
    # One ref and one monitor per sender, matched exactly: the caller's own messages (a
    # host's :DOWN messages included) stay in its mailbox untouched.
    monitor = Process.monitor(sender)
    :ok = Sender.request_sync(sender, reply_to, ref)
    {lane, sender, ref, monitor}
  end

  defp ask(:undefined, lane, _reply_to), do: {lane, :undefined, nil, nil}

  defp await_sender({lane, :undefined, nil, nil}, dispatcher, reply_to),
    do: successor(lane, :undefined, dispatcher, reply_to)

  defp await_sender({lane, sender, ref, monitor}, dispatcher, reply_to) do
    tag = Sender.synced_tag()

    receive do
      {^tag, ^ref} ->
        Process.demonitor(monitor, [:flush])
        :ok

      {:DOWN, ^monitor, :process, _, _} ->
        successor(lane, sender, dispatcher, reply_to)
    end
  end

  # The sender of `lane` after `gone`; the server starts one at once, so this waits in
  # short steps only while that happens (or while a restarted server adopts the registry).
  defp successor(lane, gone, dispatcher, reply_to) do
    next = if Server.lookup() == dispatcher, do: Enum.at(Native.senders(dispatcher), lane)

    cond do
      next == nil ->
        :ok

      is_pid(next) and next != gone ->
        await_sender(ask(next, lane, reply_to), dispatcher, reply_to)

      true ->
        receive after: (@successor_poll_ms -> successor(lane, gone, dispatcher, reply_to))
    end
  end

  @impl true
  def count(topic, _arg), do: Native.count(dispatcher!(), topic)

  @impl true
  def subscribers(topic, _arg), do: Native.subscribers(dispatcher!(), topic)

  @doc """
  Removes every subscription of `pid` to `topic`; returns how many went.
  """
  @spec evict(binary(), pid()) :: non_neg_integer()
  def evict(topic, pid), do: Native.unsubscribe_pid(dispatcher!(), topic, pid)

  # The NIF's figures that `ExAtlas.Fly.Dispatcher.stats/0` publishes: those of
  # `Backend.zero_stats/0` but `:cluster`. `monitors`, `max_in_flight` and
  # `allocated_bytes` (alloc-stats builds) are for our tests.
  @public_stats Map.keys(ExAtlas.Fly.Dispatcher.Backend.zero_stats()) -- [:cluster]

  @impl true
  def stats(_arg) do
    stats() |> Map.take(@public_stats) |> Map.put(:cluster, Cluster.stats())
  end

  @doc "Every figure the NIF reports, internal ones included."
  @spec stats() :: %{atom() => non_neg_integer()}
  def stats do
    dispatcher = dispatcher!()
    {skipping, skipped, entries} = Native.skip_stats(dispatcher)
    stats = dispatcher |> Native.stats() |> Map.new()
    # Parked `:catch_up` subscriptions are skipped too, until they catch up.
    skipping = skipping + Map.get(stats, :replay_parked, 0)
    Map.merge(stats, %{skipping: skipping, skipped: skipped, skip_entries: entries})
  end

  @doc """
  `on_slow: :skip`, for the watchdog: starts skipping `pid`'s dispatches on `topic`
  (`:start`); stops, returning how many were skipped, which the next message to `pid` on
  `topic` is preceded by a gap notice of (`:stop`); forgets it, notice owed included
  (`:clear`). Raises `ArgumentError` when no registry runs.
  """
  @spec skip(:start | :stop | :clear, binary(), pid()) :: non_neg_integer()
  def skip(:start, topic, pid), do: ok_zero(Native.skip_start(dispatcher!(), topic, pid))
  def skip(:stop, topic, pid), do: Native.skip_stop(dispatcher!(), topic, pid)
  def skip(:clear, topic, pid), do: ok_zero(Native.skip_clear(dispatcher!(), topic, pid))

  defp ok_zero(:ok), do: 0

  @doc """
  The running dispatcher resource. When none runs but the `:ex_atlas` application does,
  without `enabled: false`, and its tree has no registry (it booted in another mode and
  the mode was switched to `:registry` at runtime), the registry is started there on
  demand. Otherwise raises `ArgumentError` naming why none runs.
  """
  @spec dispatcher!() :: Native.dispatcher()
  def dispatcher!, do: Server.lookup() || start_on_demand()

  # Supervisor.start_child/2 is serialised by the application's supervisor: of concurrent
  # first calls one starts the registry and the others find it started
  # ({:already_started, _}). A registry the tree already has (booted in :registry mode)
  # is never started twice: between its close and its restart by that supervisor, callers
  # get {:already_started, _} or wait for the restart inside the call, and then use it or
  # raise.
  defp start_on_demand do
    if on_demand?(), do: :ok = start_in_app_tree()
    Server.lookup() || not_running!(:call)
  end

  # Whatever comes of it, the caller looks the registry up afterwards.
  defp start_in_app_tree do
    spec = Supervisor.child_spec(ExAtlas.Fly.Dispatcher, [])

    _ =
      try do
        case Supervisor.start_child(ExAtlas.Supervisor, spec) do
          # A child spec left from an earlier start that was ignored (a host's registry
          # ran then).
          {:error, :already_present} ->
            _ = Supervisor.restart_child(ExAtlas.Supervisor, spec.id)

          # Started, started by a concurrent caller, or failed (then not_running!/1 says
          # why none runs).
          _started_or_not ->
            :ok
        end
      catch
        # The application's supervisor stopped during the call.
        :exit, _ -> :ok
      end

    :ok
  end

  defp on_demand? do
    Keyword.get(Config.fly(), :enabled, true) != false and
      Process.whereis(ExAtlas.Supervisor) != nil and not system_stopping?()
  end

  defp system_stopping?, do: match?({:stopping, _}, :init.get_status())

  # No registry runs. While the VM stops (:init.stop/0) the caller exits as the
  # subscribers do, with {:shutdown, :ex_atlas_dispatcher_closed}: a normal end, which
  # logs no crash report and gives no advice that does not apply. Otherwise
  # ArgumentError, naming the cause.
  @spec not_running!(:call | :waiting) :: no_return()
  defp not_running!(context) do
    if system_stopping?(), do: exit(Server.closed_reason())

    prefix =
      case context do
        :call ->
          "the ExAtlas.Fly.Dispatcher registry is not running: "

        :waiting ->
          "the ExAtlas.Fly.Dispatcher registry closed while this dispatch waited for room " <>
            "in a full lane (what it had not handed over is dropped); it is not running: "
      end

    raise ArgumentError, prefix <> not_running_cause()
  end

  @doc """
  Why no registry runs, and what to do, as the end of an error message.
  """
  @spec not_running_cause() :: String.t()
  def not_running_cause do
    cond do
      system_stopping?() ->
        "the VM is stopping (:init.stop/0)"

      Process.whereis(ExAtlas.Supervisor) == nil ->
        "the :ex_atlas application is not started (or is stopping). Start it " <>
          "(Application.ensure_all_started(:ex_atlas); it starts with the host unless " <>
          "the dependency has `runtime: false` or under `mix run --no-start`), or add " <>
          "ExAtlas.Fly.Dispatcher to your supervision tree"

      Keyword.get(Config.fly(), :enabled, true) == false ->
        "`config :ex_atlas, :fly, enabled: false` is set, so the registry runs only " <>
          "where your supervision tree starts it: add ExAtlas.Fly.Dispatcher to it (it is " <>
          "missing, not started yet, or was stopped)"

      true ->
        "it was closed (its supervisor stopped, was killed or gave up) and has not " <>
          "started again yet; calls work again once it has"
    end
  end
end
