defmodule FanoutBench.Report do
  @moduledoc false
  # Tables on stdout, Markdown + CSV + gnuplot chart in the output directory, and the
  # issue's target ratios with PASS/MISS.

  alias FanoutBench.{Contenders, Stats}

  ## Per pass

  @doc "Prints the tables and targets of one pass."
  @spec print_pass(map()) :: :ok
  def print_pass(pass) do
    pass |> pass_tables() |> Enum.each(&print_table/1)
    print_table(targets_table(pass))
  end

  @doc "Prints the cross-pass comparison and writes the Markdown, CSV and chart."
  @spec finish([map()], map(), keyword()) :: :ok
  def finish(passes, opts, machine) do
    comparison = lanes_table(passes)
    print_table(comparison)
    File.mkdir_p!(opts.out)
    md = Path.join(opts.out, "fanout.md")
    csv = Path.join(opts.out, "fanout.csv")
    File.write!(md, markdown(passes, opts, machine, comparison))
    File.write!(csv, csv(passes))
    chart = chart(passes, opts, machine)
    IO.puts("\nwrote #{md}\nwrote #{csv}")

    case chart do
      {:ok, path} -> IO.puts("wrote #{path}")
      {:error, why} -> IO.puts("chart skipped: #{why}")
    end
  end

  defp pass_tables(pass) do
    [
      fanout_table(pass),
      cpu_table(pass),
      many_table(pass),
      burst_table(pass),
      churn_table(pass),
      memory_table(pass)
    ]
    |> Enum.reject(&is_nil/1)
  end

  defp cpu_table(pass) do
    burst = for row <- pass.burst, do: Map.put(row, :n, "burst")

    rows =
      for row <- pass.fanout ++ burst, row.cpu != nil do
        plain =
          if row.n == "burst",
            do: Enum.find(burst, &(&1.contender == :plain)),
            else: find(pass.fanout, row.n, :plain)

        [
          to_string(row.n),
          Contenders.label(row.contender),
          Stats.duration(row.cpu.total),
          Stats.duration(row.cpu.schedulers),
          Stats.duration(row.cpu.dirty_cpu),
          Stats.duration(row.cpu.dirty_io),
          Stats.duration(row.cpu.other),
          Stats.ratio(row.cpu.total, plain.cpu.total),
          Stats.duration(row.cpu.wait_per_round)
        ]
      end

    if rows != [] do
      %{
        title: "CPU time per delivery, by VM thread class (lanes = #{pass.lanes})",
        headers: [
          "N",
          "contender",
          "CPU/delivery",
          "normal schedulers",
          "dirty CPU",
          "dirty I/O",
          "other threads",
          "vs plain loop",
          "run-queue wait/round"
        ],
        align: [:r, :l, :r, :r, :r, :r, :r, :r, :r],
        rows: rows,
        note:
          "medians over the reps of on-CPU time of all VM threads during a round " <>
            "(/proc/self/task/*/schedstat) divided by the deliveries; includes the " <>
            "subscribers' receive and GC, the same for every contender; burst = " <>
            "#{pass.topics} topics x #{pass.per_topic}; run-queue wait = time VM threads " <>
            "were runnable but had no core"
      }
    end
  end

  defp fanout_table(pass) do
    rows =
      for row <- pass.fanout do
        plain = find(pass.fanout, row.n, :plain)

        [
          Integer.to_string(row.n),
          Contenders.label(row.contender),
          Integer.to_string(row.reps),
          Stats.duration(row.caller.median),
          Stats.duration(row.caller.p99),
          Stats.duration(row.e2e.median),
          Stats.duration(row.e2e.p99),
          Stats.rate(row.rate),
          Stats.ratio(row.rate, plain.rate)
        ]
      end

    %{
      title: "Fan-out to N subscribers of one topic (lanes = #{pass.lanes})",
      headers: [
        "N",
        "contender",
        "reps",
        "caller median",
        "caller p99",
        "e2e median",
        "e2e p99",
        "deliveries/s",
        "vs plain loop"
      ],
      align: [:r, :l, :r, :r, :r, :r, :r, :r, :r],
      rows: rows,
      note:
        "caller = time the dispatching process is blocked; e2e = until the last subscriber " <>
          "got it; deliveries/s = N / e2e median; p99 = nearest rank (the maximum below 100 reps)"
    }
  end

  defp many_table(pass) do
    %{
      title:
        "Many topics: #{pass.topics} topics x #{pass.per_topic} subscribers, one dispatch " <>
          "per repetition, topics in turn (lanes = #{pass.lanes})",
      headers: ["contender", "reps", "caller median", "caller p99", "e2e median", "e2e p99"],
      align: [:l, :r, :r, :r, :r, :r],
      rows:
        for row <- pass.many do
          [
            Contenders.label(row.contender),
            Integer.to_string(row.reps),
            Stats.duration(row.caller.median),
            Stats.duration(row.caller.p99),
            Stats.duration(row.e2e.median),
            Stats.duration(row.e2e.p99)
          ]
        end,
      note: nil
    }
  end

  defp burst_table(pass) do
    plain = Enum.find(pass.burst, &(&1.contender == :plain))

    %{
      title:
        "Many topics, burst: one dispatch to each of the #{pass.topics} topics back to back " <>
          "(lanes = #{pass.lanes})",
      headers: [
        "contender",
        "reps",
        "caller median (burst)",
        "caller per dispatch",
        "e2e median",
        "deliveries/s",
        "vs plain loop"
      ],
      align: [:l, :r, :r, :r, :r, :r, :r],
      rows:
        for row <- pass.burst do
          [
            Contenders.label(row.contender),
            Integer.to_string(row.reps),
            Stats.duration(row.caller.median),
            Stats.duration(row.caller.median / row.dispatches),
            Stats.duration(row.e2e.median),
            Stats.rate(row.rate),
            Stats.ratio(row.rate, plain.rate)
          ]
        end,
      note: nil
    }
  end

  defp churn_table(pass) do
    rows =
      for row <- pass.churn do
        registry =
          Enum.find(pass.churn, &(&1.workers == row.workers and &1.contender == :registry))

        [
          churn_label(row.contender),
          Integer.to_string(row.workers),
          Integer.to_string(row.k),
          Stats.rate(row.subscribe.median),
          Stats.rate(row.unsubscribe.median),
          Stats.rate(row.pairs.median),
          Stats.ratio(row.subscribe.median, registry.subscribe.median),
          Stats.ratio(row.unsubscribe.median, registry.unsubscribe.median),
          Stats.ratio(row.pairs.median, registry.pairs.median)
        ]
      end

    %{
      title: "Subscribe / unsubscribe throughput (lanes = #{pass.lanes})",
      headers: [
        "contender",
        "processes",
        "topics each",
        "subscribe/s",
        "unsubscribe/s",
        "sub+unsub pairs/s",
        "subscribe vs Registry",
        "unsubscribe vs Registry",
        "pairs vs Registry"
      ],
      align: [:l, :r, :r, :r, :r, :r, :r, :r, :r],
      rows: rows,
      note:
        "operations per second summed over the processes, medians over " <>
          "#{hd(pass.churn).reps} reps of #{hd(pass.churn).cycles} cycles; each process " <>
          "subscribes to its own topics, all of them then unsubscribes all, then " <>
          "subscribe+unsubscribe one topic at a time (pairs)"
    }
  end

  defp churn_label(:nif), do: "ExAtlas NIF subscribe/1"
  defp churn_label(:registry), do: "Registry.register/3"

  defp memory_table(pass) do
    m = pass.memory
    subs = subscription_counts(pass)

    rows =
      for {layout, label} <- [
            fanout: "#{length(subs_sizes(pass))} topics, one per N",
            many: "#{pass.topics} topics x #{pass.per_topic}"
          ],
          {who, name} <- [
            nif: "ExAtlas NIF (Rust heap)",
            registry: "Registry (ETS)",
            pg: ":pg (ETS)"
          ] do
        bytes = m[who][layout]
        per = bytes / subs[layout]

        [
          label,
          name,
          Integer.to_string(subs[layout]),
          Stats.bytes(bytes),
          Stats.sig(per),
          Stats.ratio(per, m.registry[layout] / subs[layout])
        ]
      end

    %{
      title: "Memory per subscription (lanes = #{pass.lanes})",
      headers: ["layout", "store", "subscriptions", "bytes", "bytes/subscription", "vs Registry"],
      align: [:l, :l, :r, :r, :r, :r],
      rows: rows,
      note:
        "NIF: delta of allocated_bytes (Rust allocations; the VM's monitor records are not " <>
          "counted); Registry: delta of its ETS tables' memory; links/monitors of neither counted"
    }
  end

  defp subscription_counts(pass) do
    %{
      fanout: pass |> subs_sizes() |> Enum.sum(),
      many: pass.topics * pass.per_topic
    }
  end

  defp subs_sizes(pass), do: pass.fanout |> Enum.map(& &1.n) |> Enum.uniq()

  ## Targets

  @doc "The issue's targets for one pass: `{text, ratio, required, :ge | :le}` rows."
  @spec targets(map()) :: [map()]
  def targets(pass) do
    nif = fn n -> find(pass.fanout, n, :nif) end
    other = fn n, c -> find(pass.fanout, n, c) end
    churn = fn c, w -> Enum.find(pass.churn, &(&1.contender == c and &1.workers == w)) end
    subs = subscription_counts(pass)
    per = fn who, layout -> pass.memory[who][layout] / subs[layout] end

    [
      target(
        "caller-blocked at 100k <= 1/500 of Registry.dispatch",
        fn -> other.(100_000, :registry).caller.median / nif.(100_000).caller.median end,
        :ge,
        500
      ),
      target(
        "caller-blocked at 100k <= 5x ours at 10",
        fn -> nif.(100_000).caller.median / nif.(10).caller.median end,
        :le,
        5
      ),
      target(
        "e2e deliveries/s at 10k >= 1.3x plain send loop",
        fn -> nif.(10_000).rate / other.(10_000, :plain).rate end,
        :ge,
        1.3
      ),
      target(
        "e2e deliveries/s at 100k >= 1.0x plain send loop",
        fn -> nif.(100_000).rate / other.(100_000, :plain).rate end,
        :ge,
        1.0
      ),
      target(
        "e2e deliveries/s at 10k >= 1.2x Registry.dispatch",
        fn -> nif.(10_000).rate / other.(10_000, :registry).rate end,
        :ge,
        1.2
      ),
      target(
        "e2e deliveries/s at 100k >= 1.2x Registry.dispatch",
        fn -> nif.(100_000).rate / other.(100_000, :registry).rate end,
        :ge,
        1.2
      ),
      target(
        "subscribe/s >= 1.0x Registry.register/3 (1 process)",
        fn -> churn.(:nif, 1).subscribe.median / churn.(:registry, 1).subscribe.median end,
        :ge,
        1.0
      ),
      target(
        "subscribe/s >= 1.0x Registry.register/3 (2 processes)",
        fn -> churn.(:nif, 2).subscribe.median / churn.(:registry, 2).subscribe.median end,
        :ge,
        1.0
      ),
      target(
        "bytes/subscription <= 0.5x Registry's (one topic per N)",
        fn -> per.(:nif, :fanout) / per.(:registry, :fanout) end,
        :le,
        0.5
      ),
      target(
        "bytes/subscription <= 0.5x Registry's (many topics)",
        fn -> per.(:nif, :many) / per.(:registry, :many) end,
        :le,
        0.5
      )
    ]
  end

  defp target(text, ratio_fun, cmp, required) do
    ratio =
      try do
        ratio_fun.()
      rescue
        # A size that was not run (e.g. --quick has no 100k).
        _ in [KeyError, ArgumentError, ArithmeticError, BadMapError, UndefinedFunctionError] ->
          nil
      end

    verdict =
      cond do
        ratio == nil -> "n/a"
        cmp == :ge and ratio >= required -> "PASS"
        cmp == :le and ratio <= required -> "PASS"
        true -> "MISS"
      end

    %{text: text, ratio: ratio, cmp: cmp, required: required, verdict: verdict}
  end

  defp targets_table(pass) do
    %{
      title: "Targets of issue 5 (lanes = #{pass.lanes})",
      headers: ["target", "measured ratio", "required", "verdict"],
      align: [:l, :r, :r, :l],
      rows:
        for t <- targets(pass) do
          [
            t.text,
            if(t.ratio, do: Stats.sig(t.ratio) <> "x", else: "(size not run)"),
            "#{if t.cmp == :ge, do: ">=", else: "<="} #{t.required}x",
            t.verdict
          ]
        end,
      note: "ratios of medians from this pass"
    }
  end

  ## Across passes

  defp lanes_table(passes) do
    rows =
      for n <- passes |> hd() |> Map.fetch!(:fanout) |> Enum.map(& &1.n) |> Enum.uniq(),
          pass <- passes do
        nif = find(pass.fanout, n, :nif)

        [
          Integer.to_string(n),
          Integer.to_string(pass.lanes),
          Stats.duration(nif.caller.median),
          Stats.duration(nif.caller.p99),
          Stats.duration(nif.e2e.median),
          Stats.duration(nif.e2e.p99),
          Stats.rate(nif.rate),
          Stats.ratio(nif.rate, find(pass.fanout, n, :plain).rate),
          Stats.ratio(nif.rate, find(pass.fanout, n, :registry).rate),
          cpu_total(nif)
        ]
      end

    burst_rows =
      for pass <- passes do
        nif = Enum.find(pass.burst, &(&1.contender == :nif))
        plain = Enum.find(pass.burst, &(&1.contender == :plain))
        registry = Enum.find(pass.burst, &(&1.contender == :registry))

        [
          "burst #{pass.topics}x#{pass.per_topic}",
          Integer.to_string(pass.lanes),
          Stats.duration(nif.caller.median),
          Stats.duration(nif.caller.p99),
          Stats.duration(nif.e2e.median),
          Stats.duration(nif.e2e.p99),
          Stats.rate(nif.rate),
          Stats.ratio(nif.rate, plain.rate),
          Stats.ratio(nif.rate, registry.rate),
          cpu_total(nif)
        ]
      end

    %{
      title: "ExAtlas NIF by lanes (each pass against its own contenders)",
      headers: [
        "N",
        "lanes",
        "caller median",
        "caller p99",
        "e2e median",
        "e2e p99",
        "deliveries/s",
        "vs plain loop",
        "vs Registry",
        "CPU/delivery"
      ],
      align: [:r, :r, :r, :r, :r, :r, :r, :r, :r, :r],
      rows: rows ++ burst_rows,
      note: nil
    }
  end

  defp cpu_total(%{cpu: %{total: total}}), do: Stats.duration(total)
  defp cpu_total(_row), do: "-"

  defp find(rows, n, contender) do
    Enum.find(rows, &(&1.n == n and &1.contender == contender)) ||
      raise KeyError, key: {n, contender}, term: :fanout_rows
  end

  ## Rendering

  defp print_table(table) do
    IO.puts("\n" <> table.title)
    widths = widths([table.headers | table.rows])
    IO.puts(text_row(table.headers, widths, table.align))
    IO.puts(Enum.map_join(widths, "  ", &String.duplicate("-", &1)))
    Enum.each(table.rows, &IO.puts(text_row(&1, widths, table.align)))
    if table.note, do: IO.puts("(" <> table.note <> ")")
    :ok
  end

  defp widths(rows) do
    rows
    |> Enum.map(fn row -> Enum.map(row, &String.length/1) end)
    |> Enum.zip_with(&Enum.max/1)
  end

  defp text_row(cells, widths, align) do
    [cells, widths, align]
    |> Enum.zip_with(fn
      [cell, width, :l] -> String.pad_trailing(cell, width)
      [cell, width, :r] -> String.pad_leading(cell, width)
    end)
    |> Enum.join("  ")
    |> String.trim_trailing()
  end

  defp md_table(table) do
    sep = Enum.map(table.align, fn a -> if a == :r, do: "---:", else: ":---" end)
    line = fn cells -> "| " <> Enum.join(cells, " | ") <> " |" end

    [
      "### " <> table.title,
      "",
      line.(table.headers),
      line.(sep),
      Enum.map(table.rows, line),
      if(table.note, do: ["", "_" <> table.note <> "_"], else: []),
      ""
    ]
    |> List.flatten()
    |> Enum.join("\n")
  end

  defp markdown(passes, opts, machine, comparison) do
    target_lines =
      for pass <- passes do
        md_table(targets_table(pass))
      end

    [
      "# ExAtlas fan-out benchmark",
      "",
      "`MIX_ENV=prod mix run bench/fanout.exs#{if opts.quick, do: " --quick", else: ""}` " <>
        "(sizes #{Enum.join(opts.sizes, ", ")}; lanes #{Enum.join(opts.lanes, ", ")}). " <>
        "Message `{:ex_atlas_fly_logs, app, entries}` with 20 small maps (`app` is " <>
        "\"app1\"..\"app4\", one per contender, so each subscriber counts what it got " <>
        "from whom); the same subscriber processes serve all four contenders, which run " <>
        "round-robin inside each repetition. End to end = until the last of the N " <>
        "subscribers has bumped its counter and told the waiting process. The machine " <>
        "may be shared: the load averages below and the run-queue wait in the CPU tables " <>
        "show how much.",
      "",
      "| | |",
      "|:---|:---|",
      Enum.map(machine, fn {key, value} ->
        "| #{key |> to_string() |> String.replace("_", " ")} | #{value} |"
      end),
      "",
      "![caller-blocked and end-to-end time against N](fanout.#{opts.chart})",
      "",
      "_Chart: medians of the pass with lanes = " <>
        "#{primary_pass(passes).lanes}; dashed: the NIF in the other passes._",
      "",
      "## Targets",
      "",
      target_lines,
      "## Lanes",
      "",
      md_table(comparison),
      Enum.map(passes, fn pass ->
        [
          "## Pass: lanes = #{pass.lanes}",
          "" | Enum.map(pass_tables(pass), &md_table/1)
        ]
      end)
    ]
    |> List.flatten()
    |> Enum.join("\n")
  end

  ## CSV: section,lanes,contender,n,procs,metric,value

  defp csv(passes) do
    rows =
      for pass <- passes, row <- csv_rows(pass) do
        Enum.map_join(row, ",", &csv_cell/1)
      end

    Enum.join(["section,lanes,contender,n,procs,metric,value" | rows], "\n") <> "\n"
  end

  defp csv_rows(pass) do
    t = pass.lanes
    subs = subscription_counts(pass)

    fanout =
      for row <- pass.fanout,
          {metric, value} <- timing_metrics(row) do
        ["fanout", t, row.contender, row.n, 1, metric, value]
      end

    many =
      for {section, rows} <- [many_topics: pass.many, many_topics_burst: pass.burst],
          row <- rows,
          {metric, value} <- timing_metrics(row) do
        [section, t, row.contender, pass.topics * pass.per_topic, 1, metric, value]
      end

    churn =
      for row <- pass.churn,
          phase <- [:subscribe, :unsubscribe, :pairs],
          {metric, value} <- [
            {"#{phase}_per_s_median", row[phase].median},
            {"#{phase}_per_s_min", row[phase].min}
          ] do
        ["churn", t, row.contender, row.k, row.workers, metric, value]
      end

    memory =
      for {layout, section} <- [fanout: "memory_one_topic", many: "memory_many_topics"],
          who <- [:nif, :registry, :pg],
          {metric, value} <- [
            bytes: pass.memory[who][layout],
            bytes_per_subscription: pass.memory[who][layout] / subs[layout]
          ] do
        [section, t, who, subs[layout], "", metric, value]
      end

    targets =
      for {target, i} <- Enum.with_index(targets(pass), 1), target.ratio != nil do
        ["target_#{i}", t, :nif, "", "", target.text, target.ratio]
      end

    fanout ++ many ++ churn ++ memory ++ targets
  end

  defp timing_metrics(row) do
    [
      reps: row.reps,
      caller_median_ns: row.caller.median,
      caller_p99_ns: row.caller.p99,
      e2e_median_ns: row.e2e.median,
      e2e_p99_ns: row.e2e.p99,
      deliveries_per_s: row.rate
    ] ++ cpu_metrics(row[:cpu])
  end

  defp cpu_metrics(nil), do: []

  defp cpu_metrics(cpu) do
    [
      cpu_ns_per_delivery: cpu.total,
      cpu_ns_per_delivery_schedulers: cpu.schedulers,
      cpu_ns_per_delivery_dirty_cpu: cpu.dirty_cpu,
      cpu_ns_per_delivery_dirty_io: cpu.dirty_io,
      cpu_ns_per_delivery_other: cpu.other,
      run_queue_wait_ns_per_round: cpu.wait_per_round
    ]
  end

  defp csv_cell(value) when is_float(value) and abs(value) < 100,
    do: :erlang.float_to_binary(value, decimals: 4)

  defp csv_cell(value) when is_float(value), do: :erlang.float_to_binary(value, decimals: 1)

  defp csv_cell(value) when is_binary(value) do
    if String.contains?(value, [",", "\"", "\n"]),
      do: ~s("#{String.replace(value, "\"", "\"\"")}"),
      else: value
  end

  defp csv_cell(value), do: to_string(value)

  ## Chart

  defp chart(passes, opts, machine) do
    case System.find_executable("gnuplot") do
      nil -> {:error, "gnuplot not found (Debian package gnuplot)"}
      gnuplot -> draw(gnuplot, passes, opts.out, opts.chart, machine)
    end
  end

  defp draw(gnuplot, passes, out, format, machine) do
    primary = primary_pass(passes)
    others = passes -- [primary]
    sizes = primary.fanout |> Enum.map(& &1.n) |> Enum.uniq()
    data = Path.join(out, "fanout.dat.tmp")
    script = Path.join(out, "fanout.gp.tmp")
    image = Path.join(out, "fanout." <> format)

    lines =
      for n <- sizes do
        main =
          for part <- [:caller, :e2e], c <- Contenders.all() do
            us(find(primary.fanout, n, c)[part].median)
          end

        extra = for pass <- others, do: us(find(pass.fanout, n, :nif).e2e.median)
        Enum.join([n | main ++ extra], " ")
      end

    File.write!(data, Enum.join(lines, "\n") <> "\n")
    File.write!(script, gnuplot_script(data, image, format, primary, others, machine))
    result = System.cmd(gnuplot, [script], stderr_to_stdout: true)
    File.rm(data)
    File.rm(script)

    case result do
      {_, 0} -> {:ok, image}
      {output, status} -> {:error, "gnuplot exited with #{status}: #{output}"}
    end
  end

  # The pass with the default lane count (schedulers online), else the last one.
  defp primary_pass(passes) do
    default = :erlang.system_info(:schedulers_online)
    Enum.find(passes, List.last(passes), &(&1.lanes == default))
  end

  defp xtics(pass) do
    pass.fanout
    |> Enum.map(& &1.n)
    |> Enum.uniq()
    |> Enum.map_join(", ", &~s("#{short_n(&1)}" #{&1}))
  end

  defp short_n(n) when n >= 1_000 and rem(n, 1_000) == 0, do: "#{div(n, 1_000)}k"
  defp short_n(n), do: Integer.to_string(n)

  defp terminal("svg"),
    do: "set terminal svg size 1200,520 dynamic noenhanced font 'sans,11' background rgb 'white'"

  defp terminal("png"),
    do: "set terminal pngcairo size 1200,520 noenhanced font 'sans,10' background rgb 'white'"

  defp us(ns), do: :erlang.float_to_binary(ns / 1_000, decimals: 3)

  defp gnuplot_script(data, image, format, primary, others, machine) do
    labels = Enum.map(Contenders.all(), &Contenders.label/1)

    styles = [
      "lc rgb '#d62728' lw 2 pt 7",
      "lc rgb '#1f77b4' pt 5",
      "lc rgb '#2ca02c' pt 9",
      "lc rgb '#7f7f7f' pt 13"
    ]

    caller =
      for {{label, style}, i} <- Enum.with_index(Enum.zip(labels, styles)) do
        "'#{data}' using 1:#{i + 2} with linespoints #{style} title '#{label}'"
      end

    e2e =
      for(
        {{label, style}, i} <- Enum.with_index(Enum.zip(labels, styles)),
        do: "'#{data}' using 1:#{i + 6} with linespoints #{style} title '#{label}'"
      ) ++
        for {pass, j} <- Enum.with_index(others) do
          "'#{data}' using 1:#{j + 10} with linespoints lc rgb '#ff7f0e' dt 2 pt 6 " <>
            "title 'ExAtlas NIF, lanes=#{pass.lanes}'"
        end

    """
    #{terminal(format)}
    set output '#{image}'
    set multiplot layout 1,2 title "ExAtlas fan-out of a 20-map message, medians; #{machine[:date]}, #{machine[:machine]}; lanes=#{primary.lanes}"
    set logscale xy
    set grid
    set key top left
    set xtics (#{xtics(primary)})
    set mxtics 10
    set xlabel 'subscribers of the topic (N)'
    set ylabel 'caller blocked per dispatch (us)'
    plot #{Enum.join(caller, ", \\\n     ")}
    set ylabel 'end to end until all N received it (us)'
    plot #{Enum.join(e2e, ", \\\n     ")}
    unset multiplot
    """
  end
end
