# Safety benchmark: does fan-out in the :registry mode harm the host VM? Big messages,
# floods and faults, ours beside a send/2 loop and Registry.dispatch/3, with targets as
# PASS/MISS. What it measures and the targets: bench/README.md.
#
#     MIX_ENV=prod mix run bench/safety.exs [--quick] [--out DIR] [--part 1|2|3]   # about 1 min; --quick ~25 s
#
# Measuring processes run at high priority, so the flood's run queue is not counted as
# their latency; file I/O and count/1 run at normal priority, as a host's would. Nothing
# waits unbounded: what does not answer in 5 s is reported so and left behind (a NIF that
# waited could wedge file I/O in part 3).

Code.require_file("support/bench.ex", __DIR__)

defmodule SafetyBench do
  @moduledoc false

  alias ExAtlas.Fly.Dispatcher

  @big "safety:big"
  @flood "safety:flood"
  @subscribers 5_000
  @producers 24
  # :atomics slots after the producers' progress counters
  @stop @producers + 1
  @raised @producers + 2
  @other @producers + 3
  @cap_ms 5_000
  @registry SafetyBench.Registry

  def main(argv) do
    tmp = System.tmp_dir!()

    # Paths are made now: System.tmp_dir!/0 needs file I/O, which part 3 may wedge.
    cfg =
      Bench.options(argv, "safety", [part: :integer], fn quick ->
        %{
          part: nil,
          probe: Path.join(tmp, "ex_atlas_safety_probe_#{System.pid()}"),
          big_subs: if(quick, do: 1_000, else: 3_000),
          rounds: if(quick, do: 3, else: 10),
          stall_ms: if(quick, do: 500, else: 3_000),
          probes: if(quick, do: {20, 4_000}, else: {30, 25_000})
        }
      end)

    Logger.configure(level: :error)
    Process.flag(:priority, :high)
    machine = Bench.machine()
    IO.puts("ExAtlas safety benchmark#{if cfg.quick, do: " (--quick)"}")
    Enum.each(machine, fn {key, value} -> IO.puts("  #{key}: #{value}") end)

    counter = :atomics.new(1, signed: true)
    parent = self()
    subs = for _ <- 1..@subscribers, do: spawn(fn -> subscriber(counter, parent) end)
    {:ok, _} = Registry.start_link(keys: :duplicate, name: @registry)
    join_registry = fn -> Registry.register(@registry, @flood, nil) |> elem(0) end
    Bench.run_in_each(subs, fn _ -> join_registry end)

    parts = [
      fn -> big_messages(subs, counter, cfg) end,
      fn -> floods(subs, cfg) end,
      fn -> faults(subs, cfg) end
    ]

    tables = for {part, i} <- Enum.with_index(parts, 1), cfg.part in [nil, i], do: part.()
    # 1 s, not 5: a file read that takes longer means file I/O is stuck (part 3).
    load = with {:ok, load, _} <- bounded(&Bench.load_average/0, 1_000), do: load
    load = if load == :timeout, do: "no answer in 1 s", else: load
    write_report(cfg, machine ++ [load_average_at_end: answer(load)], tables)
  end

  ## Subscribers: count the big batch and collect, drop the rest.

  defp subscriber(counter, waiter) do
    Process.flag(:trap_exit, true)
    subscriber_loop(counter, waiter)
  end

  defp subscriber_loop(counter, waiter) do
    receive do
      {:ex_atlas_fly_logs, "big", _entries} ->
        if :atomics.add_get(counter, 1, 1) == 0, do: send(waiter, :round_done)
        # Keeps 3 000 heaps from holding on to copies of an 800 KiB message.
        :erlang.garbage_collect()

      {:ex_atlas_fly_logs, _app, _entries} ->
        :ok

      {:run, from, ref, fun} ->
        Bench.ran(from, ref, fun)

      {:EXIT, _from, _reason} ->
        try do
          Enum.each(Process.get(:topics, []), &join(&1).())
        rescue
          ArgumentError -> Process.send_after(self(), {:EXIT, self(), :retry}, 50)
        end
    end

    subscriber_loop(counter, waiter)
  end

  # Idempotent: whatever the subscriber had for `topic`, it ends with one subscription.
  defp join(topic) do
    fn ->
      Process.put(:topics, [topic])
      :ok = Dispatcher.unsubscribe(topic)
      Dispatcher.subscribe(topic)
    end
  end

  ## 1. Big messages

  defp big_messages(subs, counter, cfg) do
    pids = Enum.take(subs, cfg.big_subs)
    Bench.run_in_each(pids, fn _ -> join(@big) end)
    per_entry = flat_bytes(entries(100)) / 100

    rows =
      for kib <- [8, 64, 200, 800] do
        message = {:ex_atlas_fly_logs, "big", entries(round(kib * 1_024 / per_entry))}
        sender = spawn(fn -> send_loop(pids, message) end)

        contenders = [
          ours: {[self() | senders()], fn -> Dispatcher.dispatch(@big, message) end},
          loop: {[sender], fn -> send(sender, :go) end}
        ]

        %{ours: {ours_e2e, ours, ours_rounds}, loop: {loop_e2e, loop, loop_rounds}} =
          monitored(contenders, cfg, counter, pids)

        send(sender, :stop)
        size = Bench.bytes(flat_bytes(message))
        IO.puts("#{size}: long_schedule ms ours #{list(ours)}, loop #{list(loop)}")

        IO.puts(
          "  with the OS wait of their rounds: ours #{with_wait(ours_rounds)}, loop " <>
            with_wait(loop_rounds)
        )

        worse? = List.first(ours, 0) > List.first(loop, 0)
        {stalls, stall_ms} = machine_stalls(cfg.stall_ms)
        IO.puts("  machine stalls meanwhile: #{list(stalls)}")

        {target, pass?} =
          case kib do
            8 -> {"<= loop's, none", not worse? and ours == []}
            64 -> {"none", ours == []}
            _ -> {"<= loop's", not worse?}
          end

        ["~#{kib} KiB", "#{length(elem(message, 2))}", size, "#{length(ours)}", worst(ours)] ++
          ["#{length(loop)}", worst(loop), median(ours_e2e), median(loop_e2e), target] ++
          [Bench.verdict(pass?), "#{length(stalls)} in #{stall_ms} ms, #{worst(stalls)}"] ++
          [round_wait(ours_rounds), round_wait(loop_rounds)] ++
          [beyond_wait(ours_rounds, loop_rounds)]
      end

    {"1. Big messages: #{cfg.big_subs} subscribers, #{cfg.rounds} rounds, long_schedule >= 2 ms",
     ~w(message entries size ours:events ours:worst loop:events loop:worst ours:e2e loop:e2e) ++
       ["target (ours' events)", "verdict", "machine stalls: events, worst"] ++
       ["ours' rounds: OS wait median, max", "loop's rounds: OS wait median, max"] ++
       ["events beyond their round's OS wait: ours, loop"], rows,
     "ours = the sender processes and the dispatching caller; loop = one process running a " <>
       "send/2 loop over the same pids; e2e = median per round until the last subscriber " <>
       "got it; machine stalls = the long_schedule events of one busy Erlang loop per " <>
       "scheduler that only counts, run alone right after the size's rounds: what the OS " <>
       "takes from any process here (for other threads or the hypervisor), whatever it does; " <>
       "OS wait = how long the OS kept a VM scheduler thread off its core while it was " <>
       "ready to run (the worst scheduler, per round, from /proc/self/task/*/schedstat), " <>
       "which stretches whatever process it runs by as much; events beyond = events more " <>
       "than 1 ms longer than their round's OS wait, which the OS alone cannot explain"}
  end

  # "5 ms (OS wait 9.1 ms)" per round with events.
  defp with_wait(rounds) do
    case for({[_ | _] = ms, off} <- rounds, do: "#{Enum.max(ms)} ms (OS wait #{wait(off)})") do
      [] -> "none"
      rounds -> Enum.join(rounds, ", ")
    end
  end

  defp round_wait(rounds) do
    case for({[], off} <- rounds, off != nil, do: off) do
      [] -> "-"
      offs -> "#{wait(Bench.median(offs))}, #{wait(Enum.max(offs))}"
    end
  end

  defp beyond_wait(ours, loop), do: "#{beyond(ours)}, #{beyond(loop)}"

  # Without schedstat (not Linux) there is no OS wait to judge by.
  defp beyond([{_, nil} | _]), do: "-"

  defp beyond(rounds) do
    beyond = for {ms, off} <- rounds, m <- ms, m > off + 1, do: m
    if beyond == [], do: "0", else: "#{length(beyond)} (worst #{Enum.max(beyond)} ms)"
  end

  defp wait(nil), do: "?"
  defp wait(ms), do: "#{Float.round(ms, 1)} ms"

  # One process per scheduler that only counts, for `ms`, under the same monitor. Such a
  # process yields every few microseconds, so each long_schedule event it gets is time the
  # OS took its scheduler thread's CPU away (for another thread, the VM's own dirty
  # schedulers included, or for the hypervisor): no slice on this machine can be judged
  # below that floor. Returns {events, wall ms}.
  defp machine_stalls(ms) do
    previous = :erlang.system_monitor(self(), long_schedule: 2)

    try do
      stop = :atomics.new(1, signed: false)
      spinners = for _ <- 1..System.schedulers_online(), do: spawn_monitor(fn -> spin(stop) end)
      t0 = now()
      Process.sleep(ms)
      :atomics.put(stop, 1, 1)
      for {pid, ref} <- spinners, do: receive(do: ({:DOWN, ^ref, _, ^pid, _} -> :ok))
      wall = div(now() - t0, 1_000_000)
      owners = Map.new(spinners, fn {pid, _} -> {pid, :machine} end)
      events = long_schedules(owners, nil, %{}) |> Map.get(:machine, [])
      {Enum.sort(events, :desc), wall}
    after
      :erlang.system_monitor(previous)
    end
  end

  defp spin(stop), do: if(:atomics.get(stop, 1) == 0, do: spin(stop))

  # Distinct strings in every entry: nothing is shared or literal, all of it is copied.
  defp entries(n) do
    for i <- 1..n do
      %{
        "timestamp" => "2025-01-01T12:#{rem(div(i, 60), 60)}:#{rem(i, 60)}.#{i}Z",
        "message" => "GET /apps/app-#{i}/healthz 200 in #{rem(i, 97)}ms",
        "level" => "info#{rem(i, 1)}",
        "instance" => "e784079b#{100_000 + i}",
        "region" => "ams#{i}"
      }
    end
  end

  defp flat_bytes(term), do: :erts_debug.flat_size(term) * :erlang.system_info(:wordsize)

  # `cfg.rounds` rounds of each contender, `{processes, start}`, taking turns (the first
  # one alternates), so that the memory the copies land in (the VM's carriers, the
  # kernel's free pages) is in the same state for both; this process is the system
  # monitor meanwhile (the previous one is restored). Per contender: end-to-end times, and
  # the long_schedule `timeout`s (ms) of its processes. An event goes to the contender
  # whose process it is, whenever it arrives; this process's own (it dispatches for
  # `ours`) count in the rounds where it dispatched.
  defp monitored(contenders, cfg, counter, pids) do
    owners =
      for {name, {procs, _}} <- contenders,
          pid <- procs,
          pid != self(),
          into: %{},
          do: {pid, name}

    previous = :erlang.system_monitor(self(), long_schedule: 2)
    _ = long_schedules(%{}, nil, %{})
    empty = Map.new(contenders, fn {name, _} -> {name, {[], [], []}} end)
    schedulers = scheduler_stats()

    try do
      for round <- 1..cfg.rounds,
          {name, {procs, start}} <- turn(contenders, round),
          reduce: empty do
        acc ->
          :atomics.put(counter, 1, -length(pids))
          waited = off_core(schedulers)
          Bench.schedstat_settle()
          t0 = now()
          start.()

          e2e =
            receive(do: (:round_done -> now() - t0), after: (120_000 -> raise "round timed out"))

          # The senders' last slices end after the last delivery: let them report.
          {:ok, :ok, _} = bounded(&Dispatcher.sync/0, @cap_ms)
          Process.sleep(2)
          off = off_core(schedulers, waited)
          mine = if self() in procs, do: name
          events = long_schedules(owners, mine, %{})
          acc = Map.update!(acc, name, fn {e, l, r} -> {[e2e | e], l, [{[], off} | r]} end)

          Enum.reduce(events, acc, fn {owner, ms}, acc ->
            Map.update!(acc, owner, fn {e, l, r} -> {e, ms ++ l, [{ms, off} | r]} end)
          end)
      end
      |> Map.new(fn {name, {e2e, events, rounds}} ->
        {name, {e2e, Enum.sort(events, :desc), rounds}}
      end)
    after
      :erlang.system_monitor(previous)
      Enum.each(schedulers, &File.close/1)
    end
  end

  # How long the OS kept the VM's normal scheduler threads off a core while they were
  # ready to run (Linux's /proc/self/task/*/schedstat, run-queue wait): the time another
  # thread of this machine (a VM helper thread, a kernel thread, another program) took
  # their CPU. Whatever process a scheduler ran meanwhile saw its slice stretched by as
  # much. `off_core/2` is the worst scheduler's wait since `off_core/1`, in ms. Without
  # schedstat (not Linux) it reports nothing.
  defp scheduler_stats do
    for {comm, fd} <- Bench.schedstat_open(), comm =~ ~r/^\d+_scheduler$/, do: fd
  end

  # One reading per scheduler thread, in `fds` order; nil where the read failed.
  defp off_core(fds) do
    for fd <- fds, do: with({_run, wait} <- Bench.schedstat(fd), do: wait)
  end

  defp off_core(fds, before) do
    waits = for {now, was} <- Enum.zip(off_core(fds), before), now && was, do: now - was
    if waits == [], do: nil, else: Enum.max(waits) / 1.0e6
  end

  defp turn(contenders, round),
    do: if(rem(round, 2) == 0, do: Enum.reverse(contenders), else: contenders)

  # The long_schedule events received so far, as owner => [ms]; `self_owner` owns this
  # process's own.
  defp long_schedules(owners, self_owner, acc) do
    receive do
      {:monitor, pid, :long_schedule, info} ->
        owner = if pid == self(), do: self_owner, else: Map.get(owners, pid)

        acc =
          if owner,
            do: Map.update(acc, owner, [info[:timeout]], &[info[:timeout] | &1]),
            else: acc

        long_schedules(owners, self_owner, acc)
    after
      0 -> acc
    end
  end

  defp send_loop(pids, message) do
    receive do
      :go -> Enum.each(pids, &send(&1, message)) && send_loop(pids, message)
      :stop -> :ok
    end
  end

  ## 2. Floods

  defp floods(subs, cfg) do
    runs = [
      {"ours, queue_capacity 1", 1},
      {"Registry.dispatch/3", nil},
      {"ours, queue_capacity 1 024", 1_024}
    ]

    results =
      for {label, capacity} <- runs do
        if capacity, do: restart(subs, capacity)
        IO.puts("flood: #{label}")
        result = flood(if(capacity, do: :nif, else: :registry), &probe_flood(&1, cfg))
        # The fault phase floods the last one's lanes anyway.
        if capacity != 1_024, do: IO.puts("  drained: #{drain(subs, ms() + 30_000)}")
        Map.put(result, :label, label)
      end

    registry = Enum.find(results, &(&1.label == "Registry.dispatch/3"))

    rows =
      for row <- results do
        files = for {:ok, _, ns} <- row.files, do: ns
        timeouts = Enum.count(row.files, &(&1 == :timeout))
        ratio = ratio(files, for({:ok, _, ns} <- registry.files, do: ns))
        waits = [worst_answer(row.status), worst_answer(row.down)]
        pass = [ratio != nil and ratio <= 1.25, Enum.all?(waits, &within?(&1, 10))]

        [row.label, Bench.rate(row.rate), summary(files, :median), summary(files, :p99)] ++
          ["#{length(files)}#{if timeouts > 0, do: " + #{timeouts} no answer in 5 s"}"] ++
          [Bench.ratio(ratio, 1) | Enum.map(waits, &answer/1)] ++
          Enum.map(pass, &if(row == registry, do: "-", else: Bench.verdict(&1))) ++
          ["#{row.raised}/#{row.other}/#{row.stuck}"]
      end

    {"2. Flood: #{@producers} producers, one topic of #{@subscribers} subscribers, 20-map batch",
     ~w(flood dispatches/s) ++
       ["file RT median", "file RT p99", "probes", "vs Registry"] ++
       ["Process.info max", ":kill -> :DOWN max", "RT <= 1.25x", "both < 10 ms"] ++
       ["raised/other/stuck"], rows,
     "file RT = File.write! + File.read! of 2 bytes in another process; Process.info(pid, " <>
       ":status) on all #{@producers} producers at once; :kill of the 3 that answered last; " <>
       "stuck = producers alive 5 s after being told to stop"}
  end

  defp restart(subs, capacity) do
    {:ok, :ok, _} = bounded(fn -> Bench.restart(queue_capacity: capacity) end, 15_000)
    Bench.run_in_each(subs, fn _ -> join(@flood) end)
    # A subscriber told of the old registry while none ran retries 50 ms later: its
    # unsubscribe + subscribe may still be under way.
    await_subscribers(ms() + @cap_ms)
  end

  defp await_subscribers(deadline) do
    case Dispatcher.count(@flood) do
      @subscribers ->
        :ok

      n when is_integer(n) ->
        if ms() > deadline,
          do: raise("#{n} of #{@subscribers} subscribers in #{@flood} after #{@cap_ms} ms"),
          else: Process.sleep(10) && await_subscribers(deadline)
    end
  end

  # Starts the producers, lets the lanes fill, runs `measure`, stops the producers.
  defp flood(kind, measure) do
    message = {:ex_atlas_fly_logs, "app", Bench.entries()}
    ctr = :atomics.new(@other, signed: false)
    producers = for i <- 1..@producers, do: spawn(fn -> produce(kind, message, ctr, i) end)
    Process.sleep(300)
    {c0, t0} = {Enum.sum(progress(ctr)), now()}
    result = measure.({producers, ctr})
    rate = (Enum.sum(progress(ctr)) - c0) / ((now() - t0) / 1.0e9)
    :atomics.put(ctr, @stop, 1)
    deadline = ms() + @cap_ms
    stuck = Enum.count(producers, &(await_down(&1, deadline) == :timeout))
    IO.puts("  #{Bench.rate(rate)} dispatches/s; producers alive 5 s after stop: #{stuck}")
    counts = %{raised: :atomics.get(ctr, @raised), other: :atomics.get(ctr, @other)}
    Map.merge(result, Map.merge(counts, %{rate: rate, stuck: stuck}))
  end

  defp produce(kind, message, ctr, i) do
    if :atomics.get(ctr, @stop) == 0 do
      try do
        if kind == :nif,
          do: Dispatcher.dispatch(@flood, message),
          else: Bench.registry_dispatch(@registry, @flood, message)
      rescue
        ArgumentError -> :atomics.add(ctr, @raised, 1) && Process.sleep(1)
      catch
        _kind, _reason -> :atomics.add(ctr, @other, 1) && Process.sleep(1)
      end

      :atomics.add(ctr, i, 1)
      produce(kind, message, ctr, i)
    end
  end

  defp progress(ctr), do: for(i <- 1..@producers, do: :atomics.get(ctr, i))

  defp drain(subs, deadline) do
    queued? = &match?({:message_queue_len, n} when n > 0, Process.info(&1, :message_queue_len))

    cond do
      not Enum.any?(senders() ++ subs, queued?) -> true
      ms() > deadline -> false
      true -> Process.sleep(50) && drain(subs, deadline)
    end
  end

  defp probe_flood({producers, _ctr}, cfg) do
    {count, window} = cfg.probes
    files = probe_files(cfg.probe, count, ms() + window, [])
    deadline = ms() + @cap_ms
    infos = Enum.map(producers, &async(fn -> Process.info(&1, :status) end, :high))
    infos = Enum.zip(producers, Enum.map(infos, &await(&1, deadline)))
    slowest = fn {_, answer} -> with {_, _, ns} <- answer, do: ns, else: (_ -> :infinity) end
    victims = infos |> Enum.sort_by(slowest, :desc) |> Enum.take(3) |> Enum.map(&elem(&1, 0))
    refs = Enum.map(victims, &Process.monitor/1)
    t0 = now()
    Enum.each(victims, &Process.exit(&1, :kill))
    downs = Enum.map(refs, &await_ref(&1, t0, ms() + @cap_ms))
    %{files: files, status: Enum.map(infos, &elem(&1, 1)), down: downs}
  end

  defp probe_files(path, left, deadline, acc) do
    case left > 0 and ms() < deadline and bounded(file_round_trip(path), @cap_ms) do
      false -> acc
      :timeout -> [:timeout | acc]
      answer -> Process.sleep(10) && probe_files(path, left - 1, deadline, [answer | acc])
    end
  end

  defp file_round_trip(path), do: fn -> File.write!(path, "ok") && File.read!(path) end

  defp await_down(pid, deadline), do: await_ref(Process.monitor(pid), now(), deadline)

  defp await_ref(ref, t0, deadline) do
    receive do
      {:DOWN, ^ref, _, _, _} -> {:ok, :down, now() - t0}
    after
      max(0, deadline - ms()) -> :timeout
    end
  end

  ## 3. Faults

  defp faults(subs, cfg) do
    IO.puts("faults under the flood (queue_capacity 1 024)")
    sender = fn i -> {"sender #{i}", fn -> Enum.at(senders(), i - 1) end} end
    named = fn {label, name} -> {label, fn -> Process.whereis(name) end} end

    targets =
      Enum.map(1..length(senders())//1, sender) ++
        Enum.map(
          [
            {"server", Dispatcher.registry_name()},
            {"watchdog", ExAtlas.Fly.Dispatcher.Watchdog},
            {"supervisor", ExAtlas.Fly.Dispatcher.Supervisor}
          ],
          named
        )

    result =
      flood(:nif, fn {_, ctr} -> %{steps: Enum.map(targets, &fault(&1, subs, ctr, cfg))} end)

    {"3. Faults under the flood (queue_capacity 1 024): kill each of our processes in turn",
     ["killed", "all #{@producers} producers progressed", "count/1 answered", "file RT"] ++
       ["subscriptions 2 s later", "ArgumentErrors", "all <= 1 s", "#{@subscribers} kept/told"],
     result.steps,
     "from the kill, side by side, each capped at 5 s; ArgumentErrors = producers' raises " <>
       "during the step (whole phase: #{result.raised}; other errors #{result.other}; producers " <>
       "alive 5 s after being told to stop: #{result.stuck}); before each kill the subscribers " <>
       "subscribe again (idempotent) and the lanes refill for 0.5 s"}
  end

  defp fault({name, find}, subs, ctr, cfg) do
    # Each kill under the same flood: all subscriptions back, the lanes full again.
    bounded(fn -> Bench.run_in_each(subs, fn _ -> join(@flood) end) end, @cap_ms)
    Process.sleep(500)
    pid = with {:ok, pid, _} when is_pid(pid) <- bounded(find, @cap_ms), do: pid
    {before, raised, t0} = {progress(ctr), :atomics.get(ctr, @raised), ms()}
    if is_pid(pid), do: Process.exit(pid, :kill)
    progressed = async(fn -> await_progress(ctr, before) end, :high)
    count = async(fn -> Dispatcher.count(@flood) end)
    file = async(file_round_trip(cfg.probe))
    answers = Enum.map([progressed, count, file], &await(&1, t0 + @cap_ms))
    # Two seconds per step keep the supervisors under their restart intensity (3 in 5 s).
    Process.sleep(max(0, t0 + 2_000 - ms()))

    subscriptions =
      case bounded(fn -> Dispatcher.count(@flood) end, @cap_ms) do
        {:ok, n, _} -> n
        {:raised, %ArgumentError{}, _} -> "registry not running (ArgumentError)"
        other -> answer(other)
      end

    name = if is_pid(pid), do: name, else: "#{name} (not running: #{inspect(pid)})"
    IO.puts("  killed #{name}: #{Enum.map_join(answers, ", ", &answer/1)}")
    fast = Enum.all?(answers, &within?(&1, 1_000))
    raised = :atomics.get(ctr, @raised) - raised

    [name | Enum.map(answers, &answer/1)] ++
      [
        "#{subscriptions}",
        "#{raised}",
        Bench.verdict(fast),
        Bench.verdict(subscriptions == @subscribers)
      ]
  end

  defp await_progress(ctr, before) do
    if Enum.all?(Enum.zip(progress(ctr), before), fn {now, was} -> now > was end),
      do: :ok,
      else: Process.sleep(1) && await_progress(ctr, before)
  end

  defp senders do
    ExAtlas.Fly.Dispatcher.Server.senders()
  rescue
    _ -> []
  end

  ## Bounded calls: {:ok, value, ns}, {:raised, exception, ns} or :timeout.

  defp bounded(fun, timeout_ms), do: await(async(fun), ms() + timeout_ms)

  defp async(fun, priority \\ :normal) do
    {parent, ref} = {self(), make_ref()}

    pid =
      spawn(fn ->
        Process.flag(:priority, priority)
        t0 = now()

        result =
          try do
            {:ok, fun.()}
          rescue
            e -> {:raised, e}
          catch
            kind, reason -> {:raised, {kind, reason}}
          end

        send(parent, {ref, Tuple.append(result, now() - t0)})
      end)

    {ref, pid}
  end

  # What has not answered by `deadline` (ms) is killed, or left behind where it cannot be.
  defp await({ref, pid}, deadline) do
    receive do
      {^ref, result} -> result
    after
      max(0, deadline - ms()) -> Process.exit(pid, :kill) && :timeout
    end
  end

  defp now, do: System.monotonic_time(:nanosecond)
  defp ms, do: System.monotonic_time(:millisecond)

  ## Report

  defp answer(:timeout), do: "no answer in 5 s"
  defp answer({:ok, _, ns}), do: Bench.dur(ns)
  defp answer({:raised, %ArgumentError{}, ns}), do: Bench.dur(ns) <> " (ArgumentError)"
  defp answer({:raised, e, ns}), do: Bench.dur(ns) <> " (raised #{inspect(e, limit: 3)})"
  defp answer(text) when is_binary(text), do: text

  defp within?({_, _, ns}, limit_ms), do: ns <= limit_ms * 1_000_000
  defp within?(_, _), do: false

  defp worst_answer(answers) do
    Enum.find(answers, &(&1 == :timeout)) || Enum.max_by(answers, fn {_, _, ns} -> ns end)
  end

  defp worst(events), do: if(events == [], do: "none", else: "#{hd(events)} ms")
  defp list(events), do: inspect(events, charlists: :as_lists)
  defp median(samples), do: summary(samples, :median)
  defp summary([], _key), do: "-"
  defp summary(samples, key), do: Bench.dur(Map.fetch!(Bench.summary(samples), key))
  defp ratio([_ | _] = a, [_ | _] = b), do: Bench.median(a) / Bench.median(b)
  defp ratio(_, _), do: nil

  defp write_report(cfg, machine, tables) do
    command = Bench.command("safety.exs")
    header = Bench.header("ExAtlas safety benchmark", command, machine)

    tables =
      for {title, headers, rows, note} <- tables,
          do: Bench.table(title, headers, rows, note: note)

    text = Enum.join([header | tables], "\n")
    path = Path.join(cfg.out, "safety.md")

    # File I/O needs the dirty I/O schedulers; where part 3 left them stuck, a shell (a
    # port, no dirty scheduler) writes the file. For the same reason nothing from here on
    # may need a module not loaded yet (the code server reads .beam files): no inspect/1.
    shell = ["-c", ~S|mkdir -p "$(dirname "$0")" && printf %s "$1" > "$0"|, path, text]

    with {:ok, _, _} <- bounded(fn -> Bench.write(cfg.out, "safety.md", [text]) end, 1_000) do
      :ok
    else
      stuck ->
        why = if stuck == :timeout, do: "no answer in 1 s", else: answer(stuck)

        case bounded(fn -> System.cmd("/bin/sh", shell) end, @cap_ms) do
          {:ok, {_, 0}, _} ->
            IO.puts("wrote #{path} with /bin/sh (File.write!: #{why})")

          other ->
            IO.puts("could not write #{path}: File.write!: #{why}; /bin/sh: #{answer(other)}")
        end
    end
  end
end

SafetyBench.main(System.argv())
# Producers stuck in a NIF (part 3, before issue 9) keep the VM from stopping by itself.
System.halt(0)
