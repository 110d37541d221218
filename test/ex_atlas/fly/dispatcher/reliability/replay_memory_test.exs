defmodule ExAtlas.Fly.Dispatcher.Reliability.ReplayMemoryTest do
  # Issue 24's bound on what replay holds, in VMs of their own (resident memory is per OS
  # process): `replay_memory` at 32 MiB, 1 000 topics, dispatches round-robin over them
  # until the history is full (evicting by bytes) and has then turned over twice. Per
  # message kind, two fresh peers run the same load, one with replay and one with
  # `replay: 0`:
  #
  #   * `replay_bytes`, sampled every 1 000 dispatches and at the end, never goes past
  #     `replay_memory`;
  #   * the growth of resident memory (VmRSS, after collecting every process) with replay
  #     stays within 1.25 x `replay_memory` plus the growth without it.
  #
  # The per-topic `replay` is set high enough that the byte bound is what binds, and the
  # test checks that it did: fewer messages kept than `replay` x 1 000 topics.
  #
  # The peers run with the VM's segment cache off (`+MMmcs 0`, as README "Replay" advises
  # for hosts where resident memory is tight). With the default cache, each scheduler's
  # allocators keep up to 10 freed segments for some seconds: when the dispatching process
  # moves to the other scheduler mid-load, the history is rebuilt in that scheduler's
  # binary allocator while the first one's freed segments linger, and resident memory
  # briefly shows both (1.1-2.0x replay_memory for the 20-line batch in 10 runs, back
  # under the bound once the cache ages out). What the history holds (`replay_bytes`,
  # checked against what the VM allocates in bench/replay.exs) is within the bound either
  # way.
  use ExUnit.Case, async: false

  import ExAtlas.Test.Cluster, only: [ensure_distribution: 0, start_peer: 3]

  @mib 1024 * 1024
  @replay_memory 32 * @mib
  @topics 1_000
  @vm_args [~c"+MMmcs", ~c"0"]

  {:module, load, load_code, _} =
    defmodule Load do
      @moduledoc false
      # Runs on the peers, loaded there as a binary (they do not have the test modules;
      # `ExAtlas.Test.Reliability` is in test/support, on their code path).

      import ExAtlas.Test.Reliability, only: [collect_garbage: 0, rss_kb: 0]

      alias ExAtlas.Fly.Dispatcher

      @sample 1_000

      @doc """
      Dispatches `kind` messages round-robin over `topics` topics: `dispatches` of them,
      or, given `:turnover`, until the history, once full, has turned over twice. Returns
      the resident memory grown meanwhile (after collecting every process) and what the
      history kept.
      """
      def run(kind, topics, dispatches) do
        names = List.to_tuple(for t <- 1..topics, do: "replay-memory:#{t}")
        template = template(kind)
        collect_garbage()
        before = rss_kb()
        started = System.monotonic_time(:millisecond)
        {dispatched, max_bytes, full} = rounds(kind, template, names, 0, dispatches, 0, nil)
        ms = System.monotonic_time(:millisecond) - started
        collect_garbage()
        rss = rss_kb()
        stats = Dispatcher.stats()

        %{
          growth: (rss - before) * 1024,
          dispatched: dispatched,
          ms: ms,
          max_bytes: max(max_bytes, stats.replay_bytes),
          full: full,
          kept: stats.replay_messages
        }
      end

      # One round of @sample dispatches, then a sample of the stats. `full` is the count
      # kept when the history first evicted, and the dispatch count then.
      defp rounds(kind, template, names, n, until, max_bytes, full) do
        :ok = dispatch(kind, template, names, n, n + @sample)
        n = n + @sample
        %{replay_messages: kept, replay_bytes: bytes} = Dispatcher.stats()
        max_bytes = max(max_bytes, bytes)
        full = full || if(kept < n, do: {kept, n})

        done =
          case {until, full} do
            {:turnover, {kept_full, at}} -> n >= at + 2 * kept_full
            {:turnover, nil} -> false
            {total, _} -> n >= total
          end

        if done,
          do: {n, max_bytes, full},
          else: rounds(kind, template, names, n, until, max_bytes, full)
      end

      defp dispatch(_kind, _template, _names, stop, stop), do: :ok

      defp dispatch(kind, template, names, i, stop) do
        topic = elem(names, rem(i, tuple_size(names)))
        :ok = Dispatcher.dispatch(topic, message(kind, template, i))
        dispatch(kind, template, names, i + 1, stop)
      end

      defp message(:tick, _, i), do: {:tick, i}
      defp message(:ref, _, i), do: {:r, make_ref(), i}
      defp message(_, template, _), do: template

      # The log messages as a host gets them from JSON: decoded, so without literals
      # (as a kept copy has none).
      defp template(:line), do: decoded({:ex_atlas_fly_logs, "app1", entries(1)})
      defp template(:batch), do: decoded({:ex_atlas_fly_logs, "app1", entries(20)})
      defp template(_), do: nil

      defp decoded(term), do: term |> :erlang.term_to_binary() |> :erlang.binary_to_term()

      # As bench/support/bench.ex's `entries/0`.
      defp entries(count) do
        for i <- 1..count do
          %{
            "timestamp" => "2025-01-01T12:00:#{String.pad_leading("#{i}", 2, "0")}Z",
            "message" => "GET /healthz 200 in #{i}ms",
            "level" => "info",
            "instance" => "e784079b449483",
            "region" => "ams"
          }
        end
      end
    end

  @load load
  @load_code load_code

  # `replay` per topic for each kind: 1 000 topics x `replay` messages must be more than
  # 32 MiB holds, so that the byte bound is what binds (checked below). As charged now, a
  # tiny term costs about 260 bytes, so 100 per topic (100 000 of them, about 25 MiB)
  # would stay under it: 1 000 per topic. One log line (about 440 bytes charged: 77 000
  # kept), the 20-line batch (about 3.4 KiB: 9 800) and a term with a reference (a frozen
  # copy, about 4.4 KiB: 7 500) pass it at 100 per topic.
  # The bound on resident growth is issue 24's, 1.25x replay_memory, for every kind.
  # Frozen copies are charged 1.6x what they allocate (nif/kept.rs, FROZEN_SPREAD) because
  # their heap fragments spread over the schedulers' allocator instances: charged at 1x,
  # this test saw 0.92-1.53x with two schedulers (CI once failed at 1.50 of a 1.5 bound),
  # 0.88-0.92x with one; charged at 1.6x, 0.62-0.87x in 40 runs.
  @slack 1.25

  @kinds [
    tick: {"{:tick, n}", 1_000},
    line: {"one log line", 100},
    batch: {"the 20-line batch", 100},
    ref: {"{:r, ref, n} (frozen copy)", 100}
  ]

  setup_all do
    :ok = ensure_distribution()
  end

  for {kind, {label, replay}} <- @kinds do
    test "replay memory of #{label} within the bound, the history turned over twice" do
      measure(unquote(kind), unquote(label), unquote(replay))
    end
  end

  defp measure(kind, label, replay) do
    with_replay = in_peer(kind, [replay: replay, replay_memory: @replay_memory], :turnover)
    {kept_full, full_at} = with_replay.full
    without = in_peer(kind, [replay: 0, replay_memory: @replay_memory], with_replay.dispatched)
    extra = with_replay.growth - without.growth

    IO.puts(
      "\nreplay memory, #{label}: #{with_replay.kept} kept (#{kept_full} when first full, " <>
        "after #{full_at}), #{with_replay.dispatched} dispatches in #{with_replay.ms} ms " <>
        "(#{without.ms} ms without replay); replay_bytes at most #{mib(with_replay.max_bytes)} " <>
        "of #{mib(@replay_memory)} MiB; resident growth #{mib(with_replay.growth)} MiB with " <>
        "replay, #{mib(without.growth)} MiB without: the difference is #{ratio(extra)} x " <>
        "replay_memory (bound #{@slack})"
    )

    assert kept_full < replay * @topics, "the per-topic count bound, not the bytes, bound"
    assert with_replay.dispatched >= full_at + 2 * kept_full
    assert with_replay.max_bytes <= @replay_memory
    assert without.max_bytes == 0

    assert with_replay.growth <= @slack * @replay_memory + without.growth,
           "resident memory grew #{mib(with_replay.growth)} MiB with replay, " <>
             "#{mib(without.growth)} MiB without"
  end

  # Starts a fresh VM with `fly`, runs the load there and stops it.
  defp in_peer(kind, fly, until) do
    name = "replay_memory_#{kind}_#{fly[:replay]}_#{System.unique_integer([:positive])}"
    {peer, node} = start_peer(name, fly, @vm_args)

    try do
      {:module, @load} = :erpc.call(node, :code, :load_binary, [@load, ~c"nofile", @load_code])
      :erpc.call(node, @load, :run, [kind, @topics, until], 60_000)
    after
      :peer.stop(peer)
    end
  end

  defp mib(bytes), do: :erlang.float_to_binary(bytes / @mib, decimals: 1)
  defp ratio(bytes), do: :erlang.float_to_binary(bytes / @replay_memory, decimals: 2)
end
