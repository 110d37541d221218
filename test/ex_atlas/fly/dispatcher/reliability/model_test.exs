defmodule ExAtlas.Fly.Dispatcher.Reliability.RegistryModel do
  @moduledoc false
  # A `proper_statem` callback module: random sequences of subscribe (fresh, duplicate and
  # several at once), unsubscribe, dispatch, sync, process exit and faults of the lanes
  # over a few processes ("slots") and topics, run against the real registry and checked
  # against the pure model below.
  #
  # Each slot is a process that subscribes and unsubscribes itself when told to, and
  # keeps every message it did not get as a command until asked for them. Slots 0..3 keep
  # their message queue on the heap, slots 4..5 off it (they subscribe to the direct route:
  # the dispatching process sends to them itself). The test process is the only one that
  # dispatches, so `sync/0` in the test process puts every earlier dispatch in the
  # mailboxes, and the report request sent after it arrives behind them.
  #
  # Every route a dispatch can take is reached, and the run counts each time one was
  # taken (`routes/0`; the test asserts each was):
  #
  #   * inline: a small dispatch (at most 16 subscriptions on the lanes) to a lane where
  #     the producer has nothing on its way is sent by the producer itself;
  #   * the senders: a topic with more than 16 on-heap subscriptions (`subscribe_many`
  #     gives 17 at once), and any dispatch to a lane where the producer's earlier batch
  #     is not delivered yet;
  #   * direct: off-heap slots, always sent by the producer;
  #   * parked: `park_lanes` kills every sender while the server is suspended, so no lane
  #     has a live sender and what is handed to the lanes is parked until the server
  #     starts new senders, which take it over.
  #
  # The bad moments are placed, not waited for. `suspend_senders` suspends every sender:
  # until the next `sync`, what a dispatch put in the slots' mailboxes at once was sent by
  # the test process itself (a slot asked right after the dispatch answers behind it, as
  # both come from the test process), and what is missing went to a sender. Off-heap
  # slots must have it at once. The next `sync` lifts the fault through the holder
  # process, one suspended process at a time and each only while the test process is
  # blocked inside `sync/0`: a `sync/0` that returns while a process it must wait for is
  # still suspended is caught as such, whatever the timing.

  alias ExAtlas.Fly.Dispatcher
  alias ExAtlas.Fly.Dispatcher.Backend.Registry, as: RegistryBackend
  alias ExAtlas.Fly.Dispatcher.{Native, Server}

  @on_heap_slots 4
  @slots 6
  @topics ["model:a", "model:b", "", String.duplicate("model:long/", 8)]
  # Subscriptions `subscribe_many` adds at once (to an on-heap slot): past the 16 of a
  # small dispatch, so the topic's dispatches go to the senders.
  @many 17
  # Elements of a `{:big, n}` payload: one copy costs a send loop a whole timeslice in
  # 7 sends (one reduction per 64 words), so a lane of 8 subscriptions runs out of time:
  # the `:dirty` delivery goes on to a dirty scheduler, the caller to `resume/2`.
  @big 20_000
  @procs {__MODULE__, :procs}
  @holder {__MODULE__, :holder}
  @fault {__MODULE__, :fault}
  @routes {__MODULE__, :routes}
  @mismatch {__MODULE__, :mismatch}

  @spec topics() :: [binary()]
  def topics, do: @topics

  # --- the model ---------------------------------------------------------------------
  #
  # subs:  %{{slot, topic} => subscriptions}  (duplicates counted)
  # inbox: %{slot => messages expected since the last sync, newest first}
  # fault: nil, :suspended (every sender) or :parked (no live sender), until a sync

  def initial_state, do: %{subs: %{}, inbox: %{}, next: 0, fault: nil}

  def command(state) do
    slot = :proper_types.range(0, @slots - 1)
    on_heap = :proper_types.range(0, @on_heap_slots - 1)
    topic = :proper_types.elements(@topics)
    held = for {{s, t}, _} <- state.subs, do: [s, t]

    on_held =
      if held == [] do
        []
      else
        [
          {3, {:call, __MODULE__, :subscribe, :proper_types.elements(held)}},
          {4, {:call, __MODULE__, :unsubscribe, :proper_types.elements(held)}}
        ]
      end

    faults =
      if state.fault == nil do
        [
          {1, {:call, __MODULE__, :suspend_senders, []}},
          {1, {:call, __MODULE__, :park_lanes, []}}
        ]
      else
        []
      end

    :proper_types.frequency(
      [
        {5, {:call, __MODULE__, :subscribe, [slot, topic]}},
        {2, {:call, __MODULE__, :subscribe_many, [on_heap, topic]}},
        {1, {:call, __MODULE__, :unsubscribe, [slot, topic]}},
        {6, {:call, __MODULE__, :dispatch, [topic, state.next, payload()]}},
        {3, {:call, __MODULE__, :sync, []}},
        {1, {:call, __MODULE__, :exit_proc, [slot, :proper_types.elements([:normal, :kill])]}}
      ] ++ on_held ++ faults
    )
  end

  defp payload do
    :proper_types.frequency([
      {5, :proper_types.integer()},
      {5, :proper_types.binary()},
      {5, :proper_types.list(:proper_types.range(0, 9))},
      # Over 64 bytes: a reference-counted binary, shared rather than copied.
      {4, :proper_types.exactly(:binary.copy(<<7>>, 200))},
      # Built when sent (see message/3), so that a counterexample stays readable. Rare:
      # 17 copies of it cost more than the rest of a sequence.
      {1, :proper_types.exactly({:big, @big})}
    ])
  end

  # One fault at a time: `park_lanes` syncs first, which suspended senders would hold.
  def precondition(state, {:call, _, fault, []}) when fault in [:suspend_senders, :park_lanes],
    do: state.fault == nil

  def precondition(_state, _call), do: true

  def next_state(state, _result, {:call, _, :subscribe, [slot, topic]}) do
    %{state | subs: Map.update(state.subs, {slot, topic}, 1, &(&1 + 1))}
  end

  def next_state(state, _result, {:call, _, :subscribe_many, [slot, topic]}) do
    %{state | subs: Map.update(state.subs, {slot, topic}, @many, &(&1 + @many))}
  end

  def next_state(state, _result, {:call, _, :unsubscribe, [slot, topic]}) do
    %{state | subs: Map.delete(state.subs, {slot, topic})}
  end

  def next_state(state, _result, {:call, _, :dispatch, [topic, id, payload]}) do
    message = message(topic, id, payload)

    inbox =
      Enum.reduce(state.subs, state.inbox, fn
        {{slot, ^topic}, n}, inbox ->
          Map.update(inbox, slot, List.duplicate(message, n), &(List.duplicate(message, n) ++ &1))

        _, inbox ->
          inbox
      end)

    %{state | inbox: inbox, next: max(state.next, id + 1)}
  end

  def next_state(state, _result, {:call, _, :sync, []}), do: %{state | inbox: %{}, fault: nil}

  def next_state(state, _result, {:call, _, :exit_proc, [slot, _reason]}) do
    subs = Map.reject(state.subs, fn {{s, _}, _} -> s == slot end)
    %{state | subs: subs, inbox: Map.delete(state.inbox, slot)}
  end

  def next_state(state, _result, {:call, _, :suspend_senders, []}),
    do: %{state | fault: :suspended}

  def next_state(state, _result, {:call, _, :park_lanes, []}), do: %{state | fault: :parked}

  def postcondition(state, {:call, _, :sync, []}, observed) do
    expected = expected(state)

    if observed == expected do
      true
    else
      Process.put(@mismatch, {expected, observed})
      false
    end
  end

  def postcondition(_state, _call, result), do: result == :ok

  @doc "What the registry must show now: mailboxes, counts and subscriber lists."
  def expected(state) do
    %{
      received: Map.new(0..(@slots - 1), &{&1, Enum.reverse(Map.get(state.inbox, &1, []))}),
      counts:
        Map.new(@topics, fn topic ->
          {topic, state.subs |> Enum.filter(&match?({{_, ^topic}, _}, &1)) |> sum_counts()}
        end),
      subscribers:
        Map.new(@topics, fn topic ->
          slots = for {{slot, ^topic}, n} <- state.subs, _ <- 1..n, do: slot
          {topic, Enum.sort(slots)}
        end),
      # Once sync/0 returned, no batch is on its way and none was lost.
      lanes: %{in_flight: 0, lost_deliveries: 0},
      # A sync/0 during a fault returned only once the holder had lifted all of it.
      sync_returned_while_held: 0
    }
  end

  defp sum_counts(entries), do: entries |> Enum.map(&elem(&1, 1)) |> Enum.sum()

  defp message(topic, id, {:big, n}), do: {:model_msg, topic, id, List.duplicate(7, n)}
  defp message(topic, id, payload), do: {:model_msg, topic, id, payload}

  # --- the commands, run against the registry ----------------------------------------

  def subscribe(slot, topic), do: control(slot, {:subscribe, topic})

  def subscribe_many(slot, topic), do: control(slot, {:subscribe_many, topic, @many})

  def unsubscribe(slot, topic), do: control(slot, {:unsubscribe, topic})

  # During a fault, every slot subscribed to the topic is asked right after the dispatch
  # whether it has the message: what the test process sent itself is there (the question
  # comes from the same process, behind it); what went to a sender is not, as no sender
  # runs. An off-heap slot must have it.
  def dispatch(topic, id, payload) do
    message = message(topic, id, payload)
    :ok = Dispatcher.dispatch(topic, message)

    case Process.get(@fault) do
      nil -> :ok
      fault -> check_routes(fault, topic, message)
    end
  end

  defp check_routes(fault, topic, message) do
    by_pid = Map.new(Process.get(@procs), fn {slot, pid} -> {pid, slot} end)
    slots = topic |> Dispatcher.subscribers() |> Enum.map(&Map.fetch!(by_pid, &1)) |> Enum.uniq()
    {off_heap, on_heap} = Enum.split_with(slots, &(&1 >= @on_heap_slots))
    missing = Enum.reject(off_heap, &control(&1, {:has, message}))
    inline = Enum.count(on_heap, &control(&1, {:has, message}))
    count(:direct, length(off_heap) - length(missing))
    count(:inline, inline)
    count(:behind_a_sender, length(on_heap) - inline)

    # No lane has a live sender: a batch handed over is parked, holding its credit.
    if fault == :parked and on_heap != [] and inline < length(on_heap),
      do: count(:parked, min(RegistryBackend.stats().in_flight, 1))

    if missing == [], do: :ok, else: {:not_sent_by_the_producer, fault, missing}
  end

  def sync do
    held_while_returned =
      case Process.delete(@fault) do
        nil ->
          :ok = Dispatcher.sync()
          0

        _fault ->
          send(holder(), {:lift_during_sync, self()})
          :synced = inside_sync()
          ref = make_ref()
          send(holder(), {:returned, self(), ref})
          receive do: ({^ref, still_held} -> still_held)
      end

    Map.put(observe(), :sync_returned_while_held, held_while_returned)
  end

  # The holder lifts a fault only while the test process waits inside this call.
  defp inside_sync do
    :ok = Dispatcher.sync()
    :synced
  end

  def suspend_senders do
    Process.put(@fault, :suspended)
    hold(Server.senders())
  end

  # Everything delivered first, so that the senders killed hold nothing: nothing is lost,
  # and the model stays exact. Then no lane has a sender until the server runs again.
  def park_lanes do
    :ok = Dispatcher.sync()
    Process.put(@fault, :parked)
    :ok = hold([Process.whereis(Dispatcher.registry_name())])

    for sender <- Server.senders() do
      ref = Process.monitor(sender)
      Process.exit(sender, :kill)
      receive do: ({:DOWN, ^ref, :process, ^sender, _} -> :ok)
    end

    :ok
  end

  def exit_proc(slot, reason) do
    pid = proc(slot)
    ref = Process.monitor(pid)

    case reason do
      :normal -> :ok = control(slot, :stop)
      :kill -> Process.exit(pid, :kill)
    end

    receive do
      {:DOWN, ^ref, :process, ^pid, _} -> :ok
    after
      5_000 -> raise "slot #{slot} did not exit"
    end

    # The NIF's monitor removes the dead process shortly after it is gone.
    await(fn -> Native.topics_of(RegistryBackend.dispatcher!(), pid) == [] end)
    Process.put(@procs, Map.put(Process.get(@procs), slot, spawn_slot(slot)))
    :ok
  end

  @doc "Mailboxes (what arrived since the last report), counts and subscriber lists."
  def observe do
    slots = Process.get(@procs)
    by_pid = Map.new(slots, fn {slot, pid} -> {pid, slot} end)
    stats = RegistryBackend.stats()
    {lost_before, delivered_before} = Process.get({__MODULE__, :baseline})
    count(:delivered_batches, stats.delivered_batches - delivered_before)
    Process.put({__MODULE__, :baseline}, {lost_before, stats.delivered_batches})

    %{
      received: Map.new(slots, fn {slot, _} -> {slot, control(slot, :report)} end),
      counts: Map.new(@topics, &{&1, Dispatcher.count(&1)}),
      subscribers:
        Map.new(@topics, fn topic ->
          found = for pid <- Dispatcher.subscribers(topic), do: Map.get(by_pid, pid, pid)
          {topic, Enum.sort(found)}
        end),
      lanes: %{
        in_flight: stats.in_flight,
        lost_deliveries: stats.lost_deliveries - lost_before
      }
    }
  end

  @doc "Starts the slot processes and the holder for one run."
  def start_procs do
    Process.delete(@mismatch)
    Process.delete(@fault)
    stats = RegistryBackend.stats()
    Process.put({__MODULE__, :baseline}, {stats.lost_deliveries, stats.delivered_batches})
    Process.put(@holder, spawn_link(&holder_loop/0))
    Process.put(@procs, Map.new(0..(@slots - 1), &{&1, spawn_slot(&1)}))
  end

  @doc """
  Stops the slot processes and the holder (which lifts whatever it still holds: a
  suspension ends with the process that made it) and waits until the registry forgot
  the slots and every lane has a sender again.
  """
  def stop_procs do
    holder = Process.delete(@holder)
    Process.delete(@fault)
    pids = Map.values(Process.get(@procs, %{}))
    if holder, do: Process.unlink(holder)
    refs = for pid <- [holder | pids], pid != nil, do: Process.monitor(pid)
    Enum.each([holder | pids], &(&1 && Process.exit(&1, :kill)))
    for ref <- refs, do: receive(do: ({:DOWN, ^ref, _, _, _} -> :ok))
    await(fn -> Enum.all?(@topics, &(Dispatcher.count(&1) == 0)) end)
    lanes = length(Native.senders(RegistryBackend.dispatcher!()))
    await(fn -> length(Server.senders()) == lanes and Enum.all?(Server.senders(), &alive?/1) end)
  end

  defp alive?(pid), do: Process.alive?(pid)

  @doc "The mismatch the last failed postcondition saw, if any."
  def last_mismatch, do: Process.get(@mismatch)

  @doc "How often each route was taken since `reset_routes/0`."
  def routes, do: Process.get(@routes, %{})

  def reset_routes, do: Process.put(@routes, %{})

  defp count(_route, 0), do: :ok

  defp count(route, n) do
    Process.put(@routes, Map.update(routes(), route, n, &(&1 + n)))
    :ok
  end

  defp proc(slot), do: Map.fetch!(Process.get(@procs), slot)

  defp holder, do: Process.get(@holder)

  defp control(slot, op) do
    ref = make_ref()
    send(proc(slot), {:model_control, self(), ref, op})

    receive do
      {^ref, reply} -> reply
    after
      5_000 -> raise "slot #{slot} did not answer #{inspect(op, limit: 5)}"
    end
  end

  defp spawn_slot(slot) do
    queue = if slot < @on_heap_slots, do: :on_heap, else: :off_heap

    spawn(fn ->
      Process.flag(:message_queue_data, queue)
      slot_loop([])
    end)
  end

  defp slot_loop(received) do
    receive do
      {:model_control, from, ref, :report} ->
        send(from, {ref, Enum.reverse(received)})
        slot_loop([])

      {:model_control, from, ref, :stop} ->
        send(from, {ref, :ok})

      {:model_control, from, ref, {:has, message}} ->
        send(from, {ref, message in received})
        slot_loop(received)

      {:model_control, from, ref, {:subscribe_many, topic, n}} ->
        results = for _ <- 1..n, do: call(:subscribe, topic)
        send(from, {ref, Enum.find(results, :ok, &(&1 != :ok))})
        slot_loop(received)

      {:model_control, from, ref, {call, topic}} when call in [:subscribe, :unsubscribe] ->
        send(from, {ref, call(call, topic)})
        slot_loop(received)

      message ->
        slot_loop([message | received])
    end
  end

  defp call(call, topic) do
    apply(Dispatcher, call, [topic])
  rescue
    error -> {:raised, error}
  end

  # --- the holder ----------------------------------------------------------------------
  #
  # Suspends processes of ours for the test process, and lifts them during its next
  # `sync/0`: one at a time, in the order held, each only once the test process waits
  # inside `sync/0` (and, but for the last, once the one lifted before has handled all
  # it had). Asked after `sync/0` returned, it answers how many were still held then, and
  # lifts them. `:erlang.resume_process/1` must come from the process that suspended.

  defp hold(pids) do
    ref = make_ref()
    send(holder(), {:hold, pids, self(), ref})
    receive do: ({^ref, :held} -> :ok)
  end

  defp holder_loop(held \\ []) do
    receive do
      {:hold, pids, from, ref} ->
        for pid <- pids, do: true = :erlang.suspend_process(pid)
        send(from, {ref, :held})
        holder_loop(held ++ pids)

      {:lift_during_sync, waiter} ->
        lift(held, waiter)
        holder_loop([])
    end
  end

  defp lift([], waiter) do
    receive do: ({:returned, ^waiter, ref} -> send(waiter, {ref, 0}))
  end

  defp lift([pid | rest] = held, waiter) do
    receive do
      {:returned, ^waiter, ref} ->
        send(waiter, {ref, length(held)})
        Enum.each(held, &:erlang.resume_process/1)
    after
      0 ->
        if waiting_inside_sync?(waiter) do
          true = :erlang.resume_process(pid)
          await(fn -> idle?(pid) end)
          lift(rest, waiter)
        else
          Process.sleep(1)
          lift(held, waiter)
        end
    end
  end

  defp waiting_inside_sync?(pid) do
    case Process.info(pid, [:status, :current_stacktrace]) do
      [status: :waiting, current_stacktrace: stack] ->
        Enum.any?(stack, &match?({__MODULE__, :inside_sync, 0, _}, &1))

      _ ->
        false
    end
  end

  # Done with everything in its mailbox, or gone.
  defp idle?(pid) do
    case Process.info(pid, [:status, :message_queue_len]) do
      [status: :waiting, message_queue_len: 0] -> true
      nil -> true
      _ -> false
    end
  end

  defp await(fun, deadline \\ System.monotonic_time(:millisecond) + 5_000) do
    cond do
      fun.() -> :ok
      System.monotonic_time(:millisecond) > deadline -> raise "registry did not catch up"
      true -> Process.sleep(1) && await(fun, deadline)
    end
  end
end

defmodule ExAtlas.Fly.Dispatcher.Reliability.ModelTest do
  # Item 1 of the reliability suite: a PropEr stateful property. See RegistryModel above.
  use ExUnit.Case, async: false

  import ExAtlas.Test.FlyEnv, only: [restart_app: 1]

  alias ExAtlas.Fly.Dispatcher.Reliability.RegistryModel, as: Model
  alias ExAtlas.Fly.Dispatcher.Sender

  @moduletag timeout: :infinity
  # The senders killed by `park_lanes` are logged by the server.
  @moduletag :capture_log

  @short [numtests: 1_000, max_size: 80]
  @other [numtests: 500, max_size: 80]
  # Each sequence reaches the senders, parks lanes and lifts faults, at several times the
  # cost of one that only sends inline: 5 000 take about 6 minutes on a 2-core machine.
  @soak [numtests: 5_000, max_size: 150]
  # Every route, and for the :dirty delivery its dirty scheduler calls.
  @routes [:inline, :behind_a_sender, :direct, :parked, :delivered_batches]

  test "random command sequences match the pure model (#{@short[:numtests]} sequences)" do
    check(@short)
  end

  @tag :soak
  test "random command sequences match the pure model (#{@soak[:numtests]} sequences, soak)" do
    check(@soak)
  end

  # Both delivery paths (`config :ex_atlas, :fly, delivery:`): the default above, the
  # other one here.
  test "random command sequences match the pure model with the other delivery path (#{@other[:numtests]} sequences)" do
    delivery = other_delivery()
    restart_app(delivery: delivery)
    check(@other, delivery)
  end

  defp check(opts, delivery \\ ExAtlas.Fly.Dispatcher.Config.delivery()) do
    numtests = String.to_integer(System.get_env("EX_ATLAS_PROPER_NUMTESTS", "0"))
    numtests = if numtests > 0, do: numtests, else: opts[:numtests]
    Model.reset_routes()
    dirty = {Sender, :deliver_dirty, 2}
    :erlang.trace_pattern(dirty, true, [:call_count])

    property =
      :proper.forall(:proper_statem.commands(Model), fn commands ->
        run(commands) == :ok
      end)

    result =
      try do
        :proper.quickcheck(property, [
          :quiet,
          {:numtests, numtests},
          {:max_size, opts[:max_size]}
        ])
      after
        {:call_count, calls} = :erlang.trace_info(dirty, :call_count)
        :erlang.trace_pattern(dirty, false, [:call_count])
        Process.put(:dirty_calls, calls || 0)
      end

    if result != true do
      [commands] = :proper.counterexample()
      flunk(report(commands, run(commands)))
    end

    # Each route was taken during the run, not merely possible.
    routes = Model.routes()

    IO.puts(
      "\nmodel, #{numtests} sequences, #{delivery} delivery: routes taken #{inspect(routes)}, " <>
        "dirty scheduler calls #{Process.get(:dirty_calls)}"
    )

    for route <- @routes,
        do: assert(Map.get(routes, route, 0) > 0, "never #{route}: #{inspect(routes)}")

    if delivery == :dirty,
      do: assert(Process.get(:dirty_calls) > 0, "no batch went on to a dirty scheduler")
  end

  # Runs one command list from a fresh set of slot processes and checks the final state too
  # (commands after the last sync would otherwise go unchecked).
  defp run(commands) do
    Model.start_procs()

    try do
      {_history, state, result} = :proper_statem.run_commands(Model, commands)

      with :ok <- result,
           :ok <- final_check(state) do
        :ok
      end
    after
      Model.stop_procs()
    end
  end

  defp final_check(state) do
    if Model.postcondition(state, {:call, Model, :sync, []}, Model.sync()),
      do: :ok,
      else: {:final_sync, :postcondition_failed}
  end

  defp report(commands, outcome) do
    lines =
      for {{:set, _var, {:call, _, fun, args}}, n} <- Enum.with_index(commands, 1) do
        "  #{n}. #{fun}(#{Enum.map_join(args, ", ", &inspect(&1, printable_limit: 24))})"
      end

    mismatch =
      case Model.last_mismatch() do
        {expected, observed} ->
          for {what, want} <- expected, difference <- differences(what, want, observed[what]) do
            difference
          end

        nil ->
          []
      end

    """
    the registry disagreed with the model; shrunk counterexample (slots 0..5, 4 and 5 \
    off-heap; commands run in order by the test process, subscribe/unsubscribe inside \
    the slot process):
    #{Enum.join(lines, "\n")}
    outcome when re-run: #{inspect(outcome, limit: 20)}#{Enum.join(mismatch)}
    """
  end

  defp differences(what, want, got) when is_map(want) do
    for {key, value} <- want, got[key] != value do
      "\n#{what} #{inspect(key, printable_limit: 24)}: expected #{inspect(value, limit: 12, printable_limit: 40)}, " <>
        "observed #{inspect(got[key], limit: 12, printable_limit: 40)}"
    end
  end

  defp differences(what, want, got) when want != got,
    do: ["\n#{what}: expected #{inspect(want)}, observed #{inspect(got)}"]

  defp differences(_what, _want, _got), do: []

  defp other_delivery do
    if ExAtlas.Fly.Dispatcher.Config.delivery() == :dirty, do: :scheduler, else: :dirty
  end
end
