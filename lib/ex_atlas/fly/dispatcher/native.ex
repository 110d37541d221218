defmodule ExAtlas.Fly.Dispatcher.Native do
  @moduledoc false
  # The NIF bridge: stubs replaced by `native/ex_atlas_dispatcher` when the library loads.
  # No logic lives here; `ExAtlas.Fly.Dispatcher.Backend.Registry` is the only caller.
  #
  # Every function taking a `t:dispatcher/0` raises `ArgumentError` (badarg) when handed
  # something else, and expects topics already checked to be binaries.

  @on_load :load_nif

  @typedoc "The NIF resource holding one registry, its lanes and its senders' pids."
  @type dispatcher :: reference()
  @typedoc "What is left of a dispatch that met a full lane; see `dispatch/3`."
  @type pending :: reference()
  @typedoc "One lane's share of one dispatch, delivered by that lane's sender process."
  @type batch :: reference()

  @doc false
  def load_nif do
    path = :filename.join(:code.priv_dir(:ex_atlas), ~c"native/ex_atlas_dispatcher")

    case :erlang.load_nif(path, 0) do
      :ok ->
        :ok

      {:error, {:reload, _}} ->
        :ok

      {:error, reason} ->
        require Logger

        Logger.error(
          "[ExAtlas.Fly.Dispatcher] could not load the NIF from #{path}: #{inspect(reason)}"
        )

        {:error, reason}
    end
  end

  @spec new(pos_integer(), pos_integer(), non_neg_integer(), pos_integer()) :: dispatcher()
  def new(_lanes, _queue_capacity, _replay, _replay_memory),
    do: :erlang.nif_error(:nif_not_loaded)

  @doc "Installs one sender per lane, replacing earlier ones; badarg on a wrong count."
  @spec set_senders(dispatcher(), [pid()]) :: :ok
  def set_senders(_dispatcher, _senders), do: :erlang.nif_error(:nif_not_loaded)

  @spec senders(dispatcher()) :: [pid() | :undefined]
  def senders(_dispatcher), do: :erlang.nif_error(:nif_not_loaded)

  @doc "Cluster mode: `relay` hears `{:\"$ex_atlas_interest\", topic}` as topics come and go."
  @spec set_relay(dispatcher(), pid() | :undefined) :: :ok
  def set_relay(_dispatcher, _relay), do: :erlang.nif_error(:nif_not_loaded)

  @spec topics(dispatcher()) :: [binary()]
  def topics(_dispatcher), do: :erlang.nif_error(:nif_not_loaded)

  @doc """
  Subscribes the caller. `direct`: every dispatching process sends to it itself, never
  through a sender; true for a caller whose message queue is off-heap.
  """
  @spec subscribe(dispatcher(), binary(), boolean()) ::
          :ok | :closed | :not_alive | :too_many_topics
  def subscribe(_dispatcher, _topic, _direct), do: :erlang.nif_error(:nif_not_loaded)

  @doc "Starts a subscription with replay; then `replay/2` until `:ok`."
  @spec join(dispatcher(), binary(), non_neg_integer(), boolean()) ::
          :ok | :plain | :not_alive | :closed
  def join(_dispatcher, _topic, _n, _direct), do: :erlang.nif_error(:nif_not_loaded)

  @spec replay(dispatcher(), binary()) ::
          :ok
          | :more
          | {:gap, pos_integer()}
          | :parked
          | :removed
          | :not_alive
          | :closed
          | :too_many_topics
  def replay(_dispatcher, _topic), do: :erlang.nif_error(:nif_not_loaded)

  @doc """
  One more (`true`) or one fewer `on_slow: :catch_up` watch on `topic`; `:plain` when no
  history is kept.
  """
  @spec watch_parking(dispatcher(), binary(), boolean()) :: :ok | :plain
  def watch_parking(_dispatcher, _topic, _more), do: :erlang.nif_error(:nif_not_loaded)

  @doc "Parks `pid` on `topic` (`on_slow: :catch_up`): its dispatches wait in the history."
  @spec park(dispatcher(), binary(), pid(), boolean()) ::
          :ok | :parked | :not_subscribed | :joining | :plain | :not_alive | :closed
  def park(_dispatcher, _topic, _pid, _direct), do: :erlang.nif_error(:nif_not_loaded)

  @doc "`replay/2` sending at most `max` messages: `{:more, sent}`, `{:gap, missed, sent}`."
  @spec replay_up_to(dispatcher(), binary(), pos_integer()) ::
          :ok
          | {:more, non_neg_integer()}
          | {:gap, pos_integer(), non_neg_integer()}
          | :parked
          | :removed
          | :not_alive
          | :closed
          | :too_many_topics
  def replay_up_to(_dispatcher, _topic, _max), do: :erlang.nif_error(:nif_not_loaded)

  @doc "Whether `pid` is parked on `topic` now."
  @spec is_parked(dispatcher(), binary(), pid()) :: boolean()
  def is_parked(_dispatcher, _topic, _pid), do: :erlang.nif_error(:nif_not_loaded)

  @doc "The caller, catching up on `topic` after `unpark/2`, is parked again where it is."
  @spec repark(dispatcher(), binary()) :: :ok | :not_joining
  def repark(_dispatcher, _topic), do: :erlang.nif_error(:nif_not_loaded)

  @doc "The caller, parked on `topic`, asks to catch up; then `replay/2` until `:ok`."
  @spec unpark(dispatcher(), binary()) :: :ok | :wait | :not_parked
  def unpark(_dispatcher, _topic), do: :erlang.nif_error(:nif_not_loaded)

  @doc """
  Cluster mode: whether this node wants `topic`'s dispatches (a subscription, or a
  subscriber catching up on it or parked on it).
  """
  @spec wanted(dispatcher(), binary()) :: boolean()
  def wanted(_dispatcher, _topic), do: :erlang.nif_error(:nif_not_loaded)

  @spec unsubscribe(dispatcher(), binary()) :: :ok
  def unsubscribe(_dispatcher, _topic), do: :erlang.nif_error(:nif_not_loaded)

  @spec unsubscribe_pid(dispatcher(), binary(), pid()) :: non_neg_integer()
  def unsubscribe_pid(_dispatcher, _topic, _pid), do: :erlang.nif_error(:nif_not_loaded)

  @doc "Publishes `dispatcher` for `dispatch/2`; `:undefined` for none."
  @spec publish(dispatcher() | :undefined) :: :ok
  def publish(_dispatcher), do: :erlang.nif_error(:nif_not_loaded)

  @doc "`dispatch/3` to the published dispatcher; `:closed` when none is published."
  @spec dispatch(binary(), term()) ::
          :ok | :forward | :closed | {:full | :more, pending()}
  def dispatch(_topic, _message), do: :erlang.nif_error(:nif_not_loaded)

  @doc """
  `:ok`, or `:forward` in cluster mode (a relay is set): all is handed over or sent.
  `{:full, pending}`: a lane was full; `{:more, pending}`: the caller's time was up
  with messages of its own still to send. Either way, call `resume/2` until it answers
  `:ok`: again at once after `:more`, after `{:"$ex_atlas_room", pending}` after `:wait`.
  """
  @spec dispatch(dispatcher(), binary(), term()) ::
          :ok | :forward | :closed | {:full | :more, pending()}
  def dispatch(_dispatcher, _topic, _message), do: :erlang.nif_error(:nif_not_loaded)

  @spec resume(pending(), term()) :: :ok | :wait | :more | :closed
  def resume(_pending, _message), do: :erlang.nif_error(:nif_not_loaded)

  @doc """
  For the sender of `lane`: the oldest batch parked for the lane, as
  `{:"$ex_atlas_deliver", batch, message}`, or `:done` once none is left (the lane then
  opens to producers).
  """
  @spec take_parked(dispatcher(), non_neg_integer()) ::
          {:"$ex_atlas_deliver", batch(), term()} | :done
  def take_parked(_dispatcher, _lane), do: :erlang.nif_error(:nif_not_loaded)

  @spec deliver(batch(), term()) :: :ok | :more
  def deliver(_batch, _message), do: :erlang.nif_error(:nif_not_loaded)

  @spec deliver_dirty(batch(), term()) :: :ok | :more
  def deliver_dirty(_batch, _message), do: :erlang.nif_error(:nif_not_loaded)

  @spec count(dispatcher(), binary()) :: non_neg_integer()
  def count(_dispatcher, _topic), do: :erlang.nif_error(:nif_not_loaded)

  @spec subscribers(dispatcher(), binary()) :: [pid()]
  def subscribers(_dispatcher, _topic), do: :erlang.nif_error(:nif_not_loaded)

  @spec topics_of(dispatcher(), pid()) :: [binary()]
  def topics_of(_dispatcher, _pid), do: :erlang.nif_error(:nif_not_loaded)

  @spec skip_start(dispatcher(), binary(), pid()) :: :ok
  def skip_start(_dispatcher, _topic, _pid), do: :erlang.nif_error(:nif_not_loaded)

  @spec skip_stop(dispatcher(), binary(), pid()) :: non_neg_integer()
  def skip_stop(_dispatcher, _topic, _pid), do: :erlang.nif_error(:nif_not_loaded)

  @spec skip_clear(dispatcher(), binary(), pid()) :: :ok
  def skip_clear(_dispatcher, _topic, _pid), do: :erlang.nif_error(:nif_not_loaded)

  @spec skip_stats(dispatcher()) ::
          {non_neg_integer(), non_neg_integer(), non_neg_integer()}
  def skip_stats(_dispatcher), do: :erlang.nif_error(:nif_not_loaded)

  @spec stats(dispatcher()) :: [{atom(), non_neg_integer()}]
  def stats(_dispatcher), do: :erlang.nif_error(:nif_not_loaded)

  @doc "`{lost_batches, lost_deliveries}` so far, cheap enough to poll."
  @spec lost(dispatcher()) :: {non_neg_integer(), non_neg_integer()}
  def lost(_dispatcher), do: :erlang.nif_error(:nif_not_loaded)

  @doc "Closes for good; returns the subscribers it held, one pid each."
  @spec close(dispatcher()) :: [pid()]
  def close(_dispatcher), do: :erlang.nif_error(:nif_not_loaded)
end
