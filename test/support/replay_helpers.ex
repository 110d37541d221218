defmodule ExAtlas.Test.Replay do
  @moduledoc """
  Checks for replay tests. Producers dispatch tuples `{:seq, producer, n, ...}` with `n`
  going up by one per producer (and per topic); what a subscriber gets of each producer
  must then be an unbroken run.
  """

  @doc "Every message in the caller's mailbox now, oldest first, `acc` (reversed) before."
  @spec drain(list()) :: list()
  def drain(acc \\ []) do
    receive do
      m -> drain([m | acc])
    after
      0 -> Enum.reverse(acc)
    end
  end

  @doc """
  The first place where a producer's numbers do not go up by exactly one, as
  `{producer, n, next}` (a gap, a duplicate or a reversal), or nil. Every message must be
  a `{:seq, producer, n, _}`: see `account/3` for streams with gap notices.
  """
  @spec violation([tuple()]) :: {term(), integer(), integer()} | nil
  def violation(got) do
    got
    |> Enum.group_by(&elem(&1, 1), &elem(&1, 2))
    |> Enum.find_value(fn {p, seqs} ->
      seqs
      |> Enum.chunk_every(2, 1, :discard)
      |> Enum.find_value(fn [a, b] -> if b != a + 1, do: {p, a, b} end)
    end)
  end

  @doc """
  Checks what a joiner got, gap notices (`{:ex_atlas_fly_gap, topic, missed}`) included,
  against where each producer stopped (`lasts`: the last number of producer 1, 2, ...):

    * each producer's numbers go up by exactly one, except across a gap notice;
    * a producer whose last number the joiner does not have has a gap notice after the
      last it has;
    * the notices add up to what is missing: the holes across them, and each producer's
      numbers after the last the joiner has. What a producer lacks before its first
      number in `got` is known only when `starts` (each producer's first number due)
      is; without it, and when a notice comes before that first number, the notices
      may count more.

  Returns a description of the first fault, or nil.
  """
  @spec account([tuple()], [integer()], [integer()] | nil) :: String.t() | nil
  def account(got, lasts, starts \\ nil) do
    init = %{last: %{}, first: %{}, at: %{}, gaps: 0, told: 0, holes: 0, early: false}
    state = Enum.reduce_while(got, Map.put(init, :fault, nil), &account_step/2)
    producers = Enum.with_index(lasts, 1)

    tails =
      for {last, p} <- producers, seen = state.last[p], seen < last do
        if state.gaps > state.at[p], do: {:ok, last - seen}, else: {:silent, p, seen, last}
      end

    prefix =
      if starts do
        Enum.sum(
          for {{last, p}, start} <- Enum.zip(producers, starts) do
            if first = state.first[p], do: first - start, else: last - start + 1
          end
        )
      end

    missing = state.holes + Enum.sum(for {:ok, k} <- tails, do: k) + (prefix || 0)
    unseen = Enum.any?(producers, fn {_, p} -> state.first[p] == nil end)
    exact = prefix != nil or not (state.early or unseen)

    cond do
      state.fault ->
        state.fault

      silent = Enum.find(tails, &match?({:silent, _, _, _}, &1)) ->
        {:silent, p, seen, last} = silent
        "producer #{inspect(p)} ends at #{seen} of #{last}, no gap notice after"

      state.told < missing or (exact and state.told != missing) ->
        "gap notices tell #{state.told}, #{missing} are missing"

      true ->
        nil
    end
  end

  defp account_step({:ex_atlas_fly_gap, _topic, missed}, st)
       when is_integer(missed) and missed > 0,
       do: {:cont, %{st | gaps: st.gaps + 1, told: st.told + missed}}

  defp account_step({:seq, p, n, _}, st) do
    seen = fn st -> %{st | last: Map.put(st.last, p, n), at: Map.put(st.at, p, st.gaps)} end

    case Map.fetch(st.last, p) do
      :error ->
        {:cont, seen.(%{st | first: Map.put(st.first, p, n), early: st.early or st.gaps > 0})}

      {:ok, m} when n == m + 1 ->
        {:cont, seen.(st)}

      {:ok, m} when n > m + 1 and st.gaps > :erlang.map_get(p, st.at) ->
        {:cont, seen.(%{st | holes: st.holes + n - m - 1})}

      {:ok, m} ->
        {:halt, %{st | fault: "producer #{inspect(p)}: #{n} after #{m}, no gap notice between"}}
    end
  end

  defp account_step(other, st),
    do: {:halt, %{st | fault: "unexpected message #{inspect(other)}"}}

  @doc "The gap notices in `got`, and the messages without them."
  @spec split_gaps([tuple()]) :: {[pos_integer()], [tuple()]}
  def split_gaps(got) do
    {gaps, messages} = Enum.split_with(got, &match?({:ex_atlas_fly_gap, _, _}, &1))
    {Enum.map(gaps, &elem(&1, 2)), messages}
  end

  @doc "The last number of `producer` in `got`, or nil."
  @spec last_of([tuple()], term()) :: integer() | nil
  def last_of(got, producer) do
    got
    |> Enum.filter(&match?({:seq, ^producer, _, _}, &1))
    |> List.last()
    |> then(&(&1 && elem(&1, 2)))
  end
end
