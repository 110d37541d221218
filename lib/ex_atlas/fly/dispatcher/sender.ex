defmodule ExAtlas.Fly.Dispatcher.Sender do
  @moduledoc false
  # One sender per fan-out lane. A dispatch hands each lane its batch (a snapshot of the
  # subscribers in that lane's partition) and the message; the sender delivers batches
  # in the order it received them, which is what gives every subscriber the messages of
  # one dispatching process in dispatch order.
  #
  # Delivery runs in NIF calls that send with this process's environment: up to 64 pids
  # on a normal scheduler, larger batches in slices on a dirty CPU scheduler. That path
  # lets the VM build each copy straight on the receiver's heap, where a thread of our
  # own would go through heap fragments and a locked allocator (about 3x slower here).

  use GenServer

  alias ExAtlas.Fly.Dispatcher.Native

  @deliver :"$ex_atlas_deliver"
  @sync :"$ex_atlas_sync"
  @synced :"$ex_atlas_synced"

  @spec start_link(Native.dispatcher()) :: GenServer.on_start()
  def start_link(dispatcher), do: GenServer.start_link(__MODULE__, dispatcher)

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
  def init(dispatcher) do
    # Batches can pile up behind a slow lane; keep them out of the heap that every
    # garbage collection of this process scans.
    Process.flag(:message_queue_data, :off_heap)
    {:ok, dispatcher}
  end

  @impl true
  def handle_info({@deliver, batch, message}, dispatcher) do
    case Native.deliver(dispatcher, batch, message) do
      :ok -> :ok
      :dirty -> deliver_dirty(dispatcher, batch, message)
    end

    {:noreply, dispatcher}
  end

  def handle_info({@sync, from, ref}, dispatcher) do
    send(from, {@synced, ref})
    {:noreply, dispatcher}
  end

  defp deliver_dirty(dispatcher, batch, message) do
    case Native.deliver_dirty(dispatcher, batch, message) do
      :ok -> :ok
      :more -> deliver_dirty(dispatcher, batch, message)
    end
  end
end
