defmodule ExAtlas.Fly.Dispatcher.Cluster.Link.Presence do
  @moduledoc false
  # Whether the other node's relay is there for its link, and which of the node's
  # interest the link keeps forwarding while it is not: the departure, hold and return
  # logic of `Cluster.Link`, as plain data. Each event the link sees goes in, and out come
  # the new state and the actions the link is to carry out, in order. Nothing here sends,
  # monitors, schedules, reads the clock or touches a table; the link does all of that.
  #
  # The relay is there from its welcome (`welcome/4`, the answer to a greeting) until its
  # monitor fires (`departed/1`). While it is not there, the link greets it (`{:greet,
  # token}`: a hello now, and `hello_again/2` with that token a little later) until one
  # answers. The first welcome only takes (`{:resume, relay, received}`: the link settles
  # its window on the relay's count, monitors the relay and sends what it queued);
  # later ones answer older greetings and are ignored.
  #
  # Interest. The link mirrors the node's `:pg` groups (`snapshot/2`, `joined/2`,
  # `left/4`) into the interest table (`{:add_interest, topic}`, `{:remove_interest,
  # topic}`) that `Cluster.forward/2` reads. A row goes only when the node no longer has
  # the group and the link keeps it for no reason below:
  #
  #   * held: the node left the group because it went away (a member other than the
  #     relay that welcomed us left it, or the node was disconnected), or the relay
  #     departed while a leave of its was not told apart yet. What the node misses
  #     meanwhile is queued by the link and then delivered or counted. Held groups stay
  #     until `:pg` shows them again, until a welcome (or a new snapshot of the scope)
  #     says the node no longer has them, or until the hold is over: one hold at a time
  #     (`{:hold, token}`, then `hold_over/3`), from the first group held, ending early
  #     once the relay is there and nothing is held;
  #   * leaving: the relay that welcomed us left the group while its node is connected.
  #     Most likely its own leave (its last subscriber went), but it may have died with
  #     its monitor not fired yet. The link pings the relay (`:ping`, confirmed with
  #     `pinged/2` once the ping went out); its `pong/2` tells that the leaves before
  #     that ping were its own, and they go. A departure first makes them held.
  #
  # A node whose relay is not back when the hold is over has everything held for it
  # released, what was queued for it dropped (`:expire`), and while connected (it runs
  # without cluster mode now) it stops being a peer (`:remove_peer`). Every dispatch for
  # it is then dropped (`expired?/1`) until a relay welcomes the link again, which makes
  # the node a peer again (`:add_peer`), as every welcome does.
  #
  # Invariants: `leaving` is empty while the relay is not there, so `:ping` is asked for
  # only while there is a relay to ping; `hello` is set only while the relay is not
  # there.

  @enforce_keys [:topics, :held, :leaving]
  defstruct [
    :topics,
    :held,
    :leaving,
    relay: nil,
    ping: nil,
    gen: 0,
    hello: nil,
    hold: nil,
    expired: false,
    tokens: 0
  ]

  @typedoc "A `:pg` group of cluster mode's scope: a topic."
  @type topic :: binary()

  @typedoc "Tells a timer of the link that is still current from one that is not."
  @type token :: non_neg_integer()

  @typedoc """
  What the link does, in the order given:

    * `{:greet, token}`: send the node's relay a hello, and `hello_again/2` with `token`
      after a while;
    * `{:hold, token}`: `hold_over/3` with `token` after the hold time;
    * `:ping`: ping the relay, and `pinged/2` if the ping went out;
    * `{:resume, relay, received}`: settle the window on the relay's count of the link's
      messages it received, monitor the relay and send what is queued;
    * `:pause`: stop sending, keeping the queue (the relay departed);
    * `:expire`: drop everything queued or sent and not acknowledged;
    * `:add_peer`, `:remove_peer`: the node runs cluster mode, or no longer does;
    * `{:add_interest, topic}`, `{:remove_interest, topic}`: the node's row for `topic`
      in the interest table.
  """
  @type action ::
          {:greet, token()}
          | {:hold, token()}
          | :ping
          | {:resume, pid(), non_neg_integer()}
          | :pause
          | :expire
          | :add_peer
          | :remove_peer
          | {:add_interest, topic()}
          | {:remove_interest, topic()}

  @type t :: %__MODULE__{
          relay: pid() | nil,
          topics: MapSet.t(topic()),
          held: MapSet.t(topic()),
          leaving: %{topic() => non_neg_integer()},
          ping: {reference(), non_neg_integer()} | nil,
          gen: non_neg_integer(),
          hello: token() | nil,
          hold: token() | nil,
          expired: boolean(),
          tokens: token()
        }

  # Actions are gathered newest first, and reversed once an event is done.
  @typep acc :: {t(), [action()]}

  @doc """
  A link that has just started: no relay yet, which it greets. `inherited`: the node's
  groups in the interest table when it started (a link before it wrote them), held
  until `:pg` or the node's relay tells which the node still has.
  """
  @spec new([topic()]) :: {t(), [action()]}
  def new(inherited \\ []) do
    held = MapSet.new(inherited)
    acc = {%__MODULE__{topics: MapSet.new(), held: held, leaving: %{}}, []}
    acc = if MapSet.size(held) > 0, do: start_hold(acc), else: acc
    acc |> greet() |> done()
  end

  @doc "The relay that welcomed the link, while it is there."
  @spec relay(t()) :: pid() | nil
  def relay(%__MODULE__{relay: relay}), do: relay

  @doc "True once the node was not back within the hold: dispatches for it are dropped."
  @spec expired?(t()) :: boolean()
  def expired?(%__MODULE__{expired: expired}), do: expired

  @doc "Every topic the node has a row for in the interest table."
  @spec interest(t()) :: MapSet.t(topic())
  def interest(%__MODULE__{} = p) do
    p.topics |> MapSet.union(p.held) |> MapSet.union(MapSet.new(Map.keys(p.leaving)))
  end

  ## The relay

  @doc """
  A relay answered a greeting with its count of the link's messages it received and the
  groups it is in now. Held groups it is not in go.
  """
  @spec welcome(t(), pid(), non_neg_integer(), [topic()]) :: {t(), [action()]}
  def welcome(%__MODULE__{relay: nil} = p, relay, received, wanted) do
    wanted = MapSet.new(wanted)
    p = %{p | relay: relay, hello: nil, expired: false}

    Enum.reduce(p.held, {p, [:add_peer, {:resume, relay, received}]}, fn topic, acc ->
      if MapSet.member?(wanted, topic), do: acc, else: release(acc, topic)
    end)
    |> stop_hold_if_done()
    |> done()
  end

  # Any greeting's answer will do: nothing is sent while the link waits for one, so the
  # relay's count cannot have changed since the first.
  def welcome(%__MODULE__{} = p, _relay, _received, _wanted), do: {p, []}

  @doc """
  The relay's monitor fired (the node was cut off or stopped, or the relay died): the
  link stops sending, holds what it would have let go, and greets the node.
  """
  @spec departed(t()) :: {t(), [action()]}
  def departed(%__MODULE__{relay: nil} = p), do: {p, []}

  def departed(%__MODULE__{} = p) do
    # Leaves that were waiting for a ping are kept: the relay is gone.
    held = Enum.reduce(Map.keys(p.leaving), p.held, &MapSet.put(&2, &1))

    {%{p | relay: nil, ping: nil, leaving: %{}, held: held}, [:pause]}
    |> start_hold()
    |> greet()
    |> done()
  end

  @doc "The greeting's timer `token` ran out: greets again if nobody answered since."
  @spec hello_again(t(), token()) :: {t(), [action()]}
  def hello_again(%__MODULE__{hello: token} = p, token) when token != nil,
    do: {p, []} |> greet() |> done()

  def hello_again(%__MODULE__{} = p, _token), do: {p, []}

  @doc "The node connected: greets its relay at once if none is there."
  @spec nodeup(t()) :: {t(), [action()]}
  def nodeup(%__MODULE__{} = p), do: {p, []} |> greet() |> done()

  @doc """
  The hold's timer `token` ran out: every held group goes, and if the relay is still not
  there, everything queued for the node is dropped and so is what comes for it until a
  relay welcomes the link. `connected?`: the node is connected (then it no longer runs
  cluster mode).
  """
  @spec hold_over(t(), token(), boolean()) :: {t(), [action()]}
  def hold_over(%__MODULE__{hold: token} = p, token, connected?) when token != nil do
    {p, actions} = Enum.reduce(p.held, {%{p | hold: nil}, []}, &release(&2, &1))

    case p.relay do
      nil ->
        actions = if connected?, do: [:remove_peer | actions], else: actions
        done({%{p | expired: true}, [:expire | actions]})

      _relay ->
        done({p, actions})
    end
  end

  def hold_over(%__MODULE__{} = p, _token, _connected?), do: {p, []}

  ## Interest

  @doc """
  The node's groups as `:pg` shows them when the link (again) monitors the scope. Groups
  it had and the scope does not show are held: a scope that has just restarted shows
  nothing of other nodes until it has synced with them, and dispatches meanwhile must
  still go to the node. They go when the hold is over, unless `:pg` or a welcome shows
  them again.
  """
  @spec snapshot(t(), [topic()]) :: {t(), [action()]}
  def snapshot(%__MODULE__{} = p, groups) do
    topics = MapSet.new(groups)
    added = for topic <- topics, do: {:add_interest, topic}
    missing = MapSet.difference(p.topics, topics)
    p = %{p | topics: topics, held: MapSet.union(MapSet.difference(p.held, topics), missing)}
    acc = {p, Enum.reverse(added)}
    acc = if MapSet.size(missing) > 0, do: start_hold(acc), else: acc
    acc |> stop_hold_if_done() |> done()
  end

  @doc "The node joined `group` (its first member there)."
  @spec joined(t(), topic()) :: {t(), [action()]}
  def joined(%__MODULE__{} = p, group) do
    p = %{
      p
      | topics: MapSet.put(p.topics, group),
        held: MapSet.delete(p.held, group),
        leaving: Map.delete(p.leaving, group)
    }

    {p, [{:add_interest, group}]} |> stop_hold_if_done() |> done()
  end

  @doc """
  The node's last member of `group`, `pid`, left it. `connected?`: the node is
  connected. A leave of the relay that welcomed the link, from a connected node, waits
  for a ping's answer; any other leave is the node going away, and the group is held.
  """
  @spec left(t(), topic(), pid(), boolean()) :: {t(), [action()]}
  def left(%__MODULE__{relay: relay} = p, group, pid, connected?) do
    topics = MapSet.delete(p.topics, group)

    if relay == pid and connected? do
      p = %{p | topics: topics, leaving: Map.put(p.leaving, group, p.gen)}
      {p, if(p.ping == nil, do: [:ping], else: [])}
    else
      {%{p | topics: topics, held: MapSet.put(p.held, group)}, []}
      |> start_hold()
      |> done()
    end
  end

  @doc "The ping asked for went out as `ref`."
  @spec pinged(t(), reference()) :: t()
  def pinged(%__MODULE__{} = p, ref), do: %{p | ping: {ref, p.gen}, gen: p.gen + 1}

  @doc """
  The relay answered the ping `ref`: the leaves before it were its own, and go. Pings
  again for those that came after.
  """
  @spec pong(t(), reference()) :: {t(), [action()]}
  def pong(%__MODULE__{ping: {ref, gen}} = p, ref) do
    {released, leaving} = Enum.split_with(p.leaving, fn {_topic, g} -> g <= gen end)
    p = %{p | leaving: Map.new(leaving), ping: nil}

    Enum.reduce(released, {p, []}, fn {topic, _gen}, acc -> release(acc, topic) end)
    |> ping_if_leaving()
    |> done()
  end

  # A pong from before a departure, or of a ping the link no longer waits for.
  def pong(%__MODULE__{} = p, _ref), do: {p, []}

  @doc "A ping could not go out (busy distribution) a while ago: asks for it again."
  @spec retry_ping(t()) :: {t(), [action()]}
  def retry_ping(%__MODULE__{ping: nil} = p), do: {p, []} |> ping_if_leaving() |> done()
  def retry_ping(%__MODULE__{} = p), do: {p, []}

  ## Steps

  @spec done(acc()) :: {t(), [action()]}
  defp done({p, actions}), do: {p, Enum.reverse(actions)}

  # Each timer gets a token of its own: the next of `tokens`.
  @spec greet(acc()) :: acc()
  defp greet({%__MODULE__{relay: nil, tokens: n} = p, actions}),
    do: {%{p | hello: n, tokens: n + 1}, [{:greet, n} | actions]}

  defp greet(acc), do: acc

  @spec start_hold(acc()) :: acc()
  defp start_hold({%__MODULE__{hold: nil, tokens: n} = p, actions}),
    do: {%{p | hold: n, tokens: n + 1}, [{:hold, n} | actions]}

  defp start_hold(acc), do: acc

  # The hold ends early once the relay is there and nothing is held; its timer then
  # comes with a token that is no longer current.
  @spec stop_hold_if_done(acc()) :: acc()
  defp stop_hold_if_done({%__MODULE__{relay: relay} = p, actions}) do
    if relay != nil and MapSet.size(p.held) == 0,
      do: {%{p | hold: nil}, actions},
      else: {p, actions}
  end

  @spec ping_if_leaving(acc()) :: acc()
  defp ping_if_leaving({p, actions}) do
    if map_size(p.leaving) > 0, do: {p, [:ping | actions]}, else: {p, actions}
  end

  # Stops keeping `topic` for the node; its row goes unless the node has the group or
  # a leave of it is not told apart yet.
  @spec release(acc(), topic()) :: acc()
  defp release({p, actions}, topic) do
    p = %{p | held: MapSet.delete(p.held, topic)}

    actions =
      if MapSet.member?(p.topics, topic) or Map.has_key?(p.leaving, topic),
        do: actions,
        else: [{:remove_interest, topic} | actions]

    stop_hold_if_done({p, actions})
  end
end
