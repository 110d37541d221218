defmodule ExAtlas.Fly.Dispatcher.ReplyAlias do
  @moduledoc false
  # A reply never outlives its call: the callers that wait for other processes' answers
  # (`sync/0`, `sync(:cluster)`) have them sent to a process alias that is gone once the
  # call returns, however it returns (answered, timed out, raised), and take out of their
  # mailbox whatever reached the alias before it went.

  @doc """
  Calls `fun` with a new process alias of the caller, where replies tagged `tag` (tuples
  whose first element is `tag`) are to be sent; returns what `fun` returns. Then the
  alias is removed, and with it every reply tagged `tag` in the caller's mailbox.
  """
  @spec within(atom(), (reference() -> result)) :: result when result: var
  def within(tag, fun) do
    reply_to = :erlang.alias()

    try do
      fun.(reply_to)
    after
      :erlang.unalias(reply_to)
      flush(tag)
    end
  end

  # Replies that reached the alias before it was removed.
  defp flush(tag) do
    receive do
      reply when is_tuple(reply) and tuple_size(reply) > 0 and elem(reply, 0) == tag ->
        flush(tag)
    after
      0 -> :ok
    end
  end
end
