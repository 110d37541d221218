defmodule ExAtlas.Fly.Dispatcher.ClusterDepartureTest do
  # The departure, hold and return logic of a cluster link (`Cluster.Link.Presence`), as
  # plain data: events in, state and actions out. No process, no node, no table: pids
  # and refs below are only values.
  use ExUnit.Case, async: true

  alias ExAtlas.Fly.Dispatcher.Cluster.Link.Presence

  describe "greeting" do
    test "a new link greets the node, and again each time its latest greeting's timer runs out" do
      {p, [{:greet, first}]} = Presence.new()
      assert Presence.relay(p) == nil
      refute Presence.expired?(p)

      {p, [{:greet, second}]} = Presence.hello_again(p, first)
      assert second != first
      # The first greeting's timer is no longer current.
      assert {^p, []} = Presence.hello_again(p, first)
      assert {_p, [{:greet, _}]} = Presence.hello_again(p, second)
    end

    test "the node connecting greets at once; the earlier greeting's timer is then stale" do
      {p, [{:greet, first}]} = Presence.new()
      {p, [{:greet, _now}]} = Presence.nodeup(p)
      assert {^p, []} = Presence.hello_again(p, first)
    end

    test "the first welcome resumes sending and makes the node a peer" do
      {p, [{:greet, token}]} = Presence.new()
      {p, actions} = Presence.welcome(p, relay(), 7, [])

      assert actions == [{:resume, relay(), 7}, :add_peer]
      assert Presence.relay(p) == relay()
      # Welcomed: no more greetings, whatever comes.
      assert {^p, []} = Presence.hello_again(p, token)
      assert {^p, []} = Presence.nodeup(p)
    end

    test "a relay that answers late (an earlier greeting) once another welcomed the link is ignored" do
      {p, _} = Presence.new()
      {p, _} = Presence.welcome(p, relay(), 3, [])
      assert {^p, []} = Presence.welcome(p, new_relay(), 0, [])
      assert Presence.relay(p) == relay()
    end
  end

  describe "departure" do
    test "pauses sending, holds the node's groups, starts the hold and greets" do
      p = welcomed(["a", "b"])
      {p, actions} = Presence.departed(p)

      assert [:pause, {:hold, _}, {:greet, _}] = actions
      assert Presence.relay(p) == nil
      refute Presence.expired?(p)
      # The rows stay: what the node misses is queued for it.
      assert Presence.interest(p) == MapSet.new(["a", "b"])
    end

    test "the relay's leaves as it goes (:pg, node disconnected) are held under one hold" do
      p = welcomed(["a", "b"])
      {p, [:pause, {:hold, hold}, {:greet, _}]} = Presence.departed(p)

      assert {p, []} = Presence.left(p, "a", relay(), false)
      assert {p, []} = Presence.left(p, "b", relay(), false)
      assert Presence.interest(p) == MapSet.new(["a", "b"])

      # Back within the hold, still wanting both: nothing goes.
      {p, actions} = Presence.welcome(p, new_relay(), 0, ["a", "b"])
      assert actions == [{:resume, new_relay(), 0}, :add_peer]
      assert Presence.interest(p) == MapSet.new(["a", "b"])

      # `:pg` shows them again; the hold is then over early, its timer stale.
      {p, [{:add_interest, "a"}]} = Presence.joined(p, "a")
      {p, [{:add_interest, "b"}]} = Presence.joined(p, "b")
      assert {^p, []} = Presence.hold_over(p, hold, true)
      assert Presence.interest(p) == MapSet.new(["a", "b"])
    end

    test "a welcome lets go of the held groups the node no longer wants" do
      p = welcomed(["a", "b"])
      {p, _} = Presence.departed(p)
      {p, []} = Presence.left(p, "a", relay(), false)
      {p, []} = Presence.left(p, "b", relay(), false)

      {p, actions} = Presence.welcome(p, new_relay(), 0, ["b"])
      assert actions == [{:resume, new_relay(), 0}, :add_peer, {:remove_interest, "a"}]
      assert Presence.interest(p) == MapSet.new(["b"])
    end

    test "a second departure within the hold does not start another hold" do
      p = welcomed(["a"])
      {p, [:pause, {:hold, hold}, {:greet, _}]} = Presence.departed(p)
      {p, []} = Presence.left(p, "a", relay(), false)
      {p, _} = Presence.welcome(p, new_relay(), 0, ["a"])

      assert {p, [:pause, {:greet, _}]} = Presence.departed(p)
      {p, actions} = Presence.hold_over(p, hold, false)
      assert actions == [{:remove_interest, "a"}, :expire]
      assert Presence.expired?(p)
    end

    test "a leave of a member other than the welcomed relay, or from a node cut off, is held" do
      # A relay from before the one that welcomed us; the welcomed one, node disconnected.
      for {pid, connected?} <- [{old_relay(), true}, {relay(), false}] do
        {p, [{:hold, _}]} = Presence.left(welcomed(["a"]), "a", pid, connected?)
        assert Presence.interest(p) == MapSet.new(["a"])
        assert {_p, []} = Presence.retry_ping(p)
      end
    end
  end

  describe "a node that comes back after the hold" do
    test "has its held groups let go, what was queued dropped, and stops being a peer" do
      p = welcomed(["a"])
      {p, [:pause, {:hold, hold}, {:greet, _}]} = Presence.departed(p)
      {p, []} = Presence.left(p, "a", relay(), true)

      {p, actions} = Presence.hold_over(p, hold, true)
      assert actions == [{:remove_interest, "a"}, :remove_peer, :expire]
      assert Presence.expired?(p)
      assert Presence.interest(p) == MapSet.new()
    end

    test "stays a peer while disconnected (it may come back with cluster mode)" do
      p = welcomed([])
      {p, [:pause, {:hold, hold}, {:greet, _}]} = Presence.departed(p)
      {p, actions} = Presence.hold_over(p, hold, false)
      assert actions == [:expire]
      assert Presence.expired?(p)
    end

    test "is welcomed as on any return: sending resumes, a peer again, its groups from :pg" do
      p = welcomed(["a"])
      {p, [:pause, {:hold, hold}, {:greet, greeting}]} = Presence.departed(p)
      {p, []} = Presence.left(p, "a", relay(), false)
      {p, _} = Presence.hold_over(p, hold, true)

      # Still greeting after the hold.
      {p, [{:greet, _}]} = Presence.hello_again(p, greeting)

      {p, actions} = Presence.welcome(p, new_relay(), 12, ["a"])
      assert actions == [{:resume, new_relay(), 12}, :add_peer]
      refute Presence.expired?(p)
      assert Presence.relay(p) == new_relay()

      {p, [{:add_interest, "a"}]} = Presence.joined(p, "a")
      assert Presence.interest(p) == MapSet.new(["a"])
    end

    test "back before the hold is over, with a held group not rejoined yet: that group goes" do
      p = welcomed(["a", "b"])
      {p, [:pause, {:hold, hold}, {:greet, _}]} = Presence.departed(p)
      {p, []} = Presence.left(p, "a", relay(), false)
      {p, []} = Presence.left(p, "b", relay(), false)
      {p, _} = Presence.welcome(p, new_relay(), 0, ["a", "b"])
      {p, _} = Presence.joined(p, "a")

      {p, actions} = Presence.hold_over(p, hold, true)
      assert actions == [{:remove_interest, "b"}]
      refute Presence.expired?(p)
      assert Presence.interest(p) == MapSet.new(["a"])
    end
  end

  describe "a leave it cannot yet tell apart from a departure" do
    test "is kept until the relay answers a ping; then the group goes" do
      p = welcomed(["a"])
      {p, [:ping]} = Presence.left(p, "a", relay(), true)
      assert Presence.interest(p) == MapSet.new(["a"])

      ping = make_ref()
      p = Presence.pinged(p, ping)
      {p, actions} = Presence.pong(p, ping)
      assert actions == [{:remove_interest, "a"}]
      assert Presence.interest(p) == MapSet.new()
    end

    test "is held when the relay departs before it answers; its late answer is ignored" do
      {p, ping} = pinged_after_leave(["a"], "a")
      {p, [:pause, {:hold, hold}, {:greet, _}]} = Presence.departed(p)
      assert {^p, []} = Presence.pong(p, ping)
      assert Presence.interest(p) == MapSet.new(["a"])

      # Back, and still wanting it: kept until `:pg` shows it again or the hold is over.
      {p, actions} = Presence.welcome(p, new_relay(), 0, ["a"])
      assert actions == [{:resume, new_relay(), 0}, :add_peer]
      assert Presence.interest(p) == MapSet.new(["a"])
      assert {_p, [{:remove_interest, "a"}]} = Presence.hold_over(p, hold, true)
    end

    test "is let go by a welcome that no longer has it, after a departure" do
      {p, _ping} = pinged_after_leave(["a"], "a")
      {p, _} = Presence.departed(p)

      {p, actions} = Presence.welcome(p, new_relay(), 0, [])
      assert actions == [{:resume, new_relay(), 0}, :add_peer, {:remove_interest, "a"}]
      assert Presence.interest(p) == MapSet.new()
    end

    test "a pong covers the leaves before its ping only; the link pings again for later ones" do
      {p, first} = pinged_after_leave(["a", "b"], "a")
      # The ping is out: a second leave waits for the next one.
      {p, []} = Presence.left(p, "b", relay(), true)

      {p, actions} = Presence.pong(p, first)
      assert actions == [{:remove_interest, "a"}, :ping]
      assert Presence.interest(p) == MapSet.new(["b"])

      second = make_ref()
      p = Presence.pinged(p, second)
      {p, [{:remove_interest, "b"}]} = Presence.pong(p, second)
      assert Presence.interest(p) == MapSet.new()
    end

    test "a rejoin before the pong keeps the group" do
      {p, ping} = pinged_after_leave(["a"], "a")
      {p, [{:add_interest, "a"}]} = Presence.joined(p, "a")

      assert {p, []} = Presence.pong(p, ping)
      assert Presence.interest(p) == MapSet.new(["a"])
    end

    test "a ping that could not go out is asked for again while a leave waits for it" do
      p = welcomed(["a"])
      {p, [:ping]} = Presence.left(p, "a", relay(), true)
      # Not confirmed by pinged/2 (busy distribution): the retry asks again.
      assert {p, [:ping]} = Presence.retry_ping(p)

      p = Presence.pinged(p, make_ref())
      # One out already: no second.
      assert {^p, []} = Presence.retry_ping(p)
    end

    test "a retry with no leave waiting (it was rejoined, or the relay departed) asks nothing" do
      p = welcomed(["a"])
      {p, [:ping]} = Presence.left(p, "a", relay(), true)
      {p, _} = Presence.joined(p, "a")
      assert {_p, []} = Presence.retry_ping(p)

      {p, [:ping]} = Presence.left(welcomed(["a"]), "a", relay(), true)
      {p, _} = Presence.departed(p)
      assert {_p, []} = Presence.retry_ping(p)
    end

    test "while no relay is there, every leave is held and nothing is pinged" do
      {p, _} = Presence.new()
      {p, _} = Presence.snapshot(p, ["a"])
      {p, [{:hold, _}]} = Presence.left(p, "a", relay(), true)
      assert {_p, []} = Presence.retry_ping(p)
    end
  end

  describe "interest from :pg" do
    test "a snapshot adds every group, and holds those it no longer shows" do
      {p, _} = Presence.new()
      {p, actions} = Presence.snapshot(p, ["a", "b", "c"])

      assert Enum.sort(actions) == [
               {:add_interest, "a"},
               {:add_interest, "b"},
               {:add_interest, "c"}
             ]

      {p, _} = Presence.welcome(p, relay(), 0, ["a", "b", "c"])

      # "b" leaves and waits for a ping; then the scope restarts, and shows "a" only: it
      # has not synced "c" yet, which is held.
      {p, [:ping]} = Presence.left(p, "b", relay(), true)
      {p, actions} = Presence.snapshot(p, ["a"])
      assert [{:add_interest, "a"}, {:hold, hold}] = actions
      assert Presence.interest(p) == MapSet.new(["a", "b", "c"])
      # Once the hold is over, "c" goes.
      assert {p, [{:remove_interest, "c"}]} = Presence.hold_over(p, hold, true)
      assert Presence.interest(p) == MapSet.new(["a", "b"])
    end

    test "a join ends a hold once nothing else is held" do
      p = welcomed(["a"])
      {p, [{:hold, hold}]} = Presence.left(p, "a", old_relay(), true)
      {p, [{:add_interest, "a"}]} = Presence.joined(p, "a")
      assert {^p, []} = Presence.hold_over(p, hold, true)
    end
  end

  # The relay that welcomes the link, one that answers after it departed, and one from
  # before it: values only, no such processes.
  defp relay, do: :erlang.list_to_pid(~c"<0.4242.0>")
  defp new_relay, do: :erlang.list_to_pid(~c"<0.4243.0>")
  defp old_relay, do: :erlang.list_to_pid(~c"<0.4241.0>")

  # A link welcomed by relay(), whose node is in `groups`.
  defp welcomed(groups) do
    {p, _} = Presence.new()
    {p, _} = Presence.snapshot(p, groups)
    {p, _} = Presence.welcome(p, relay(), 0, groups)
    p
  end

  # The same, after its relay left `group` with the node connected: pinged, no answer yet.
  defp pinged_after_leave(groups, group) do
    {p, [:ping]} = Presence.left(welcomed(groups), group, relay(), true)
    ping = make_ref()
    {Presence.pinged(p, ping), ping}
  end
end
