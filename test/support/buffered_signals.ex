defmodule ExAtlas.Test.BufferedSignals do
  @moduledoc """
  Subscribers whose signal queue is in OTP's buffered mode, to test per-producer order.

  For a receiver with `message_queue_data: :off_heap`, OTP 25 may install signal buffers
  (the parallel signal sending optimization): each sender's messages go into one of a
  fixed set of buffers chosen from the sender's pid, and the receiver, when it next
  fetches, moves the buffers into its queue one after the other, in buffer order, not in
  the order the messages were sent. Two messages from different senders that are both
  still buffered at that fetch come out in an order fixed by the two senders' pids (the
  same pair always gives the same order), so about half of all pairs of fresh senders
  arrive reversed, even when one send happened before the other.

  Two conditions make it show, and this harness arranges both:

    * the buffered mode is on: forced in the subscriber with the VM's test switch
      (`:erts_debug.set_internal_state(:proc_sig_buffers, true)`);
    * both messages are still in the buffers when the subscriber fetches. A subscriber
      waiting in `receive` fetches each message as it arrives, so order is kept by
      accident; a subscriber busy with something else fetches nothing. So the subscriber
      is *held*: it spins, without receiving, until the test releases it through an
      `:atomics` (reading one is no signal). Every non-message signal sent to it while
      held (a monitor, a link, `Process.info/2` from another process, suspend/resume)
      flushes its buffers into its queue in order, which hides the reversal: nothing
      here sends one while it is held.

  `calibrate/1` proves that the harness reverses causally ordered plain sends.
  """

  @hold_limit_ms 60_000

  @typedoc "A subscriber started by `start_subscriber/2`."
  @type subscriber :: %{pid: pid(), gate: :atomics.atomics_ref(), buffered: boolean()}

  @doc """
  Lets processes of this VM use `:erts_debug.set_internal_state/2` (a VM-wide switch,
  turned on once). The VM logs a warning when it is turned on; it reaches the logger
  through `:logger_proxy`, asynchronously, so the capture waits until that process
  handled it. Called by `start_subscriber/2`.
  """
  @spec enable_internal_state() :: :ok
  def enable_internal_state do
    if :persistent_term.get({__MODULE__, :internal_state}, false) do
      :ok
    else
      ExUnit.CaptureLog.capture_log(fn ->
        _previous = :erts_debug.set_internal_state(:available_internal_state, true)
        proxy = Process.whereis(:logger_proxy)
        if proxy, do: :sys.get_state(proxy)
        Logger.flush()
      end)

      :persistent_term.put({__MODULE__, :internal_state}, true)
    end
  end

  @doc """
  Starts a linked subscriber of `topics` (subscribed through `ExAtlas.Fly.Dispatcher`)
  that records every message it receives, in order, and returns once it is subscribed.

  Options: `off_heap:` (default true) sets `message_queue_data: :off_heap`; `buffered:`
  (default: the value of `off_heap`) forces the buffered signal queue, which the VM only
  has for off-heap receivers; `subscribe:` (default `&ExAtlas.Fly.Dispatcher.subscribe/1`)
  is called with each topic in the subscriber.
  """
  @spec start_subscriber([binary()], keyword()) :: subscriber()
  def start_subscriber(topics, opts \\ []) do
    off_heap = Keyword.get(opts, :off_heap, true)
    buffered = Keyword.get(opts, :buffered, off_heap)
    subscribe = Keyword.get(opts, :subscribe, &ExAtlas.Fly.Dispatcher.subscribe/1)
    enable_internal_state()
    gate = :atomics.new(1, signed: false)
    parent = self()
    ref = make_ref()
    pid = spawn_link(fn -> init(parent, ref, {topics, subscribe}, off_heap, buffered, gate) end)

    receive do
      {^ref, :ready, ^buffered} -> %{pid: pid, gate: gate, buffered: buffered}
      {^ref, :ready, other} -> raise "buffered mode #{inspect(other)}, asked for #{buffered}"
    after
      10_000 -> raise "subscriber #{inspect(pid)} did not start"
    end
  end

  defp init(parent, ref, {topics, subscribe}, off_heap, buffered, gate) do
    if off_heap, do: Process.flag(:message_queue_data, :off_heap)

    forced = buffered and :erts_debug.set_internal_state(:proc_sig_buffers, true)

    for topic <- topics, do: :ok = subscribe.(topic)
    send(parent, {ref, :ready, forced})
    loop(gate, [])
  end

  defp loop(gate, seen) do
    receive do
      {__MODULE__, :hold, from, ref} ->
        send(from, {ref, :held})
        spin(gate, System.monotonic_time(:millisecond) + @hold_limit_ms)
        loop(gate, seen)

      {__MODULE__, :collect, from, ref, count, quiet_ms} ->
        seen = gather(seen, length(seen), count, quiet_ms)
        send(from, {ref, Enum.reverse(seen)})
        loop(gate, [])

      {__MODULE__, :stop} ->
        :ok

      message ->
        loop(gate, [message | seen])
    end
  end

  # Busy, fetching nothing, until released (or a limit that only guards a lost test).
  defp spin(gate, deadline) do
    cond do
      :atomics.get(gate, 1) != 0 -> :ok
      System.monotonic_time(:millisecond) > deadline -> :ok
      true -> spin(gate, deadline)
    end
  end

  defp gather(seen, n, count, _quiet_ms) when n >= count, do: seen

  defp gather(seen, n, count, quiet_ms) do
    receive do
      {__MODULE__, _, _, _} = control -> raise "unexpected #{inspect(control)}"
      message -> gather([message | seen], n + 1, count, quiet_ms)
    after
      quiet_ms -> seen
    end
  end

  @doc """
  Holds `subscriber`: once this returns, it spins without fetching any signal until
  `release/1`. Messages sent to it meanwhile stay in its signal buffers.
  """
  @spec hold(subscriber()) :: :ok
  def hold(%{pid: pid, gate: gate}) do
    :atomics.put(gate, 1, 0)
    ref = make_ref()
    send(pid, {__MODULE__, :hold, self(), ref})

    receive do
      {^ref, :held} -> :ok
    after
      10_000 -> raise "subscriber #{inspect(pid)} could not be held"
    end
  end

  @doc "Lets a held subscriber go back to receiving."
  @spec release(subscriber()) :: :ok
  def release(%{gate: gate}), do: :atomics.put(gate, 1, 1)

  @doc """
  The messages `subscriber` received since the last collect, in arrival order: waits
  until there are `count`, or until none came for `quiet_ms` (for tests where some may
  be lost). Only the subscriber's own messages: the collect request is matched first only
  once the subscriber is back in its loop.
  """
  @spec collect(subscriber(), non_neg_integer(), non_neg_integer()) :: [term()]
  def collect(%{pid: pid}, count, quiet_ms \\ 10_000) do
    ref = make_ref()
    send(pid, {__MODULE__, :collect, self(), ref, count, quiet_ms})

    receive do
      {^ref, seen} -> seen
    after
      quiet_ms + 60_000 -> raise "no collect answer from #{inspect(pid)}"
    end
  end

  @doc "Stops `subscriber`."
  @spec stop(subscriber()) :: :ok
  def stop(%{pid: pid}) do
    send(pid, {__MODULE__, :stop})
    :ok
  end

  @doc """
  Order violations in `messages` (arrival order): for each `{:seq, producer, n}` whose
  `n` is not greater than the last one seen from the same producer,
  `{producer, previous, n}`. Other messages are ignored.
  """
  @spec violations([term()]) :: [{term(), integer(), integer()}]
  def violations(messages) do
    {bad, _last} =
      Enum.reduce(messages, {[], %{}}, fn
        {:seq, producer, n}, {bad, last} ->
          bad =
            case last do
              %{^producer => previous} when previous >= n -> [{producer, previous, n} | bad]
              _ -> bad
            end

          {bad, Map.put(last, producer, n)}

        _other, acc ->
          acc
      end)

    Enum.reverse(bad)
  end

  @typedoc "What a producer does, in order (see `produce/2`)."
  @type step ::
          {:dispatch, binary(), term()}
          | :sync
          | {:sync, :cluster}
          | {:kill_sender, non_neg_integer()}
          | {:suspend, pid()}
          | {:resume, pid()}

  @doc """
  Runs `steps` in a fresh process on `node` (whose pid, and so whose signal buffer,
  differs from any before) and returns once it finished; raises if a step failed.
  A fresh producer per trial is what makes the reversal likely: which of two senders'
  buffers is fetched first depends on the two pids only.

  `{:suspend, pid}` and `{:resume, pid}` suspend and resume a local process from the
  producer (a process that dies resumes what it suspended). `{:kill_sender, lane}` kills
  the current sender of lane `rem(lane, lanes)` (`ExAtlas.Fly.Dispatcher.Server.senders/0`)
  with `Process.exit(sender, :kill)` and waits until it is dead.
  """
  @spec produce([step()], node()) :: :ok
  def produce(steps, node \\ node()) do
    ref = make_ref()
    pid = Node.spawn(node, __MODULE__, :run_steps, [self(), ref, steps])
    monitor = Process.monitor(pid)

    receive do
      {^ref, :done} ->
        Process.demonitor(monitor, [:flush])
        :ok

      {:DOWN, ^monitor, :process, ^pid, reason} ->
        raise "producer #{inspect(pid)} failed: #{inspect(reason)}"
    after
      60_000 -> raise "producer #{inspect(pid)} did not finish"
    end
  end

  @doc false
  def run_steps(parent, ref, steps) do
    Enum.each(steps, &step/1)
    send(parent, {ref, :done})
  end

  defp step({:dispatch, topic, message}),
    do: :ok = ExAtlas.Fly.Dispatcher.dispatch(topic, message)

  defp step(:sync), do: :ok = ExAtlas.Fly.Dispatcher.sync()
  defp step({:sync, :cluster}), do: :ok = ExAtlas.Fly.Dispatcher.sync(:cluster)
  defp step({:suspend, pid}), do: true = :erlang.suspend_process(pid)
  defp step({:resume, pid}), do: true = :erlang.resume_process(pid)

  # Returns once the sender is dead, so that what is dispatched next finds it gone (and,
  # with the server suspended, parks) rather than dying in its mailbox.
  defp step({:kill_sender, lane}) do
    senders = ExAtlas.Fly.Dispatcher.Server.senders()
    sender = Enum.at(senders, rem(lane, length(senders)))
    monitor = Process.monitor(sender)
    Process.exit(sender, :kill)
    receive do: ({:DOWN, ^monitor, :process, _, _} -> true)
  end

  @doc """
  The self-check: `trials` times, a held buffered subscriber gets `{:seq, :plain, 1}`
  from a fresh process, which then tells a second fresh process to send
  `{:seq, :plain, 2}`: causally ordered plain sends, no library involved. Returns
  `{reversed, trials}` for a subscriber started with `opts` (see `start_subscriber/2`).
  With the buffered mode forced, about half the trials arrive reversed; on-heap, none.
  """
  @spec calibrate(pos_integer(), keyword()) :: {non_neg_integer(), pos_integer()}
  def calibrate(trials, opts \\ []) do
    subscriber = start_subscriber([], opts)
    pid = subscriber.pid

    reversed =
      Enum.count(1..trials, fn _ ->
        :ok = hold(subscriber)
        done = make_ref()
        parent = self()

        second =
          spawn(fn ->
            receive do
              :go -> send(pid, {:seq, :plain, 2})
            end

            send(parent, done)
          end)

        spawn(fn ->
          send(pid, {:seq, :plain, 1})
          send(second, :go)
        end)

        receive do
          ^done -> :ok
        after
          10_000 -> raise "calibration senders did not finish"
        end

        :ok = release(subscriber)

        case collect(subscriber, 2) do
          [{:seq, :plain, 1}, {:seq, :plain, 2}] -> false
          [{:seq, :plain, 2}, {:seq, :plain, 1}] -> true
          other -> raise "calibration got #{inspect(other)}"
        end
      end)

    :ok = stop(subscriber)
    {reversed, trials}
  end
end
