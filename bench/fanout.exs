# Fan-out benchmark of issue 5: the ExAtlas NIF dispatcher beside Elixir's Registry (the
# original implementation), :pg and a plain send/2 loop, on the same subscriber processes.
#
#     EX_ATLAS_ALLOC_STATS=1 MIX_ENV=prod mix run bench/fanout.exs          # full run, writes bench/results/fanout.*
#     EX_ATLAS_ALLOC_STATS=1 MIX_ENV=prod mix run bench/fanout.exs --quick  # seconds; temp dir (CI)
#
# EX_ATLAS_ALLOC_STATS=1 builds the NIF with its allocation counter (for the memory per
# subscription); production builds leave it out.
#
# Options: --sizes 1,10,100  --reps N  --lanes 1,2  --delivery dirty|scheduler  --topics T
#          --out DIR  --chart svg|png
# A 100 000-subscriber run needs the default process limit (+P 262144) and a few GiB; the
# full run takes about two minutes on 2 cores. Emulator flags go through ERL_FLAGS, e.g.
# ERL_FLAGS="+sbwt none +sbwtdcpu none +sbwtdio none" (recorded in the results' header).
#
# What it measures, in one VM, on the same subscriber processes (bench/support/*.ex):
#   * fan-out to N = 1 .. 100 000 subscribers of one topic: caller-blocked and end-to-end
#     time (median, p99), deliveries/s and, from N = 1 000, CPU time per delivery by VM
#     thread class; for the NIF, Registry.dispatch/3 (the original), :pg and a send loop;
#   * many topics (10 000 x 10): one dispatch at a time, and a burst over all topics;
#   * subscribe/unsubscribe throughput from 1 and 2 processes, NIF vs Registry;
#   * memory per subscription: NIF allocated_bytes vs the Registry's ETS tables;
#   * one pass per lanes value (the :ex_atlas application restarts between);
#   * the targets of issue 5 with PASS/MISS.

# The parallel compiler resolves the support files' references to each other.
{:ok, _modules, _warnings} =
  __DIR__
  |> Path.join("support/*.ex")
  |> Path.wildcard()
  |> Kernel.ParallelCompiler.require()

FanoutBench.Runner.main(System.argv(), __DIR__)
