# Fan-out benchmark of issue 5: the ExAtlas NIF dispatcher beside Elixir's Registry (the
# original implementation), :pg and a plain send/2 loop, on the same subscriber processes.
#
#     MIX_ENV=prod mix run bench/fanout.exs            # full run, writes bench/results/fanout.*
#     MIX_ENV=prod mix run bench/fanout.exs --quick    # seconds; writes to a temp dir (CI)
#
# Options: --sizes 1,10,100  --reps N  --threads 1,2  --topics T  --out DIR
# A 100 000-subscriber run needs the default process limit (+P 262144) and a few GiB.

# The parallel compiler resolves the support files' references to each other.
{:ok, _modules, _warnings} =
  __DIR__
  |> Path.join("support/*.ex")
  |> Path.wildcard()
  |> Kernel.ParallelCompiler.require()

FanoutBench.Runner.main(System.argv(), __DIR__)
