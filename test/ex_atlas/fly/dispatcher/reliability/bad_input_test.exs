defmodule ExAtlas.Fly.Dispatcher.Reliability.BadInputTest do
  # Item 6 of the reliability suite: random calls with random terms for topics, messages
  # and options. The public API may only return its documented values or raise
  # ArgumentError; the NIF bridge may only return or raise ArgumentError (badarg); nothing
  # may take the VM down; and the registry works afterwards. Messages that do get
  # delivered (the caller subscribes to some of the topics) must arrive intact.
  use ExUnit.Case, async: false

  import ExAtlas.Test.Reliability

  alias ExAtlas.Fly.Dispatcher
  alias ExAtlas.Fly.Dispatcher.Backend.Registry, as: RegistryBackend
  alias ExAtlas.Fly.Dispatcher.Native

  @moduletag timeout: :infinity
  @moduletag :capture_log

  @short 10_000
  @subscribed_topic "bad-input:subscribed"
  @soak 100_000

  test "#{@short} random calls: only documented results or ArgumentError" do
    fuzz(@short)
  end

  @tag :soak
  test "#{@soak} random calls: only documented results or ArgumentError (soak)" do
    fuzz(@soak)
  end

  defp fuzz(calls) do
    seed = ExUnit.configuration()[:seed] || 0
    parent = self()

    # The calls run in a process of their own, so whatever they subscribe goes with it.
    {worker, ref} =
      spawn_monitor(fn ->
        :rand.seed(:exsss, {seed, calls, 6})
        send(parent, {:fuzzed, self(), run(calls)})
      end)

    result =
      receive do
        {:fuzzed, ^worker, result} ->
          result

        {:DOWN, ^ref, :process, ^worker, reason} ->
          flunk("the fuzzing process died: #{inspect(reason)}")
      after
        600_000 -> flunk("the fuzzing process did not finish")
      end

    assert_receive {:DOWN, ^ref, :process, ^worker, :normal}, 10_000

    IO.puts("\nbad input: #{calls} calls (seed #{seed}): #{inspect(result.outcomes)}")

    assert result.unexpected == [],
           "calls that neither returned a documented value nor raised ArgumentError " <>
             "(seed #{seed}), first ones:\n" <>
             Enum.map_join(
               Enum.take(result.unexpected, 10),
               "\n",
               &inspect(&1, limit: 8, printable_limit: 40)
             )

    assert result.corrupted == [], "delivered messages differ: #{inspect(result.corrupted)}"

    # Nothing of the worker stays subscribed, and the registry still works.
    await_empty_registry()
    assert_working_registry()
  end

  defp assert_working_registry do
    topic = "bad-input:after"
    :ok = Dispatcher.subscribe(topic)
    :ok = Dispatcher.dispatch(topic, {:still, :working})
    :ok = Dispatcher.sync()
    assert_received {:still, :working}
    assert Dispatcher.count(topic) == 1
    assert Dispatcher.subscribers(topic) == [self()]
    :ok = Dispatcher.unsubscribe(topic)
    assert Dispatcher.count(topic) == 0
  end

  # --- the calls ---------------------------------------------------------------------

  defp run(calls) do
    init = %{unexpected: [], corrupted: [], outcomes: %{}, sent: []}
    :ok = Dispatcher.subscribe(@subscribed_topic)

    result =
      Enum.reduce(1..calls, init, fn _, acc ->
        {name, fun, check} = random_call()

        outcome =
          try do
            {:returned, fun.()}
          rescue
            error -> {:raised, error}
          catch
            kind, reason -> {kind, reason}
          end

        acc =
          Map.update!(
            acc,
            :outcomes,
            &Map.update(&1, outcome_kind(outcome), 1, fn n -> n + 1 end)
          )

        case {outcome, check} do
          {{:raised, %ArgumentError{}}, _} ->
            acc

          {{:returned, value}, check} ->
            if check.(value), do: record_sent(acc, name), else: unexpected(acc, name, outcome)

          _ ->
            unexpected(acc, name, outcome)
        end
      end)

    check_deliveries(result)
  end

  defp outcome_kind({:returned, _}), do: :returned
  defp outcome_kind({:raised, %ArgumentError{}}), do: :argument_error
  defp outcome_kind(_), do: :other

  defp unexpected(acc, name, outcome), do: %{acc | unexpected: [{name, outcome} | acc.unexpected]}

  # A dispatch of a random message to a topic this process subscribed to must come back
  # unchanged, in order.
  defp record_sent(acc, {:dispatch_subscribed, message}), do: %{acc | sent: [message | acc.sent]}
  defp record_sent(acc, _name), do: acc

  defp check_deliveries(acc) do
    :ok = Dispatcher.sync()
    expected = Enum.reverse(acc.sent)
    received = collect_fuzz_messages([])

    corrupted =
      if received == expected,
        do: [],
        else: [{:expected, length(expected), :received, length(received)}]

    Map.drop(%{acc | corrupted: corrupted}, [:sent])
  end

  defp collect_fuzz_messages(acc) do
    receive do
      {:fuzz_message, _} = message -> collect_fuzz_messages([message | acc])
      _other -> collect_fuzz_messages(acc)
    after
      0 -> Enum.reverse(acc)
    end
  end

  # {name, call, check of a returned value}
  defp random_call do
    topic = topic()

    case :rand.uniform(16) do
      1 ->
        {{:subscribe, topic}, fn -> Dispatcher.subscribe(topic) end, &(&1 == :ok)}

      2 ->
        {{:unsubscribe, topic}, fn -> Dispatcher.unsubscribe(topic) end, &(&1 == :ok)}

      3 ->
        message = term()
        {{:dispatch, topic}, fn -> Dispatcher.dispatch(topic, message) end, &(&1 == :ok)}

      4 ->
        # Delivered to this very process (subscribed once, in run/1): must arrive unchanged.
        message = {:fuzz_message, term()}

        {{:dispatch_subscribed, message},
         fn -> Dispatcher.dispatch(@subscribed_topic, message) end, &(&1 == :ok)}

      5 ->
        {{:count, topic}, fn -> Dispatcher.count(topic) end, &(is_integer(&1) and &1 >= 0)}

      6 ->
        {{:subscribers, topic}, fn -> Dispatcher.subscribers(topic) end,
         &(is_list(&1) and Enum.all?(&1, fn pid -> is_pid(pid) end))}

      7 ->
        opts = options([:threshold, :poll_ms, :cooldown_ms])

        {{:subscribe_with_backpressure, topic, opts},
         fn -> Dispatcher.subscribe_with_backpressure(topic, opts) end, &(&1 == :ok)}

      8 ->
        opts = options([:lanes, :sender_threads, :queue_capacity])

        {{:child_spec, opts}, fn -> Dispatcher.child_spec(opts) end,
         &match?(%{id: _, start: _}, &1)}

      9 ->
        {:sync, fn -> Dispatcher.sync() end, &(&1 == :ok)}

      _ ->
        native_call()
    end
  end

  # The NIF bridge with random arguments, the running dispatcher as the first one most of
  # the time: every function it exports except close/1 (which would stop the registry for
  # the rest of the run). It may return anything; it may raise only ArgumentError (badarg).
  # new/4 gets random integers, huge ones included.
  defp native_call do
    {fun, arity} = Enum.random(native_functions())

    args =
      case fun do
        :new -> [integer(), integer(), integer(), integer()]
        _ -> [native_dispatcher() | for(_ <- 2..arity//1, do: native_arg())]
      end

    {{:native, fun, args}, fn -> apply(Native, fun, args) end, fn _ -> true end}
  end

  defp native_functions do
    for {fun, arity} <- Native.__info__(:functions),
        fun not in [:load_nif, :close],
        arity > 0,
        do: {fun, arity}
  end

  defp native_dispatcher do
    if :rand.uniform(4) > 1, do: RegistryBackend.dispatcher!(), else: term()
  end

  defp native_arg do
    case :rand.uniform(3) do
      1 -> topic()
      2 -> pid_or_term()
      3 -> term()
    end
  end

  # --- random terms ------------------------------------------------------------------

  # Mostly binaries (valid topics, some of them large or sub-binaries), the rest anything.
  defp topic do
    case :rand.uniform(10) do
      n when n <= 3 -> "bad-input:#{:rand.uniform(5)}"
      4 -> ""
      5 -> large_binary()
      6 -> binary_part(large_binary(), 3, 70)
      _ -> term()
    end
  end

  defp options(keys) do
    case :rand.uniform(6) do
      1 -> []
      2 -> term()
      3 -> for key <- Enum.take_random(keys, :rand.uniform(length(keys))), do: {key, integer()}
      4 -> for key <- Enum.take_random(keys, :rand.uniform(length(keys))), do: {key, term()}
      5 -> [{Enum.random(keys), integer()} | term()]
      6 -> [term() | [{Enum.random(keys), 1}]]
    end
  end

  defp pid_or_term do
    case :rand.uniform(3) do
      1 -> self()
      2 -> dead_pid()
      3 -> term()
    end
  end

  defp term(depth \\ 0) do
    case :rand.uniform(if depth >= 3, do: 12, else: 16) do
      1 ->
        Enum.random([
          nil,
          true,
          false,
          :ok,
          :threshold,
          :poll_ms,
          :lanes,
          :sender_threads,
          :queue_capacity,
          :"with space",
          :""
        ])

      2 ->
        integer()

      3 ->
        Enum.random([0.0, -1.5, 1.0e308, -0.0, 3.14])

      4 ->
        :rand.bytes(:rand.uniform(100) - 1)

      5 ->
        large_binary()

      6 ->
        Enum.random([<<1::3>>, <<255, 7::5>>, binary_part(large_binary(), 1, 10)])

      7 ->
        Enum.random([self(), dead_pid(), make_ref(), hd(Port.list())])

      8 ->
        Enum.random([fn -> :ok end, &Kernel.+/2, &Enum.map/2])

      9 ->
        ~c"charlist"

      10 ->
        []

      11 ->
        %{}

      12 ->
        {}

      13 ->
        for _ <- 1..:rand.uniform(5), do: term(depth + 1)

      14 ->
        [term(depth + 1) | term(depth + 1)]

      15 ->
        List.to_tuple(for _ <- 1..:rand.uniform(4), do: term(depth + 1))

      16 ->
        Map.new(1..:rand.uniform(4), fn _ -> {term(depth + 1), term(depth + 1)} end)
    end
  end

  defp integer do
    Enum.random([
      0,
      1,
      -1,
      2,
      1_024,
      1_025,
      :rand.uniform(2_000) - 1_000,
      4_294_967_295,
      18_446_744_073_709_551_615,
      18_446_744_073_709_551_616,
      -9_223_372_036_854_775_808,
      1_099_511_627_776,
      Integer.pow(10, 40)
    ])
  end

  defp large_binary, do: :binary.copy(<<:rand.uniform(255)>>, 100 + :rand.uniform(4_000))

  defp dead_pid do
    case Process.get(:dead_pid) do
      nil ->
        {pid, ref} = spawn_monitor(fn -> :ok end)
        receive(do: ({:DOWN, ^ref, _, _, _} -> :ok))
        Process.put(:dead_pid, pid)
        pid

      pid ->
        pid
    end
  end
end
