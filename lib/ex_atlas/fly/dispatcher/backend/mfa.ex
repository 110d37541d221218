defmodule ExAtlas.Fly.Dispatcher.Backend.MFA do
  @moduledoc false
  # `dispatcher: {:mfa, {mod, fun, extra}}`: the host routes messages itself. Nothing is
  # subscribed here, and whatever the function raises, throws or exits with stays here.

  @behaviour ExAtlas.Fly.Dispatcher.Backend

  require Logger

  @impl true
  def subscribe(_topic, _mfa), do: :ok

  @impl true
  def unsubscribe(_topic, _mfa), do: :ok

  @impl true
  def dispatch(topic, message, {mod, fun, extra} = mfa) do
    apply(mod, fun, [topic, message | extra])
    :ok
  catch
    kind, reason ->
      Logger.error(
        "[ExAtlas.Fly.Dispatcher] dispatch to topic #{inspect(topic)} through " <>
          "#{format_mfa(mfa)} failed: " <>
          Exception.format(kind, reason, __STACKTRACE__),
        topic: topic,
        mfa: format_mfa(mfa)
      )

      :ok
  end

  @impl true
  def sync(_mfa), do: :ok

  @impl true
  def count(_topic, _mfa), do: 0

  @impl true
  def subscribers(_topic, _mfa), do: []

  @impl true
  def stats(_mfa), do: ExAtlas.Fly.Dispatcher.Backend.zero_stats()

  defp format_mfa({mod, fun, extra}),
    do: Exception.format_mfa(mod, fun, length(extra) + 2)
end
