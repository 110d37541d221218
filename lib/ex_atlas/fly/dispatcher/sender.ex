defmodule ExAtlas.Fly.Dispatcher.Sender do
  @moduledoc false
  # One sender per fan-out lane. A dispatch hands each lane its batch (a snapshot of the
  # subscribers in that lane's partition) and the message; the sender delivers batches
  # in the order it received them, which is what gives every subscriber the messages of
  # one dispatching process in dispatch order.
  #
  # Delivery runs in NIF calls that send with this process's environment, which lets the
  # VM build each copy straight on the receiver's heap; a thread of our own would go
  # through heap fragments and unmanaged-thread locking (about 3x slower, measured).
  # Two ways, set by `config :ex_atlas, :fly, delivery: ...`:
  #
  #   * `:scheduler` (default) - slices of at most 256 pids per NIF call on this
  #     process's normal scheduler (well under 1 ms each); the VM preempts the process
  #     between slices like any send loop and balances senders and receivers over the
  #     schedulers.
  #   * `:dirty` - the first 64 pids on a normal scheduler, the rest in slices of 16 384
  #     on a dirty CPU scheduler: no normal scheduler runs work that grows with the
  #     subscribers, but on 2 cores the dirty threads compete with the schedulers (and
  #     with their busy-waiting) for the cores: 0.83x a plain send loop end to end at
  #     10 000 subscribers against 1.23x for `:scheduler`, in one run of bench/fanout.exs.

  use GenServer

  alias ExAtlas.Fly.Dispatcher.Native

  @deliver :"$ex_atlas_deliver"
  @sync :"$ex_atlas_sync"
  @synced :"$ex_atlas_synced"

  @inline_before_dirty 64
  @scheduler_slice 256

  @spec start_link({Native.dispatcher(), :dirty | :scheduler}) :: GenServer.on_start()
  def start_link({_dispatcher, _delivery} = arg), do: GenServer.start_link(__MODULE__, arg)

  @doc """
  Asks `sender` to reply `{#{inspect(@synced)}, ref}` to the caller once it has handled
  everything the caller handed it before.
  """
  @spec request_sync(pid(), reference()) :: :ok
  def request_sync(sender, ref) do
    send(sender, {@sync, self(), ref})
    :ok
  end

  @doc "The tag of sync replies."
  @spec synced_tag() :: atom()
  def synced_tag, do: @synced

  @impl true
  def init(state) do
    # Batches can pile up behind a slow lane; keep them out of the heap that every
    # garbage collection of this process scans.
    Process.flag(:message_queue_data, :off_heap)
    {:ok, state}
  end

  @impl true
  def handle_info({@deliver, batch, message}, {dispatcher, delivery} = state) do
    deliver(delivery, dispatcher, batch, message)
    {:noreply, state}
  end

  def handle_info({@sync, from, ref}, state) do
    send(from, {@synced, ref})
    {:noreply, state}
  end

  defp deliver(:scheduler, dispatcher, batch, message) do
    case Native.deliver(dispatcher, batch, message, @scheduler_slice) do
      :ok -> :ok
      :more -> deliver(:scheduler, dispatcher, batch, message)
    end
  end

  defp deliver(:dirty, dispatcher, batch, message) do
    case Native.deliver(dispatcher, batch, message, @inline_before_dirty) do
      :ok -> :ok
      :more -> deliver_dirty(dispatcher, batch, message)
    end
  end

  defp deliver_dirty(dispatcher, batch, message) do
    case Native.deliver_dirty(dispatcher, batch, message) do
      :ok -> :ok
      :more -> deliver_dirty(dispatcher, batch, message)
    end
  end
end
