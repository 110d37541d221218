defmodule ExAtlas.Fly.Dispatcher.Sender do
  @moduledoc false
  # One sender per fan-out lane. A dispatch hands each lane its batch (a snapshot of the
  # topic's subscribers that belong to that lane) and the message; the sender delivers batches
  # in the order it received them, which is what gives every subscriber the messages of
  # one dispatching process in dispatch order.
  #
  # Delivery runs in NIF calls that send with this process's environment, which lets the
  # VM build each copy straight on the receiver's heap; a thread of our own would go
  # through heap fragments and unmanaged-thread locking (measured several times slower
  # per delivery: docs/design.md).
  # Two ways, set by `config :ex_atlas, :fly, delivery: ...`:
  #
  #   * `:scheduler` (default) - each NIF call sends for at most one timeslice (0.5 ms
  #     plus one send, whatever the message size) on this process's normal scheduler,
  #     telling the VM the time it took, so the process is preempted between calls like
  #     any send loop, and the VM balances senders and receivers over the schedulers.
  #   * `:dirty` - the first timeslice on a normal scheduler, the rest in slices of
  #     16 384 pids on a dirty CPU scheduler; slower on few cores (figures: bench/README.md).
  #
  # The registry, the lanes' credits and the subscribers' monitors belong to the NIF
  # resource, not to this process: if it dies, the server starts another for its lane;
  # what it had not delivered is counted and logged as lost (ExAtlas.Fly.Dispatcher.Server).

  use GenServer

  require Logger

  alias ExAtlas.Fly.Dispatcher.{Native, Server}

  @deliver :"$ex_atlas_deliver"
  @drain :"$ex_atlas_drain"
  @sync :"$ex_atlas_sync"
  @synced :"$ex_atlas_synced"

  @spec start_link(:dirty | :scheduler) :: GenServer.on_start()
  def start_link(delivery), do: GenServer.start_link(__MODULE__, delivery)

  @doc """
  Asks `sender` to send `{#{inspect(@synced)}, ref}` to `reply_to` (a pid or a process
  alias) once it has handled everything the caller handed it before.
  """
  @spec request_sync(pid(), pid() | reference(), reference()) :: :ok
  def request_sync(sender, reply_to, ref) do
    send(sender, {@sync, reply_to, ref})
    :ok
  end

  @doc "The tag of sync replies."
  @spec synced_tag() :: atom()
  def synced_tag, do: @synced

  @impl true
  def init(delivery) do
    # Batches can pile up behind a slow lane; keep them out of the heap that every
    # garbage collection of this process scans.
    Process.flag(:message_queue_data, :off_heap)
    {:ok, delivery}
  end

  @impl true
  def handle_info({@deliver, batch, message}, delivery) do
    deliver(delivery, batch, message)
    {:noreply, delivery}
  end

  # Batches were parked for this lane while it had no sender (the one before died). They
  # are pulled and delivered one by one, in order, and only then does the lane open to
  # producers: nothing a producer hands over later can reach this mailbox before them.
  def handle_info({@drain, dispatcher, lane}, delivery) do
    drain(delivery, dispatcher, lane)
    {:noreply, delivery}
  end

  # Whatever is still parked for this lane was dispatched before the request: pulled and
  # delivered first (the server's drain request may come after this one).
  def handle_info({@sync, from, ref}, delivery) do
    with dispatcher when dispatcher != nil <- Server.lookup(),
         lane when lane != nil <- Enum.find_index(Native.senders(dispatcher), &(&1 == self())) do
      drain(delivery, dispatcher, lane)
    end

    send(from, {@synced, ref})
    {:noreply, delivery}
  end

  # Someone else's message: never worth a crash of the lane.
  def handle_info(message, delivery) do
    Logger.warning(
      "[ExAtlas.Fly.Dispatcher] sender #{inspect(self())} ignored an unexpected message: " <>
        inspect(message, limit: 10)
    )

    {:noreply, delivery}
  end

  defp drain(delivery, dispatcher, lane) do
    case Native.take_parked(dispatcher, lane) do
      {@deliver, batch, message} ->
        deliver(delivery, batch, message)
        drain(delivery, dispatcher, lane)

      :done ->
        :ok
    end
  end

  defp deliver(:scheduler, batch, message) do
    case Native.deliver(batch, message) do
      :ok -> :ok
      :more -> deliver(:scheduler, batch, message)
    end
  end

  defp deliver(:dirty, batch, message) do
    case Native.deliver(batch, message) do
      :ok -> :ok
      :more -> deliver_dirty(batch, message)
    end
  end

  defp deliver_dirty(batch, message) do
    case Native.deliver_dirty(batch, message) do
      :ok -> :ok
      :more -> deliver_dirty(batch, message)
    end
  end
end
