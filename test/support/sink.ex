defmodule ExAtlas.Test.Sink do
  @moduledoc """
  A `{:mfa, {ExAtlas.Test.Sink, :drop, extra}}` dispatcher that drops every dispatch, for
  tests of the `{:mfa, _}` mode. An extra argument (a fresh reference) makes a mode that
  differs from every earlier one.
  """

  @doc "Drops the dispatch."
  @spec drop(binary(), term()) :: :ok
  def drop(_topic, _message), do: :ok

  @doc "Drops the dispatch; `tag` only tells modes apart."
  @spec drop(binary(), term(), term()) :: :ok
  def drop(_topic, _message, _tag), do: :ok
end
