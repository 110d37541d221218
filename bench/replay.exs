# Replay (issue 24, "Cost"): what keeping each topic's recent dispatches costs. In one run:
#
#   1. memory per kept message (our accounting, the VM's growth, resident memory's growth)
#      against the message's own size; first, so that no memory freed by the other parts
#      hides resident memory's growth;
#   2. dispatch/2 with `replay: 100` beside `replay: 0`, caller-blocked and end to end, at
#      each N of `--sizes` subscribers of one topic; the application restarts between the
#      two settings, which take turns round by round (`--rounds`), the history full (100
#      kept) before anything is timed, so every timed dispatch evicts one; and, in the same
#      rounds, where the caller's time goes: dispatches to topics without subscribers
#      beside one send/2 of the same message. Twice: for the 20-line batch decoded from its
#      external format (no literals, as a batch decoded from JSON: the targets) and for
#      the batch built in code (its literals shared by send/2: no target);
#   3. subscribe(topic, replay: 100) to a topic with 100 kept batches, from a fresh
#      process, on-heap and off-heap: how long the call blocks, and when the 100th message
#      is in hand; beside subscribe/1 and a process that keeps the 100 batches itself.
#
# Targets (issue 24, for the decoded batch): the time replay adds to a dispatch's caller
# at most 1.5x one send/2 of the message, with no subscriber and with 10; end to end at
# 10 000 subscribers at most 1.05x without replay; the 100th replayed message in hand
# within 1.2x the time a process holding the batches takes to send them.
#
#     MIX_ENV=prod mix run bench/replay.exs          # bench/results/replay.md
#     MIX_ENV=prod mix run bench/replay.exs --quick  # seconds; temp dir (CI)
#
# Options: --sizes 10,10000  --rounds R  --reps N (timed dispatches per size, setting and
#          round)  --joins J (subscribes per kind)  --topics T (part 1: T topics x 100)
#          --out DIR. Method, columns and targets: bench/README.md. With
#          EX_ATLAS_ALLOC_STATS=1 part 1 also gives the NIF's own heap.

Code.require_file("support/bench.ex", __DIR__)

defmodule ReplayBench do
  @moduledoc false
  alias ExAtlas.Fly.Dispatcher

  @kept 100
  @built "the batch built in code (Bench.entries/0: its literals shared by send/2)"
  @decoded "the batch decoded from its external format (no literals, as from JSON)"
  @settings [0, @kept]
  @joiners [:replay_on_heap, :replay_off_heap, :subscribe, :keeper, :keeper_built]
  @join_labels %{
    replay_on_heap: "subscribe(topic, replay: #{@kept}), on-heap queue",
    replay_off_heap: "subscribe(topic, replay: #{@kept}), off-heap queue",
    subscribe: "subscribe(topic), no replay",
    keeper: "a process keeping #{@kept} decoded batches sends them (call)",
    keeper_built: "a process keeping #{@kept} batches built in code sends them (call)"
  }
  # Issue 24's bounds.
  @added_max 1.5
  @e2e_max 1.05
  @join_max 1.2

  def main(argv) do
    switches = [sizes: :ints, rounds: :integer, reps: :integer, joins: :integer, topics: :integer]

    o =
      Bench.options(argv, "replay", switches, fn quick ->
        if quick,
          do: %{sizes: [10, 1_000], rounds: 2, reps: nil, joins: 20, topics: 10},
          else: %{sizes: [10, 10_000], rounds: 10, reps: nil, joins: 300, topics: 100}
      end)

    Logger.configure(level: :warning)
    machine = Bench.machine()
    command = Bench.command("replay.exs")
    title = "Replay: the cost of keeping #{@kept} dispatches per topic"
    IO.puts(Bench.header(title, command, machine))
    started = System.monotonic_time(:millisecond)

    message = {:ex_atlas_fly_logs, "app1", Bench.entries()}
    # The same batch as a host gets it from a JSON decoder: no literals. A send/2 skips
    # a message's literals (they stay shared); a kept copy has none (it is encoded), so
    # the targets are for this one, and the built batch is reported beside it.
    decoded = decode(message)
    memory = memory_cost(o, decoded)
    {decoded_dispatch, decoded_alone} = dispatch_cost(o, decoded)
    {dispatch, alone} = dispatch_cost(o, message)
    joins = join_cost(o, decoded, message)

    seconds = div(System.monotonic_time(:millisecond) - started, 1_000)
    machine = machine ++ [load_average_at_end: Bench.load_average(), duration: "#{seconds} s"]
    decoded_cost = cost(decoded_dispatch, decoded_alone, o)
    built_cost = cost(dispatch, alone, o)

    Bench.write(o.out, "replay.md", [
      Bench.header(title, command, machine),
      "The message: `{:ex_atlas_fly_logs, app, entries}` with 20 small maps " <>
        "(#{Bench.bytes(own_bytes(message))} as `:erts_debug.flat_size/1` counts it, " <>
        "#{Bench.bytes(:erlang.external_size(message))} encoded); " <>
        "#{Dispatcher.stats().lanes} lanes; `replay_memory` at its default (64 MiB) in " <>
        "parts 2 and 3. Method and columns: [bench/README.md](../README.md).\n",
      "## Targets\n",
      targets(decoded_cost, joins),
      beside(built_cost, decoded_cost, joins),
      "## Memory per kept message\n",
      memory_table(memory),
      "## Dispatch with and without replay\n",
      dispatch_table(decoded_dispatch, o, @decoded),
      alone_table(decoded_alone, @decoded),
      dispatch_table(dispatch, o, @built),
      alone_table(alone, @built),
      "## Subscribe with replay\n",
      join_table(joins, o)
    ])

    IO.puts("#{seconds} s")
  end

  defp decode(term), do: :erlang.binary_to_term(:erlang.term_to_binary(term))

  ## 2. Dispatch cost: `replay: 0` and `replay: 100` take turns, round by round.

  defp reps_for(n) when n <= 100, do: 1_000
  defp reps_for(n), do: max(10, div(600_000, n))

  # {%{{n, replay} => [{round, [{caller ns, e2e ns}]}]},
  #  %{{name, mode} => [{round, [caller ns]}]}}, rounds in order.
  defp dispatch_cost(o, message) do
    counter = :atomics.new(1, signed: true)
    parent = self()
    pids = for _ <- 1..Enum.max(o.sizes), do: spawn(fn -> subscriber(counter, parent) end)

    samples =
      for round <- 1..o.rounds,
          replay <- if(rem(round, 2) == 1, do: @settings, else: Enum.reverse(@settings)),
          reduce: %{} do
        acc ->
          :ok = Bench.restart(replay: replay)
          warm_up(o.sizes, replay, pids)

          acc =
            for n <- o.sizes, reduce: acc do
              acc ->
                reps = o.reps || if(o.quick, do: 20, else: reps_for(n))
                timed = fn -> sample(counter, "fanout:#{n}", n, message) end
                for _ <- 1..max(2, div(reps, 10)), do: timed.()
                rows = for _ <- 1..reps, do: timed.()
                Map.update(acc, {n, replay}, [{round, rows}], &[{round, rows} | &1])
            end

          for {key, ns} <- unsubscribed(replay, round, message, o), reduce: acc do
            acc -> Map.update(acc, key, [{round, ns}], &[{round, ns} | &1])
          end
      end

    IO.puts("dispatch cost: #{o.rounds} rounds done")
    Enum.each(pids, &Process.exit(&1, :kill))

    {fanout, alone} = Enum.split_with(samples, &match?({{n, _}, _} when is_integer(n), &1))

    in_order =
      &Map.new(&1, fn {key, rounds} -> {key, Enum.sort_by(rounds, fn r -> elem(r, 0) end)} end)

    {in_order.(fanout), in_order.(alone)}
  end

  # Where the caller's time goes: dispatches to topics without subscribers, the batch and
  # a small message, the kinds in turn. With replay, "full" topics keep 100 (each dispatch
  # evicts one), "filling" ones fewer (a new topic every 100 dispatches: none evicts).
  # The reference, in every round of both settings: one send/2 of the same message to a
  # process that drops what it gets (its queue off-heap: the send is one copy).
  defp unsubscribed(replay, round, message, o) do
    reps = if o.quick, do: 200, else: 2_000
    {tag, app, _} = message
    messages = [batch: message, small: {tag, app, []}]
    modes = if replay > 0, do: [:full, :filling, :send], else: [:off, :send]

    sink =
      spawn_link(fn ->
        Process.flag(:message_queue_data, :off_heap)
        sink()
      end)

    for {name, msg} <- messages,
        mode <- modes -- [:filling, :send],
        do: fill("alone:#{mode}:#{name}", msg)

    samples =
      for i <- 1..reps, {name, msg} <- messages, mode <- modes do
        topic =
          if mode == :filling,
            do: "alone:filling:#{round}:#{name}:#{div(i, @kept)}",
            else: "alone:#{mode}:#{name}"

        {_, ns} =
          if mode == :send,
            do: Bench.timed(fn -> send(sink, msg) end),
            else: Bench.timed(fn -> :ok = Dispatcher.dispatch(topic, msg) end)

        {{name, mode}, ns}
      end

    Process.unlink(sink) && Process.exit(sink, :kill)
    Enum.group_by(samples, &elem(&1, 0), &elem(&1, 1))
  end

  defp sink, do: receive(do: (_ -> sink()))

  defp fill(topic, message), do: for(_ <- 1..@kept, do: :ok = Dispatcher.dispatch(topic, message))

  # Before anything is timed: each topic's history filled (100 dispatches to it
  # before it has subscribers, which costs no deliveries), then the subscribers in. Both
  # settings do the same.
  defp warm_up(sizes, replay, pids) do
    warm = {:ex_atlas_fly_logs, "warm", Bench.entries()}
    for n <- sizes, _ <- 1..@kept, do: :ok = Dispatcher.dispatch("fanout:#{n}", warm)
    :ok = Dispatcher.sync()

    Bench.run_in_each(pids, fn i ->
      case for(n <- sizes, i < n, do: "fanout:#{n}") do
        [] -> nil
        topics -> fn -> Enum.each(topics, &Dispatcher.subscribe/1) end
      end
    end)

    for n <- sizes, (count = Dispatcher.count("fanout:#{n}")) != n do
      raise "fanout:#{n} has #{count} subscribers, expected #{n}"
    end

    kept = Dispatcher.stats().replay_messages
    want = if replay > 0, do: @kept * length(sizes), else: 0
    kept == want || raise "replay: #{replay}: #{kept} messages kept, expected #{want}"
    :ok
  end

  # One timed dispatch: {caller ns, end-to-end ns}. The subscriber that brings the counter
  # to 0 tells this process, as in bench/fanout.exs: nobody spins.
  defp sample(counter, topic, n, message) do
    :atomics.put(counter, 1, -n)
    t0 = System.monotonic_time(:nanosecond)
    :ok = Dispatcher.dispatch(topic, message)
    t1 = System.monotonic_time(:nanosecond)

    receive do
      :done -> :ok
    after
      120_000 -> raise "#{topic}: #{-:atomics.get(counter, 1)} deliveries missing"
    end

    {t1 - t0, System.monotonic_time(:nanosecond) - t0}
  end

  # Counts "app1" messages, ignores the warm-up's; traps exits: a restart of :ex_atlas
  # sends every subscriber {:shutdown, :ex_atlas_dispatcher_closed}.
  defp subscriber(counter, waiter) do
    Process.flag(:trap_exit, true)
    subscriber_loop(counter, waiter)
  end

  defp subscriber_loop(counter, waiter) do
    receive do
      {:ex_atlas_fly_logs, "app1", _} ->
        if :atomics.add_get(counter, 1, 1) == 0, do: send(waiter, :done)

      {:ex_atlas_fly_logs, _, _} ->
        :ok

      {:EXIT, _, _} ->
        :ok

      {:run, from, ref, fun} ->
        Bench.ran(from, ref, fun)
    end

    subscriber_loop(counter, waiter)
  end

  ## 3. Subscribe with replay: a fresh process each time, the kinds taking turns.

  defp join_cost(o, message, built) do
    :ok = Bench.restart(replay: @kept)
    topic = "replay:join"
    for _ <- 1..@kept, do: :ok = Dispatcher.dispatch(topic, message)
    :ok = Dispatcher.sync()
    kept = Dispatcher.stats().replay_messages
    kept == @kept || raise "#{kept} messages kept for #{topic}, expected #{@kept}"

    # The comparison: a process that keeps the last 100 batches itself and sends them on
    # request, as a GenServer would. Decoded copies (no literals, as a replayed message
    # is, the target's reference), or batches built in code (literals shared: no target).
    keepers = %{
      keeper: spawn_link(fn -> keeper(for _ <- 1..@kept, do: decode(message)) end),
      keeper_built: spawn_link(fn -> keeper(for _ <- 1..@kept, do: rebuild(built)) end)
    }

    run = fn reps ->
      for rep <- 0..(reps - 1)//1,
          kind <- rotate(@joiners, rep),
          do: {kind, join(kind, topic, keepers[kind])}
    end

    _ = run.(max(2, div(o.joins, 10)))
    samples = run.(o.joins)
    for {_, pid} <- keepers, do: Process.unlink(pid) && Process.exit(pid, :kill)
    IO.puts("subscribe with replay: #{o.joins} per kind done")

    Map.new(@joiners, fn kind ->
      mine = for {^kind, sample} <- samples, do: sample
      last = for {_, ns} <- mine, ns, do: ns

      {kind,
       %{
         reps: length(mine),
         caller: Bench.summary(for {ns, _} <- mine, do: ns),
         last: last != [] && Bench.summary(last)
       }}
    end)
  end

  # A new batch like `built`: the entries built again (their literals shared with it).
  defp rebuild({tag, app, _}), do: {tag, app, Bench.entries()}

  defp rotate(list, rep),
    do: Enum.drop(list, rem(rep, length(list))) ++ Enum.take(list, rem(rep, length(list)))

  # {ns the call blocked, ns from its start until the 100th message was received (nil for
  # subscribe/1)}, in a fresh process; waits until that process is gone.
  defp join(kind, topic, keeper) do
    parent = self()

    {pid, monitor} =
      spawn_monitor(fn ->
        if kind == :replay_off_heap, do: Process.flag(:message_queue_data, :off_heap)
        t0 = System.monotonic_time(:nanosecond)

        case kind do
          :subscribe -> :ok = Dispatcher.subscribe(topic)
          k when k in [:keeper, :keeper_built] -> :ok = from_keeper(keeper)
          _ -> :ok = Dispatcher.subscribe(topic, replay: @kept)
        end

        t1 = System.monotonic_time(:nanosecond)

        last =
          if kind != :subscribe do
            :ok = receive_batches(@kept)
            System.monotonic_time(:nanosecond) - t0
          end

        send(parent, {self(), t1 - t0, last})
      end)

    receive do
      {^pid, blocked, last} ->
        receive(do: ({:DOWN, ^monitor, _, _, :normal} -> {blocked, last}))

      {:DOWN, ^monitor, _, _, reason} ->
        raise "#{kind}: the subscriber exited: #{inspect(reason)}"
    after
      60_000 -> raise "#{kind}: no answer in 60 s"
    end
  end

  defp keeper(history) do
    receive do
      {:replay, from, ref} ->
        Enum.each(history, &send(from, &1))
        send(from, {ref, :ok})
        keeper(history)
    end
  end

  defp from_keeper(keeper) do
    ref = make_ref()
    send(keeper, {:replay, self(), ref})
    receive(do: ({^ref, :ok} -> :ok))
  end

  defp receive_batches(0), do: :ok

  defp receive_batches(k) do
    receive do
      {:ex_atlas_fly_logs, _, _} -> receive_batches(k - 1)
    after
      5_000 -> raise "#{k} of #{@kept} messages missing"
    end
  end

  ## 1. Memory: T topics x 100 kept messages, measured around their dispatches.

  defp memory_cost(o, message) do
    own = own_bytes(message)
    count = o.topics * @kept
    # Room for every message even if the accounting were twice the message's size; the
    # setting is put back afterwards (the other parts run at the default).
    limit = max(64 * 1_048_576, 2 * count * own)
    env = Application.get_env(:ex_atlas, :fly, [])
    :ok = Bench.restart(replay: @kept, replay_memory: limit)
    m0 = settled_memory()
    for t <- 1..o.topics, _ <- 1..@kept, do: :ok = Dispatcher.dispatch("memory:#{t}", message)
    :ok = Dispatcher.sync()
    m1 = settled_memory()
    stats = Dispatcher.stats()

    stats.replay_messages == count ||
      raise "#{stats.replay_messages} messages kept, expected #{count}"

    IO.puts("memory: #{count} messages kept")
    :ok = Application.stop(:ex_atlas)
    Application.put_env(:ex_atlas, :fly, env)

    %{
      count: count,
      limit: limit,
      topics: o.topics,
      accounted: stats.replay_bytes / count,
      vm: (m1.vm - m0.vm) / count,
      rss: m1.rss && m0.rss && (m1.rss - m0.rss) / count,
      nif: m1.nif && m0.nif && (m1.nif - m0.nif) / count,
      own: own,
      external: :erlang.external_size(message)
    }
  end

  # Every process collected (a closed dispatcher's kept messages go when the last
  # reference to it does), then :erlang.memory(:total) read until it stops changing, and
  # resident memory read then.
  defp settled_memory do
    Enum.each(Process.list(), &:erlang.garbage_collect/1)

    vm =
      Enum.reduce_while(1..40, :erlang.memory(:total), fn _, bytes ->
        Process.sleep(50)
        now = :erlang.memory(:total)
        if abs(now - bytes) < 4_096, do: {:halt, now}, else: {:cont, now}
      end)

    %{vm: vm, rss: resident(), nif: Map.get(Dispatcher.stats(), :allocated_bytes)}
  end

  # VmRSS of this OS process in bytes, nil without /proc.
  defp resident do
    with {:ok, status} <- File.read("/proc/self/status"),
         [_, kib] <- Regex.run(~r/^VmRSS:\s*(\d+) kB$/m, status),
         do: String.to_integer(kib) * 1_024,
         else: (_ -> nil)
  end

  # The message's own size: its heap words (`:erts_debug.flat_size/1`, shared subterms
  # counted once per reference) and the bytes of the reference-counted binaries it holds.
  defp own_bytes(term),
    do: :erts_debug.flat_size(term) * :erlang.system_info(:wordsize) + refc_bytes(term)

  defp refc_bytes(b) when is_binary(b) and byte_size(b) > 64, do: byte_size(b)
  defp refc_bytes(t) when is_tuple(t), do: refc_bytes(Tuple.to_list(t))
  defp refc_bytes(m) when is_map(m), do: refc_bytes(Map.to_list(m))
  defp refc_bytes([h | t]), do: refc_bytes(h) + refc_bytes(t)
  defp refc_bytes(_), do: 0

  ## Report

  defp stats(dispatch, n, replay) do
    rows = for {_round, rows} <- dispatch[{n, replay}], row <- rows, do: row

    %{
      reps: length(rows),
      caller: Bench.summary(for {c, _} <- rows, do: c),
      e2e: Bench.summary(for {_, e} <- rows, do: e)
    }
  end

  # %{round => median} at n subscribers and setting replay; part 0: caller, 1: end to end.
  defp round_medians(dispatch, n, replay, part) do
    Map.new(dispatch[{n, replay}], fn {round, rows} ->
      {round, Bench.median(for row <- rows, do: elem(row, part))}
    end)
  end

  # replay/no-replay ratios of the medians of each round.
  defp round_ratios(dispatch, n, part) do
    with_ = round_medians(dispatch, n, @kept, part)
    without = round_medians(dispatch, n, 0, part)
    for {round, w} <- with_, do: w / without[round]
  end

  # A list of ratios as `min-max x`.
  defp range(ratios), do: "#{Bench.sig(Enum.min(ratios))}-#{Bench.sig(Enum.max(ratios))}x"

  # Every sample of a kind without subscribers ({name, mode}), over all rounds; and the
  # median of each round (the send/2 reference is timed in both settings of a round).
  defp all(alone, key), do: for({_round, ns} <- alone[key], x <- ns, do: x)

  defp alone_rounds(alone, key) do
    alone[key]
    |> Enum.group_by(&elem(&1, 0), &elem(&1, 1))
    |> Map.new(fn {round, lists} -> {round, Bench.median(Enum.concat(lists))} end)
  end

  # What issue 24's targets measure, from one dispatch_cost/2 (so in the same rounds):
  # one send/2 of the batch; the time replay adds for the caller without subscribers (100
  # kept, each dispatch evicting one, minus replay: 0) and at 10 subscribers (medians of
  # replay: 100 minus replay: 0), each against that send/2, over all rounds and per
  # round; end to end at 10 000 against replay: 0. nil for a size not run.
  defp cost(dispatch, alone, o) do
    med = &Bench.median(all(alone, {:batch, &1}))
    send = alone_rounds(alone, {:batch, :send})
    full = alone_rounds(alone, {:batch, :full})
    off = alone_rounds(alone, {:batch, :off})

    at10 =
      if 10 in o.sizes do
        with_ = round_medians(dispatch, 10, @kept, 0)
        without = round_medians(dispatch, 10, 0, 0)

        %{
          added: stats(dispatch, 10, @kept).caller.median - stats(dispatch, 10, 0).caller.median,
          rounds: for({r, w} <- with_, do: (w - without[r]) / send[r])
        }
      end

    e2e =
      if 10_000 in o.sizes do
        %{
          with: stats(dispatch, 10_000, @kept).e2e.median,
          without: stats(dispatch, 10_000, 0).e2e.median,
          rounds: round_ratios(dispatch, 10_000, 1)
        }
      end

    %{
      send: med.(:send),
      alone: %{
        added: med.(:full) - med.(:off),
        rounds: for({r, f} <- full, do: (f - off[r]) / send[r])
      },
      at10: at10,
      e2e: e2e
    }
  end

  defp added_row(text, nil, _send), do: {text, "(size not run)", nil}

  defp added_row(text, added, send) do
    ratio = added.added / send

    {text,
     "#{Bench.sig(ratio)}x: +#{Bench.dur(added.added)} / #{Bench.dur(send)} " <>
       "(rounds #{range(added.rounds)})", ratio <= @added_max}
  end

  defp e2e_row(text, nil), do: {text, "(size not run)", nil}

  defp e2e_row(text, e) do
    ratio = e.with / e.without

    {text,
     "#{Bench.sig(ratio)}x: #{Bench.dur(e.with)} / #{Bench.dur(e.without)} " <>
       "(rounds #{range(e.rounds)})", ratio <= @e2e_max}
  end

  defp join_row(text, joins, kind, keeper) do
    ratio = joins[kind].last.median / joins[keeper].last.median

    {text,
     "#{Bench.sig(ratio)}x: #{Bench.dur(joins[kind].last.median)} / " <>
       "#{Bench.dur(joins[keeper].last.median)}", ratio <= @join_max}
  end

  defp targets(c, joins) do
    send = "<= #{@added_max}x one send/2 of it"

    rows = [
      added_row(
        "caller's added time, no subscribers (100 kept, one evicted) #{send}",
        c.alone,
        c.send
      ),
      added_row(
        "caller's added time, 10 subscribers (replay: #{@kept} - 0) #{send}",
        c.at10,
        c.send
      ),
      e2e_row("end to end, 10000 subscribers: replay: #{@kept} <= #{@e2e_max}x replay: 0", c.e2e),
      join_row(
        "#{@kept}th replayed message in hand, on-heap queue (the default; the target) " <>
          "<= #{@join_max}x keeper",
        joins,
        :replay_on_heap,
        :keeper
      ),
      join_row(
        "the same, off-heap queue (for information) <= #{@join_max}x keeper",
        joins,
        :replay_off_heap,
        :keeper
      )
    ]

    Bench.targets("Targets (issue 24): #{@decoded}", rows,
      note:
        "medians from this run: added time = median with replay minus median without, " <>
          "against the median of a send/2 of the same message timed in the same rounds " <>
          "(rounds: the range of each round's own figure); keeper: a process holding " <>
          "#{@kept} decoded batches sends them to the new one"
    )
  end

  # The built batch's figures beside the decoded one's: no target.
  defp beside(b, d, joins) do
    added = fn
      nil, _ -> "-"
      a, send -> "+#{Bench.dur(a.added)} = #{Bench.ratio(a.added, send)} send/2"
    end

    e2e = fn
      nil -> "-"
      e -> Bench.ratio(e.with, e.without)
    end

    last = fn kind, keeper -> Bench.ratio(joins[kind].last.median, joins[keeper].last.median) end

    Bench.table(
      "The same measures for #{@built}: no target",
      "measure|built in code|decoded (the targets)",
      [
        ["one send/2 of the batch (median)", Bench.dur(b.send), Bench.dur(d.send)],
        ["caller's added time, no subscribers", added.(b.alone, b.send), added.(d.alone, d.send)],
        ["caller's added time, 10 subscribers", added.(b.at10, b.send), added.(d.at10, d.send)],
        ["end to end, 10000 subscribers, vs replay: 0", e2e.(b.e2e), e2e.(d.e2e)],
        [
          "#{@kept}th replayed message (on-heap / off-heap) vs a keeper of such batches",
          "#{last.(:replay_on_heap, :keeper_built)} / #{last.(:replay_off_heap, :keeper_built)}",
          "#{last.(:replay_on_heap, :keeper)} / #{last.(:replay_off_heap, :keeper)}"
        ]
      ],
      note:
        "a send/2 leaves a message's literals shared: the built batch's is cheaper, while " <>
          "what replay keeps is the same encoding for both; a replayed message is always " <>
          "decoded (no literals)"
    )
  end

  defp dispatch_table(dispatch, o, label) do
    Bench.table(
      "dispatch/2 to N subscribers of one topic, replay: 0 and replay: #{@kept}; #{label}",
      "N|replay|dispatches|caller median|caller p99|e2e median|e2e p99|caller vs replay: 0|" <>
        "e2e vs replay: 0|caller, per round|e2e, per round",
      for n <- o.sizes, replay <- @settings do
        s = stats(dispatch, n, replay)
        base = stats(dispatch, n, 0)

        [n, replay, s.reps] ++
          Enum.map([s.caller.median, s.caller.p99, s.e2e.median, s.e2e.p99], &Bench.dur/1) ++
          if replay == 0,
            do: ["", "", "", ""],
            else: [
              Bench.ratio(s.caller.median, base.caller.median),
              Bench.ratio(s.e2e.median, base.e2e.median),
              range(round_ratios(dispatch, n, 0)),
              range(round_ratios(dispatch, n, 1))
            ]
      end,
      left: 0,
      note:
        "#{o.rounds} rounds, the settings taking turns (the application restarted " <>
          "between them); medians and p99 over every round; per round: the range of " <>
          "the rounds' ratios of medians"
    )
  end

  defp alone_table(alone, label) do
    base = fn name -> Bench.median(all(alone, {name, :off})) end
    send = fn name -> Bench.median(all(alone, {name, :send})) end

    Bench.table(
      "Where the caller's time goes: dispatch/2 to a topic without subscribers; #{label}",
      "message|replay|kept for the topic|dispatches|caller median|caller p99|vs replay: 0|" <>
        "added|added vs send/2",
      for name <- [:batch, :small], mode <- [:off, :filling, :full, :send] do
        samples = all(alone, {name, mode})
        s = Bench.summary(samples)
        added = s.median - base.(name)

        [
          if(name == :batch, do: "the 20-line batch", else: "{:ex_atlas_fly_logs, app, []}"),
          %{off: 0, send: "-"}[mode] || @kept,
          %{
            off: "none",
            filling: "fewer than #{@kept}",
            full: "#{@kept}: one evicted",
            send: "(reference: send/2, one copy)"
          }[mode],
          length(samples),
          Bench.dur(s.median),
          Bench.dur(s.p99),
          Bench.ratio(s.median, base.(name))
        ] ++
          if mode in [:off, :send],
            do: ["", ""],
            else: [Bench.dur(added), Bench.ratio(added, send.(name))]
      end,
      left: 1,
      note:
        "the kinds in turn within each round's setting; the added time is the encoding " <>
          "of the message, its scan and recording it under the history lock (and the " <>
          "eviction, full topics); send/2: the same message to a process that drops it " <>
          "(its queue off-heap), timed in the rounds of both settings"
    )
  end

  defp join_table(joins, o) do
    Bench.table(
      "A fresh process subscribes to a topic with #{@kept} batches kept",
      "call|reps|caller blocked median|p99|#{@kept}th message median|p99|" <>
        "#{@kept}th vs keeper (decoded)|vs keeper (built)",
      for kind <- @joiners, j = joins[kind] do
        [@join_labels[kind], j.reps, Bench.dur(j.caller.median), Bench.dur(j.caller.p99)] ++
          if j.last,
            do: [
              Bench.dur(j.last.median),
              Bench.dur(j.last.p99),
              Bench.ratio(j.last.median, joins.keeper.last.median),
              Bench.ratio(j.last.median, joins.keeper_built.last.median)
            ],
            else: ["-", "-", "-", "-"]
      end,
      note:
        "#{o.joins} of each kind, in turn; times from the call's start in the new process; " <>
          "the #{@kept} batches kept were dispatched decoded (replayed ones are always " <>
          "decoded); keepers: a process holding #{@kept} batches, decoded (no literals) or " <>
          "built in code (literals shared by send/2), sends them to the new one, then " <>
          "answers its call"
    )
  end

  defp memory_table(m) do
    row = fn name, bytes ->
      if bytes,
        do: [name, Bench.bytes(bytes), Bench.ratio(bytes, m.own), Bench.ratio(bytes, m.accounted)],
        else: [name, "-", "-", "-"]
    end

    Bench.table(
      "#{m.count} kept messages (#{m.topics} topics x #{@kept}), per message",
      "measure|bytes per message|vs the message's own size|vs our accounting",
      [
        row.("our accounting (replay_bytes / replay_messages)", m.accounted),
        row.("VM memory growth (:erlang.memory(:total))", m.vm),
        row.("resident memory growth (VmRSS, /proc/self/status)", m.rss),
        row.("NIF heap growth (allocated_bytes, EX_ATLAS_ALLOC_STATS=1)", m.nif),
        row.("the message: :erts_debug.flat_size/1 words + refc binaries", m.own),
        row.("the message: :erlang.external_size/1", m.external)
      ],
      note:
        "the decoded batch; replay_memory #{Bench.bytes(m.limit)} for this part (room " <>
          "for all); growth measured after collecting every process, around the " <>
          "dispatches, before the other parts run"
    )
  end
end

ReplayBench.main(System.argv())
