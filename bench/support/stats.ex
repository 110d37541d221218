defmodule FanoutBench.Stats do
  @moduledoc false
  # Summaries of repeated timings and the formatting of durations and rates.

  @type summary :: %{
          count: non_neg_integer(),
          median: float(),
          p99: float(),
          min: float(),
          max: float()
        }

  @doc "Median, nearest-rank p99, min and max of a non-empty list of numbers."
  @spec summarize([number()]) :: summary()
  def summarize([_ | _] = samples) do
    sorted = Enum.sort(samples)
    count = length(sorted)

    %{
      count: count,
      median: median(sorted, count),
      p99: nearest_rank(sorted, count, 0.99) * 1.0,
      min: hd(sorted) * 1.0,
      max: List.last(sorted) * 1.0
    }
  end

  defp median(sorted, count) when rem(count, 2) == 1, do: Enum.at(sorted, div(count, 2)) * 1.0

  defp median(sorted, count) do
    [a, b] = Enum.slice(sorted, div(count, 2) - 1, 2)
    (a + b) / 2
  end

  # The smallest sample with at least `q` of the samples at or below it. With fewer than
  # 100 samples the p99 is the maximum.
  defp nearest_rank(sorted, count, q), do: Enum.at(sorted, max(ceil(q * count), 1) - 1)

  @doc "Nanoseconds as a short human string: `850 ns`, `12.3 us`, `4.56 ms`, `1.23 s`."
  @spec duration(number() | nil) :: String.t()
  def duration(nil), do: "-"
  def duration(ns) when ns < 1_000, do: "#{round(ns)} ns"
  def duration(ns) when ns < 1_000_000, do: sig(ns / 1_000) <> " us"
  def duration(ns) when ns < 1_000_000_000, do: sig(ns / 1_000_000) <> " ms"
  def duration(ns), do: sig(ns / 1_000_000_000) <> " s"

  @doc "A rate per second with a k/M suffix: `812`, `45.3 k`, `2.41 M`."
  @spec rate(number() | nil) :: String.t()
  def rate(nil), do: "-"
  def rate(r) when r < 1_000, do: sig(r)
  def rate(r) when r < 1_000_000, do: sig(r / 1_000) <> " k"
  def rate(r), do: sig(r / 1_000_000) <> " M"

  @doc "Bytes with a unit: `96 B`, `12.5 KiB`, `3.20 MiB`."
  @spec bytes(number() | nil) :: String.t()
  def bytes(nil), do: "-"
  def bytes(b) when b < 1_024, do: "#{round(b)} B"
  def bytes(b) when b < 1_048_576, do: sig(b / 1_024) <> " KiB"
  def bytes(b), do: sig(b / 1_048_576) <> " MiB"

  @doc "Three significant digits (no exponent), as a string."
  @spec sig(number()) :: String.t()
  def sig(x) when x >= 100, do: Integer.to_string(round(x))
  def sig(x) when x >= 10, do: :erlang.float_to_binary(x * 1.0, decimals: 1)
  def sig(x), do: :erlang.float_to_binary(x * 1.0, decimals: 2)

  @doc "A ratio as `1.23x`, or `-` when either side is missing or zero."
  @spec ratio(number() | nil, number() | nil) :: String.t()
  def ratio(a, b) when is_number(a) and is_number(b) and b != 0, do: sig(a / b) <> "x"
  def ratio(_, _), do: "-"
end
