defmodule ExAtlas.Fly.Dispatcher.Watchdog do
  @moduledoc false
  # Slow-consumer eviction (issue 4). Until it lands, subscribe_with_backpressure/2
  # subscribes without a watch.

  alias ExAtlas.Fly.Dispatcher

  @spec subscribe(binary(), keyword()) :: :ok
  def subscribe(topic, _opts), do: Dispatcher.subscribe(topic)
end
