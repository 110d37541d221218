# The demo (`bash scripts/demo.sh`): Fly log batches to LiveView-like subscribers, through
# ExAtlas.Fly.Dispatcher and through Registry.dispatch/3 (ExAtlas 0.5.0), steady and in a
# burst, on the same subscribers; exits non-zero unless every subscriber got every batch
# of its app, once and in order. See bench/README.md.
#
#     MIX_ENV=prod mix run bench/demo.exs [--subscribers 10000] [--apps 4] [--seconds 4]
#                                         [--interval-ms 100] [--burst 50] [--entries 20]

Code.require_file("support/bench.ex", __DIR__)

defmodule Demo.Viewer do
  @moduledoc false
  # A stand-in for a LiveView showing one app's logs: counts batches and lines, and checks
  # that its app's batches arrive once each, in order.
  use GenServer

  @impl true
  def init({app, original}) do
    :ok = ExAtlas.Fly.Dispatcher.subscribe("ex_atlas_fly_logs:" <> app)
    {:ok, _} = Registry.register(original, "ex_atlas_fly_logs:" <> app, nil)
    {:ok, fresh(app)}
  end

  @impl true
  def handle_info({:ex_atlas_fly_logs, app, [%{"seq" => seq} | _] = entries}, s)
      when app == s.app do
    errors = if seq == s.next, do: s.errors, else: s.errors + 1
    lines = s.lines + length(entries)
    {:noreply, %{s | next: seq + 1, batches: s.batches + 1, lines: lines, errors: errors}}
  end

  def handle_info(_other, s), do: {:noreply, %{s | errors: s.errors + 1}}

  # Answered after every message already in the mailbox: the counts of the phase so far.
  @impl true
  def handle_call(:take, _from, s), do: {:reply, s, fresh(s.app)}

  defp fresh(app), do: %{app: app, next: 1, batches: 0, lines: 0, errors: 0}
end

defmodule Demo do
  @moduledoc false
  alias ExAtlas.Fly.Dispatcher

  @original Demo.OriginalRegistry

  def main(argv) do
    switches =
      [subscribers: :integer, apps: :integer, seconds: :float] ++
        [burst: :integer, interval_ms: :integer, entries: :integer]

    c =
      Bench.options(argv, "demo", switches, fn _ ->
        %{subscribers: 10_000, apps: 4, seconds: 4.0, burst: 50, interval_ms: 100, entries: 20}
      end)

    {:ok, _} = Registry.start_link(keys: :duplicate, name: @original)
    apps = for n <- 1..c.apps, do: "demo-app-#{n}"

    viewers =
      for app <- apps |> Stream.cycle() |> Enum.take(c.subscribers) do
        {:ok, pid} = GenServer.start_link(Demo.Viewer, {app, @original})
        {app, pid}
      end

    stats = Dispatcher.stats()

    IO.puts("""
    ExAtlas.Fly.Dispatcher demo: Fly log batches to LiveView-like subscribers
      #{c.subscribers} subscribers over #{c.apps} apps (#{div(c.subscribers, c.apps)} per \
    app topic), #{c.entries} log lines per batch
      #{System.schedulers_online()} schedulers, Elixir #{System.version()}, OTP \
    #{System.otp_release()}; #{stats.lanes} lanes, #{stats.queue_capacity} dispatches in flight each
    """)

    implementations = [
      {"ExAtlas NIF registry", &Dispatcher.dispatch/2, &Dispatcher.sync/0},
      {"Registry.dispatch/3 (original)", &Bench.registry_dispatch(@original, &1, &2),
       fn -> :ok end}
    ]

    scenarios = [
      {"steady #{c.seconds} s, 1 batch/#{c.interval_ms} ms/app",
       %{interval: c.interval_ms, seconds: c.seconds, limit: :infinity}},
      {"burst of #{c.burst} batches/app", %{interval: 0, seconds: 600, limit: c.burst}}
    ]

    rows =
      for {scenario, pace} <- scenarios, {name, dispatch, sync} <- implementations do
        IO.puts("  measuring #{name}, #{scenario} ...")
        r = run_phase(apps, viewers, c.entries, pace, dispatch, sync)
        blocked = Bench.summary(r.blocked)

        [scenario, name, r.batches, r.deliveries, "#{Bench.sig(r.wall)} s"] ++
          [round(r.deliveries / r.wall), Bench.dur(blocked.median), Bench.dur(blocked.p99)] ++
          [if(r.complete?, do: "yes", else: "NO")]
      end

    Bench.table(
      "ExAtlas NIF registry and Registry.dispatch/3 on the same subscribers",
      ["scenario", "implementation", "batches", "deliveries", "wall", "deliveries/s"] ++
        ["blocked median", "blocked p99", "all delivered"],
      rows,
      left: 2
    )

    if Enum.all?(rows, &(List.last(&1) == "yes")) do
      IO.puts("Every subscriber received every batch of its app, once and in order.")
    else
      IO.puts("INCOMPLETE deliveries: see the last column")
      System.halt(1)
    end
  end

  defp run_phase(apps, viewers, lines, pace, dispatch, sync) do
    parent = self()
    started = System.monotonic_time(:microsecond)
    deadline = System.monotonic_time(:millisecond) + round(pace.seconds * 1000)

    producers =
      for app <- apps do
        spawn_link(fn ->
          template = for line <- 1..lines, do: log_line(app, line)
          run = Map.merge(pace, %{app: app, template: template, dispatch: dispatch})
          run = Map.merge(run, %{deadline: deadline, first: System.monotonic_time(:millisecond)})
          result = produce(run, 1, [])
          :ok = sync.()
          send(parent, {:produced, self(), app, result})
        end)
      end

    results = for pid <- producers, do: receive(do: ({:produced, ^pid, app, r} -> {app, r}))
    # Every producer has synced: all batches are in the viewers' mailboxes.
    wall = (System.monotonic_time(:microsecond) - started) / 1.0e6
    sent = Map.new(results, fn {app, {batches, _}} -> {app, batches} end)
    counts = for {app, pid} <- viewers, do: {app, GenServer.call(pid, :take, :infinity)}

    %{
      batches: Enum.sum(Map.values(sent)),
      deliveries: Enum.sum(for {_, n} <- counts, do: n.batches),
      wall: wall,
      blocked: Enum.flat_map(results, fn {_, {_, blocked}} -> blocked end),
      complete?:
        Enum.all?(counts, fn {app, n} ->
          n.errors == 0 and n.batches == sent[app] and n.lines == sent[app] * lines
        end)
    }
  end

  # Dispatches batch after batch until the deadline or the limit: {batches, [blocked ns]}.
  # (An integer is never greater than the atom :infinity.)
  defp produce(run, seq, blocked) do
    if seq > run.limit or System.monotonic_time(:millisecond) >= run.deadline do
      {seq - 1, blocked}
    else
      # Building the batch is the producer's own work, not part of the dispatch cost.
      message = {:ex_atlas_fly_logs, run.app, Enum.map(run.template, &Map.put(&1, "seq", seq))}
      {:ok, ns} = Bench.timed(fn -> run.dispatch.("ex_atlas_fly_logs:" <> run.app, message) end)

      if run.interval > 0 do
        next = min(run.first + seq * run.interval, run.deadline)
        wait = next - System.monotonic_time(:millisecond)
        if wait > 0, do: Process.sleep(wait)
      end

      produce(run, seq + 1, [ns | blocked])
    end
  end

  defp log_line(app, line) do
    %{
      "timestamp" => "2026-01-01T00:00:#{String.pad_leading("#{rem(line, 60)}", 2, "0")}.000Z",
      "message" => "GET /api/items/#{line} 200 in #{line * 3}ms",
      "level" => "info",
      "instance" => "148e#{line}d9f#{line}",
      "region" => "iad",
      "app" => app
    }
  end
end

Demo.main(System.argv())
