# Issue 27's scenario, in cluster mode: 3 000 dispatches of 1 KiB to 20 subscribers on a
# peer node A, this node's link to A killed with :kill right after dispatch 1 000, then
# 50 more dispatches paced 20 ms apart. Three seconds after the last, it prints what A's
# subscribers lack, what this node counted as dropped for A, the last message each
# subscriber got, and how long after the kill the first later dispatch reached them
# (forwarding resumed; both nodes read the same OS clock). Runs against any build with cluster mode (the link is found in
# `Cluster.links_table/0`).
#
#     MIX_ENV=prod mix run bench/link_kill.exs

alias ExAtlas.Fly.Dispatcher
alias ExAtlas.Fly.Dispatcher.Cluster

{:module, _, link_kill_code, _} =
  defmodule LinkKill do
    @moduledoc false

    # On A: a subscriber that counts what it gets and keeps the last number.
    def subscriber(parent, topic) do
      :ok = ExAtlas.Fly.Dispatcher.subscribe(topic)
      send(parent, {:subscribed, self()})
      loop(0, 0, nil)
    end

    # `resumed`: the first message after the kill (number 1 001 on) to arrive, and when.
    defp loop(count, last, resumed) do
      receive do
        {:report, from} ->
          send(from, {:report, self(), count, last, resumed})
          loop(count, last, resumed)

        {:m, seq, _payload} when seq > 1_000 and resumed == nil ->
          loop(count + 1, seq, {seq, System.os_time(:microsecond)})

        {:m, seq, _payload} ->
          loop(count + 1, seq, resumed)
      end
    end

    def start_subscribers(parent, topic, n) do
      for _ <- 1..n, do: spawn(__MODULE__, :subscriber, [parent, topic])
    end
  end

{_, 0} = System.cmd("epmd", ["-daemon"])
{:ok, _} = Node.start(:"link_kill_#{System.unique_integer([:positive])}@127.0.0.1", :longnames)
:ok = Application.stop(:ex_atlas)
Application.put_env(:ex_atlas, :fly, cluster: true)
{:ok, _} = Application.ensure_all_started(:ex_atlas)

paths = Enum.flat_map(:code.get_path(), &[~c"-pa", &1])

{:ok, peer, a} =
  :peer.start_link(%{
    name: :"link_kill_a_#{System.unique_integer([:positive])}",
    host: ~c"127.0.0.1",
    longnames: true,
    args: [~c"-setcookie", Atom.to_charlist(Node.get_cookie())] ++ paths
  })

{:module, LinkKill} =
  :erpc.call(a, :code, :load_binary, [LinkKill, ~c"link_kill.exs", link_kill_code])

:ok = :erpc.call(a, Application, :put_env, [:ex_atlas, :fly, [cluster: true]])
{:ok, _} = :erpc.call(a, Application, :ensure_all_started, [:ex_atlas])

topic = "link_kill"
subs = :erpc.call(a, LinkKill, :start_subscribers, [self(), topic, 20])
for pid <- subs, do: receive(do: ({:subscribed, ^pid} -> :ok))

wait_visible = fn wait ->
  if Enum.any?(:pg.get_members(Cluster.scope(), topic), &(node(&1) == a)),
    do: :ok,
    else:
      (
        Process.sleep(10)
        wait.(wait)
      )
end

wait_visible.(wait_visible)
# A's relay has welcomed the link: the flood starts on a running link, as in the issue.
:ok = Dispatcher.sync(:cluster)
payload = :binary.copy("x", 1_024)
dropped_before = (Cluster.stats()[a] || %{dropped: 0}).dropped

for seq <- 1..3_000 do
  :ok = Dispatcher.dispatch(topic, {:m, seq, payload})

  if seq == 1_000 do
    [{^a, {link, _}}] = :ets.lookup(Cluster.links_table(), a)
    Process.exit(link, :kill)
    Process.put(:killed_at, System.os_time(:microsecond))
  end
end

for seq <- 3_001..3_050 do
  :ok = Dispatcher.dispatch(topic, {:m, seq, payload})
  Process.sleep(20)
end

Process.sleep(3_000)
dropped = (Cluster.stats()[a] || %{dropped: 0}).dropped - dropped_before

reports =
  for pid <- subs do
    send(pid, {:report, self()})
    receive do: ({:report, ^pid, count, last, resumed} -> {count, last, resumed})
  end

counts = reports |> Enum.map(&elem(&1, 0)) |> Enum.uniq()
lasts = reports |> Enum.map(&elem(&1, 1)) |> Enum.uniq()
missing = Enum.map(counts, &(3_050 - &1))
killed_at = Process.get(:killed_at)

resumed =
  case reports |> Enum.map(&elem(&1, 2)) |> Enum.reject(&is_nil/1) do
    [] ->
      "never"

    firsts ->
      {seq, at} = Enum.max_by(firsts, &elem(&1, 1))

      "#{Float.round((at - killed_at) / 1_000, 1)} ms after the kill (the slowest " <>
        "subscriber's first message after it: number #{seq})"
  end

IO.puts(
  "dispatched 3050; missing on A (per subscriber, distinct values): #{inspect(missing)}; " <>
    "counted dropped for A: #{dropped}; last message on A: #{inspect(lasts)} of 3050; " <>
    "forwarding resumed #{resumed}"
)

:peer.stop(peer)
