# Replay (issue 20): what keeping each topic's recent dispatches costs. In one run:
#
#   1. dispatch/2 with `replay: 100` beside `replay: 0`, caller-blocked and end to end, at
#      each N of `--sizes` subscribers of one topic; the application restarts between the
#      two settings, which take turns round by round (`--rounds`), the history full (100
#      kept) before anything is timed, so every timed dispatch evicts one; and where the
#      caller's time goes, on topics without subscribers, beside one send/2 of the batch;
#   2. subscribe(topic, replay: 100) to a topic with 100 kept batches, from a fresh
#      process, on-heap and off-heap: how long the call blocks, and when the 100th message
#      is in hand; beside subscribe/1 and a process that keeps the 100 batches itself;
#   3. memory per kept message (our accounting, the VM's growth) against the message's
#      own size.
#
#     MIX_ENV=prod mix run bench/replay.exs          # bench/results/replay.md
#     MIX_ENV=prod mix run bench/replay.exs --quick  # seconds; temp dir (CI)
#
# Options: --sizes 10,10000  --rounds R  --reps N (timed dispatches per size, setting and
#          round)  --joins J (subscribes per kind)  --topics T (part 3: T topics x 100)
#          --out DIR. Method, columns and targets: bench/README.md. With
#          EX_ATLAS_ALLOC_STATS=1 part 3 also gives the NIF's own heap.

Code.require_file("support/bench.ex", __DIR__)

defmodule ReplayBench do
  @moduledoc false
  alias ExAtlas.Fly.Dispatcher

  @kept 100
  @built "the batch built in code (Bench.entries/0: its literals shared by send/2)"
  @decoded "the same batch decoded from its external format (no literals, as from JSON)"
  @settings [0, @kept]
  @joiners [:replay_on_heap, :replay_off_heap, :subscribe, :keeper]
  @join_labels %{
    replay_on_heap: "subscribe(topic, replay: #{@kept}), on-heap queue",
    replay_off_heap: "subscribe(topic, replay: #{@kept}), off-heap queue",
    subscribe: "subscribe(topic), no replay",
    keeper: "a process keeping #{@kept} batches sends them (call)"
  }

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

    message = {:ex_atlas_fly_logs, "app1", Bench.entries()}
    # The same batch as a host gets it from a JSON decoder: no literals. A send/2 skips
    # a message's literals (they stay shared), a kept copy cannot (the module holding
    # them may be purged), so how many literals a message holds decides what keeping it
    # costs beside a send.
    decoded = :erlang.binary_to_term(:erlang.term_to_binary(message))
    {dispatch, alone} = dispatch_cost(o, message)
    {decoded_dispatch, _} = dispatch_cost(o, decoded)
    joins = join_cost(o, message)
    memory = memory_cost(o, message)

    machine = machine ++ [load_average_at_end: Bench.load_average()]

    Bench.write(o.out, "replay.md", [
      Bench.header(title, command, machine),
      "The message: `{:ex_atlas_fly_logs, app, entries}` with 20 small maps " <>
        "(#{Bench.bytes(own_bytes(message))} as `:erts_debug.flat_size/1` counts it); " <>
        "#{Dispatcher.stats().lanes} lanes; `replay_memory` at its default (64 MiB) in " <>
        "parts 1 and 2. Method and columns: [bench/README.md](../README.md).\n",
      "## Targets\n",
      targets(dispatch, @built),
      targets(decoded_dispatch, @decoded),
      "## Dispatch with and without replay\n",
      dispatch_table(dispatch, o, @built),
      dispatch_table(decoded_dispatch, o, @decoded),
      alone_table(alone),
      "## Subscribe with replay\n",
      join_table(joins, o),
      "## Memory per kept message\n",
      memory_table(memory)
    ])
  end

  ## 1. Dispatch cost: `replay: 0` and `replay: 100` take turns, round by round.

  defp reps_for(n) when n <= 100, do: 1_000
  defp reps_for(n), do: max(10, div(600_000, n))

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
            acc -> Map.update(acc, key, ns, &(ns ++ &1))
          end
      end

    IO.puts("dispatch cost: #{o.rounds} rounds done")
    Enum.each(pids, &Process.exit(&1, :kill))
    {fanout, alone} = Enum.split_with(samples, &match?({{_, _}, _}, &1))
    {Map.new(fanout, fn {key, rounds} -> {key, Enum.reverse(rounds)} end), Map.new(alone)}
  end

  # Where the caller's time goes: dispatches to topics without subscribers, the batch and
  # a small message, the kinds in turn. With replay, "full" topics keep 100 (each dispatch
  # evicts one), "filling" ones fewer (a new topic every 100 dispatches: none evicts).
  defp unsubscribed(replay, round, message, o) do
    reps = if o.quick, do: 200, else: 2_000
    messages = [batch: message, small: {:ex_atlas_fly_logs, "app1", []}]
    modes = if replay > 0, do: [:full, :filling], else: [:off, :send]
    # The reference: one copy of the message (as the NIF's copy, without literals) by a
    # send/2 to a process that drops what it gets.
    copies =
      Map.new(messages, fn {name, msg} ->
        {name, :erlang.binary_to_term(:erlang.term_to_binary(msg))}
      end)

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
            do: Bench.timed(fn -> send(sink, copies[name]) end),
            else: Bench.timed(fn -> :ok = Dispatcher.dispatch(topic, msg) end)

        {{:alone, name, mode}, ns}
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

  ## 2. Subscribe with replay: a fresh process each time, the kinds taking turns.

  defp join_cost(o, message) do
    :ok = Bench.restart(replay: @kept)
    topic = "replay:join"
    for _ <- 1..@kept, do: :ok = Dispatcher.dispatch(topic, message)
    :ok = Dispatcher.sync()
    kept = Dispatcher.stats().replay_messages
    kept == @kept || raise "#{kept} messages kept for #{topic}, expected #{@kept}"

    # The comparison: a process that keeps the last 100 batches itself (copies without
    # literals, as the NIF's are) and sends them on request, as a GenServer would.
    history = for _ <- 1..@kept, do: :erlang.binary_to_term(:erlang.term_to_binary(message))
    keeper = spawn_link(fn -> keeper(history) end)

    run = fn reps ->
      for rep <- 0..(reps - 1)//1,
          kind <- rotate(@joiners, rep),
          do: {kind, join(kind, topic, keeper)}
    end

    _ = run.(max(2, div(o.joins, 10)))
    samples = run.(o.joins)
    Process.unlink(keeper) && Process.exit(keeper, :kill)
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
          :keeper -> :ok = from_keeper(keeper)
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

  ## 3. Memory: T topics x 100 kept messages, measured around their dispatches.

  defp memory_cost(o, message) do
    own = own_bytes(message)
    count = o.topics * @kept
    # Room for every message even if the accounting were twice the message's size.
    limit = max(64 * 1_048_576, 2 * count * own)
    :ok = Bench.restart(replay: @kept, replay_memory: limit)
    m0 = settled_memory()
    for t <- 1..o.topics, _ <- 1..@kept, do: :ok = Dispatcher.dispatch("memory:#{t}", message)
    :ok = Dispatcher.sync()
    m1 = settled_memory()
    stats = Dispatcher.stats()

    stats.replay_messages == count ||
      raise "#{stats.replay_messages} messages kept, expected #{count}"

    IO.puts("memory: #{count} messages kept")

    %{
      count: count,
      limit: limit,
      topics: o.topics,
      accounted: stats.replay_bytes / count,
      vm: (m1.vm - m0.vm) / count,
      nif: m1.nif && m0.nif && (m1.nif - m0.nif) / count,
      own: own,
      external: :erlang.external_size(message)
    }
  end

  # Every process collected (a closed dispatcher's kept messages go when the last
  # reference to it does), then :erlang.memory(:total) read until it stops changing.
  defp settled_memory do
    Enum.each(Process.list(), &:erlang.garbage_collect/1)

    vm =
      Enum.reduce_while(1..40, :erlang.memory(:total), fn _, bytes ->
        Process.sleep(50)
        now = :erlang.memory(:total)
        if abs(now - bytes) < 4_096, do: {:halt, now}, else: {:cont, now}
      end)

    %{vm: vm, nif: Map.get(Dispatcher.stats(), :allocated_bytes)}
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

  # replay/no-replay ratio of the medians of each round, as `min-max`.
  defp round_ratios(dispatch, n, part) do
    pick = fn rows -> Bench.median(for row <- rows, do: elem(row, part)) end

    ratios =
      for {{round, with}, {round, without}} <- Enum.zip(dispatch[{n, @kept}], dispatch[{n, 0}]),
          do: pick.(with) / pick.(without)

    "#{Bench.sig(Enum.min(ratios))}-#{Bench.sig(Enum.max(ratios))}x"
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
              round_ratios(dispatch, n, 0),
              round_ratios(dispatch, n, 1)
            ]
      end,
      left: 0,
      note:
        "#{o.rounds} rounds, the settings taking turns (the application restarted " <>
          "between them); medians and p99 over every round; per round: the range of " <>
          "the rounds' ratios of medians"
    )
  end

  defp targets(dispatch, label) do
    ns = for {n, _} <- Map.keys(dispatch), uniq: true, do: n

    rows =
      for n <- [10, 10_000], {part, name} <- [{:caller, "caller"}, {:e2e, "end to end"}] do
        text = "#{name} at #{n}: replay: #{@kept} <= 1.10x replay: 0"

        if n in ns do
          ratio = stats(dispatch, n, @kept)[part].median / stats(dispatch, n, 0)[part].median
          {text, Bench.sig(ratio) <> "x", ratio <= 1.10}
        else
          {text, "(size not run)", nil}
        end
      end

    Bench.targets("Targets (issue 20): #{label}", rows, note: "ratios of medians from this run")
  end

  defp alone_table(alone) do
    base = fn name -> Bench.median(alone[{:alone, name, :off}]) end

    Bench.table(
      "Where the caller's time goes: dispatch/2 to a topic without subscribers",
      "message|replay|kept for the topic|dispatches|caller median|caller p99|vs replay: 0|added",
      for name <- [:batch, :small], mode <- [:off, :filling, :full, :send] do
        s = Bench.summary(alone[{:alone, name, mode}])

        [
          if(name == :batch, do: "the 20-line batch", else: "{:ex_atlas_fly_logs, app, []}"),
          %{off: 0, send: "-"}[mode] || @kept,
          %{
            off: "none",
            filling: "fewer than #{@kept}",
            full: "#{@kept}: one evicted",
            send: "(reference: send/2, one copy)"
          }[mode],
          length(alone[{:alone, name, mode}]),
          Bench.dur(s.median),
          Bench.dur(s.p99),
          Bench.ratio(s.median, base.(name)),
          if(mode in [:off, :send], do: "", else: Bench.dur(s.median - base.(name)))
        ]
      end,
      left: 1,
      note:
        "the kinds in turn within each round's setting; the added time is the copy of " <>
          "the message, its measure and the eviction (full topics), under the history " <>
          "lock; send/2: the message without literals (as the NIF's copy) to a process " <>
          "that drops it, timed in the replay: 0 rounds"
    )
  end

  defp join_table(joins, o) do
    base = joins.keeper.last.median

    Bench.table(
      "A fresh process subscribes to a topic with #{@kept} batches kept",
      "call|reps|caller blocked median|p99|#{@kept}th message median|p99|#{@kept}th vs keeper",
      for kind <- @joiners, j = joins[kind] do
        [@join_labels[kind], j.reps, Bench.dur(j.caller.median), Bench.dur(j.caller.p99)] ++
          if j.last,
            do: [
              Bench.dur(j.last.median),
              Bench.dur(j.last.p99),
              Bench.ratio(j.last.median, base)
            ],
            else: ["-", "-", "-"]
      end,
      note:
        "#{o.joins} of each kind, in turn; times from the call's start in the new process; " <>
          "keeper: a process holding #{@kept} copies of the batch (without literals, as " <>
          "the NIF's copies are) sends them to the new one, then answers its call"
    )
  end

  defp memory_table(m) do
    row = fn name, bytes ->
      if bytes,
        do: [name, Bench.bytes(bytes), Bench.ratio(bytes, m.own)],
        else: [name, "-", "-"]
    end

    Bench.table(
      "#{m.count} kept messages (#{m.topics} topics x #{@kept}), per message",
      "measure|bytes per message|vs the message's own size",
      [
        row.("our accounting (replay_bytes / replay_messages)", m.accounted),
        row.("VM memory growth (:erlang.memory(:total))", m.vm),
        row.("NIF heap growth (allocated_bytes, EX_ATLAS_ALLOC_STATS=1)", m.nif),
        row.("the message: :erts_debug.flat_size/1 words + refc binaries", m.own),
        row.("the message: :erlang.external_size/1", m.external)
      ],
      note:
        "replay_memory #{Bench.bytes(m.limit)} for this part (room for all); growth " <>
          "measured after collecting every process, around the dispatches"
    )
  end
end

ReplayBench.main(System.argv())
