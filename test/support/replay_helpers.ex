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
  `{producer, n, next}` (a gap, a duplicate or a reversal), or nil.
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

  @doc "The last number of `producer` in `got`, or nil."
  @spec last_of([tuple()], term()) :: integer() | nil
  def last_of(got, producer) do
    got
    |> Enum.filter(&(elem(&1, 1) == producer))
    |> List.last()
    |> then(&(&1 && elem(&1, 2)))
  end
end
