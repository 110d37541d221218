defmodule ExAtlas.Fly.Dispatcher.Reliability.RegistryModel do
  @moduledoc false
  # A `proper_statem` callback module: random sequences of subscribe (fresh and duplicate),
  # unsubscribe, dispatch, sync and process exit over a few processes ("slots") and topics,
  # run against the real registry and checked against the pure model below.
  #
  # Each slot is a process that subscribes and unsubscribes itself when told to, and
  # keeps every message it did not get as a command until asked for them. The test process
  # is the only one that dispatches, so `sync/0` in the test process puts every earlier
  # dispatch in the mailboxes, and the report request sent after it arrives behind them.

  alias ExAtlas.Fly.Dispatcher
  alias ExAtlas.Fly.Dispatcher.Backend.Registry, as: RegistryBackend
  alias ExAtlas.Fly.Dispatcher.Native

  @slots 4
  # The empty topic and a refc-binary topic (over 64 bytes) ride along the usual ones.
  @topics ["model:a", "model:b", "", String.duplicate("model:long/", 8)]
  @procs {__MODULE__, :procs}
  @mismatch {__MODULE__, :mismatch}

  @spec topics() :: [binary()]
  def topics, do: @topics

  # --- the model ---------------------------------------------------------------------
  #
  # subs:  %{{slot, topic} => subscriptions}  (duplicates counted)
  # inbox: %{slot => messages expected since the last sync, newest first}

  def initial_state, do: %{subs: %{}, inbox: %{}, next: 0}

  def command(state) do
    slot = :proper_types.range(0, @slots - 1)
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

    :proper_types.frequency(
      [
        {5, {:call, __MODULE__, :subscribe, [slot, topic]}},
        {1, {:call, __MODULE__, :unsubscribe, [slot, topic]}},
        {6, {:call, __MODULE__, :dispatch, [topic, state.next, payload()]}},
        {3, {:call, __MODULE__, :sync, []}},
        {1, {:call, __MODULE__, :exit_proc, [slot, :proper_types.elements([:normal, :kill])]}}
      ] ++ on_held
    )
  end

  defp payload do
    :proper_types.oneof([
      :proper_types.integer(),
      :proper_types.binary(),
      :proper_types.list(:proper_types.range(0, 9)),
      # Over 64 bytes: a reference-counted binary, shared rather than copied.
      :proper_types.exactly(:binary.copy(<<7>>, 200))
    ])
  end

  def precondition(_state, _call), do: true

  def next_state(state, _result, {:call, _, :subscribe, [slot, topic]}) do
    %{state | subs: Map.update(state.subs, {slot, topic}, 1, &(&1 + 1))}
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

  def next_state(state, _result, {:call, _, :sync, []}), do: %{state | inbox: %{}}

  def next_state(state, _result, {:call, _, :exit_proc, [slot, _reason]}) do
    subs = Map.reject(state.subs, fn {{s, _}, _} -> s == slot end)
    %{state | subs: subs, inbox: Map.delete(state.inbox, slot)}
  end

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
        end)
    }
  end

  defp sum_counts(entries), do: entries |> Enum.map(&elem(&1, 1)) |> Enum.sum()

  defp message(topic, id, payload), do: {:model_msg, topic, id, payload}

  # --- the commands, run against the registry ----------------------------------------

  def subscribe(slot, topic), do: control(slot, {:subscribe, topic})

  def unsubscribe(slot, topic), do: control(slot, {:unsubscribe, topic})

  def dispatch(topic, id, payload), do: Dispatcher.dispatch(topic, message(topic, id, payload))

  def sync do
    :ok = Dispatcher.sync()
    observe()
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
    Process.put(@procs, Map.put(Process.get(@procs), slot, spawn_slot()))
    :ok
  end

  @doc "Mailboxes (what arrived since the last report), counts and subscriber lists."
  def observe do
    slots = Process.get(@procs)
    by_pid = Map.new(slots, fn {slot, pid} -> {pid, slot} end)

    %{
      received: Map.new(slots, fn {slot, _} -> {slot, control(slot, :report)} end),
      counts: Map.new(@topics, &{&1, Dispatcher.count(&1)}),
      subscribers:
        Map.new(@topics, fn topic ->
          found = for pid <- Dispatcher.subscribers(topic), do: Map.get(by_pid, pid, pid)
          {topic, Enum.sort(found)}
        end)
    }
  end

  @doc "Starts the slot processes for one run."
  def start_procs do
    Process.delete(@mismatch)
    Process.put(@procs, Map.new(0..(@slots - 1), &{&1, spawn_slot()}))
  end

  @doc "Stops the slot processes and waits until the registry forgot them."
  def stop_procs do
    pids = Map.values(Process.get(@procs, %{}))
    refs = for pid <- pids, do: Process.monitor(pid)
    Enum.each(pids, &Process.exit(&1, :kill))
    for ref <- refs, do: receive(do: ({:DOWN, ^ref, _, _, _} -> :ok))
    await(fn -> Enum.all?(@topics, &(Dispatcher.count(&1) == 0)) end)
  end

  @doc "The mismatch the last failed postcondition saw, if any."
  def last_mismatch, do: Process.get(@mismatch)

  defp proc(slot), do: Map.fetch!(Process.get(@procs), slot)

  defp control(slot, op) do
    ref = make_ref()
    send(proc(slot), {:model_control, self(), ref, op})

    receive do
      {^ref, reply} -> reply
    after
      5_000 -> raise "slot #{slot} did not answer #{inspect(op)}"
    end
  end

  defp spawn_slot, do: spawn(fn -> slot_loop([]) end)

  defp slot_loop(received) do
    receive do
      {:model_control, from, ref, :report} ->
        send(from, {ref, Enum.reverse(received)})
        slot_loop([])

      {:model_control, from, ref, :stop} ->
        send(from, {ref, :ok})

      {:model_control, from, ref, {call, topic}} when call in [:subscribe, :unsubscribe] ->
        reply =
          try do
            apply(Dispatcher, call, [topic])
          rescue
            error -> {:raised, error}
          end

        send(from, {ref, reply})
        slot_loop(received)

      message ->
        slot_loop([message | received])
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

  @moduletag timeout: :infinity

  @short [numtests: 1_000, max_size: 80]
  @soak [numtests: 20_000, max_size: 150]

  test "random command sequences match the pure model (#{@short[:numtests]} sequences)" do
    check(@short)
  end

  @tag :soak
  test "random command sequences match the pure model (#{@soak[:numtests]} sequences, soak)" do
    check(@soak)
  end

  # Both delivery paths (`config :ex_atlas, :fly, delivery:`): the default above, the
  # other one here.
  test "random command sequences match the pure model with the other delivery path" do
    restart_app(delivery: other_delivery())
    check(@short)
  end

  defp check(opts) do
    numtests = String.to_integer(System.get_env("EX_ATLAS_PROPER_NUMTESTS", "0"))
    numtests = if numtests > 0, do: numtests, else: opts[:numtests]

    property =
      :proper.forall(:proper_statem.commands(Model), fn commands ->
        run(commands) == :ok
      end)

    result =
      :proper.quickcheck(property, [
        :quiet,
        {:numtests, numtests},
        {:max_size, opts[:max_size]}
      ])

    if result != true do
      [commands] = :proper.counterexample()
      flunk(report(commands, run(commands)))
    end
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
          for {what, want} <- expected, {key, value} <- want, observed[what][key] != value do
            "\n#{what} #{inspect(key, printable_limit: 24)}: expected #{inspect(value)}, " <>
              "observed #{inspect(observed[what][key])}"
          end

        nil ->
          []
      end

    """
    the registry disagreed with the model; shrunk counterexample (slots 0..3; commands \
    run in order by the test process, subscribe/unsubscribe inside the slot process):
    #{Enum.join(lines, "\n")}
    outcome when re-run: #{inspect(outcome)}#{Enum.join(mismatch)}
    """
  end

  defp other_delivery do
    if ExAtlas.Fly.Dispatcher.Config.delivery() == :dirty, do: :scheduler, else: :dirty
  end
end
