defmodule ExAtlas.Fly.Dispatcher.ClusterMixedVersionTest do
  # A rolling deploy across issue 27's protocol change (soak: it builds the earlier
  # version): this node runs this build, a peer runs the build of main before it
  # (@earlier), compiled from git in a temporary directory with its own _build, and its
  # own NIF (built with cargo in target/mixed_version, kept between runs: the VM loads a
  # library only into the module whose functions it has, and this build's has more). They exchange dispatches both ways; a
  # link here killed mid-flood settles against the earlier relay (what it cannot tell is
  # counted as dropped, up to its window of 256 of which some arrived) and warns once;
  # nothing crashes there.
  use ExUnit.Case, async: false

  import ExAtlas.Test.FlyEnv, only: [restart_app: 1, unique_topic: 1, eventually: 2]
  import ExUnit.CaptureLog

  alias ExAtlas.Fly.Dispatcher.Cluster
  alias ExAtlas.Test.Cluster, as: Peers

  @moduletag :cluster
  @moduletag :soak
  @moduletag timeout: 600_000

  @earlier "bfe6913"

  setup_all do
    :ok = Peers.ensure_distribution()

    dir =
      Path.join(System.tmp_dir!(), "ex_atlas_#{@earlier}_#{System.unique_integer([:positive])}")

    File.mkdir_p!(dir)
    on_exit(fn -> File.rm_rf!(dir) end)

    {_, 0} =
      System.cmd("sh", ["-c", "git archive #{@earlier} | tar -x -C #{dir}"],
        stderr_to_stdout: true
      )

    target = Path.expand("target/mixed_version")

    {out, status} =
      System.cmd("cargo", ["build", "--release", "--locked", "-p", "ex_atlas_dispatcher"],
        cd: dir,
        env: [{"CARGO_TARGET_DIR", target}],
        stderr_to_stdout: true
      )

    assert status == 0, out
    File.mkdir_p!(Path.join(dir, "priv/native"))

    File.cp!(
      Path.join(target, "release/libex_atlas_dispatcher.so"),
      Path.join(dir, "priv/native/ex_atlas_dispatcher.so")
    )

    {out, status} =
      System.cmd("mix", ["compile"],
        cd: dir,
        env: [{"MIX_ENV", "prod"}, {"EX_ATLAS_SKIP_NIF_BUILD", "1"}],
        stderr_to_stdout: true
      )

    assert status == 0, out
    ebin = Path.join(dir, "_build/prod/lib/ex_atlas/ebin")
    ours = Path.expand("_build")

    paths =
      [~c"-pa", String.to_charlist(ebin)] ++
        Enum.flat_map(:code.get_path(), fn path ->
          if String.starts_with?(List.to_string(path), ours), do: [], else: [~c"-pa", path]
        end)

    {:ok, peer, old} =
      :peer.start_link(%{
        name: :"ex_atlas_earlier_#{System.unique_integer([:positive])}",
        host: ~c"127.0.0.1",
        longnames: true,
        args:
          [~c"-setcookie", Atom.to_charlist(Node.get_cookie()), ~c"-kernel"] ++
            [~c"logger_level", ~c"error", ~c"-kernel", ~c"prevent_overlapping_partitions"] ++
            [~c"false"] ++ paths
      })

    on_exit(fn ->
      try do
        :peer.stop(peer)
      catch
        :exit, _ -> :ok
      end
    end)

    # The earlier build runs there, with this build's test helpers.
    assert :erpc.call(old, :code, :which, [Cluster])
           |> List.to_string()
           |> String.starts_with?(dir)

    {mod, bin, file} = :code.get_object_code(Peers)
    {:module, _} = :erpc.call(old, :code, :load_binary, [mod, file, bin])
    :ok = :erpc.call(old, Application, :put_env, [:ex_atlas, :fly, [cluster: true]])
    {:ok, _} = :erpc.call(old, Application, :ensure_all_started, [:ex_atlas])
    %{old: old}
  end

  setup do
    restart_app(cluster: true)
  end

  test "an earlier node and this one exchange dispatches; a link killed here is settled",
       %{old: old} do
    topic = unique_topic("cluster:mixed")
    there = Peers.subscriber(old, topic)
    here = Peers.subscriber(node(), topic)
    Peers.await_visible(node(), topic, [old])
    Peers.await_visible(old, topic, [node()])
    relay_there = :erpc.call(old, Process, :whereis, [Cluster.Relay])

    log =
      capture_log(fn ->
        # Both ways.
        producer = Peers.driven_producer(node(), topic, :new)
        :ok = Peers.drive(producer, {:dispatch, 1..1_000})
        assert Peers.drive(producer, :sync) == :ok
        Peers.producer(old, topic, :old, 1_000)
        assert_receive {:produced, :old, :ok}, 60_000

        # This node's link to the earlier node killed mid-flood.
        :ok = Peers.drive(producer, {:dispatch, 1_001..2_000})
        Peers.kill_cluster_process({:link, old}, :kill)
        :ok = Peers.drive(producer, {:dispatch, 2_001..3_000})
        Peers.drive_paced(producer, 3_001..3_050, 20)
        eventually(fn -> Cluster.stats()[old][:queued] == 0 end, 30_000)
        :ok = Peers.drive(producer, :stop)
        # The report round of the link (1 s) has logged.
        Process.sleep(1_100)
      end)

    dropped = Cluster.stats()[old].dropped
    new_there = for {:p, :new, seq} <- Peers.report(there), do: seq
    old_here = for {:p, :old, seq} <- Peers.report(here), do: seq
    assert old_here == Enum.to_list(1..1_000)
    assert Enum.take(new_there, 1_000) == Enum.to_list(1..1_000)
    assert new_there == Enum.sort(new_there) and new_there == Enum.uniq(new_there)
    assert List.last(new_there) == 3_050
    # Nothing missing uncounted. The earlier relay counts per link, so the link that took
    # the killed one's place cannot tell which of its at most 256 messages in flight
    # arrived, and counts them all as dropped: some of those arrived.
    assert length(new_there) + dropped >= 3_050
    assert length(new_there) + dropped - 3_050 <= 256
    # Warned once, by each link of this node to the earlier one.
    assert (length(String.split(log, "runs cluster protocol 1")) - 1) in 1..2
    # Nothing crashed there.
    assert :erpc.call(old, Process, :whereis, [Cluster.Relay]) == relay_there
  end
end
