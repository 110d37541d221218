defmodule ExAtlas.Fly.Dispatcher.LogFilter do
  @moduledoc false
  # When the dispatcher's supervisor is killed, the registry's server and the closer,
  # which trap exits so that they can close the registry, get the supervisor's
  # `{:EXIT, parent, :killed}`. gen_server then runs their terminate/2 (which closes the
  # registry and logs the documented "registry closed; N subscribers got the exit
  # signal ..." line) and logs a "GenServer ... terminating" error report of its own
  # for each, with reason `:killed`; so does the dispatcher's supervisor itself when the
  # application's top supervisor is killed. Those reports say nothing the closing line
  # does not, and read like crashes of ours: this primary `:logger` filter, installed
  # while the `:ex_atlas` application runs, drops exactly them: a gen_server terminate
  # report with reason `:killed` whose last message is its parent's `:killed` exit,
  # logged by one of those three processes. Primary filters run in the process that
  # logs, so that process is known by its `$initial_call`. Every other report passes.

  @id :ex_atlas_dispatcher_killed_tree
  @ours [
    {ExAtlas.Fly.Dispatcher.Server, :init, 1},
    {ExAtlas.Fly.Dispatcher.Closer, :init, 1},
    {:supervisor, ExAtlas.Fly.Dispatcher.Supervisor, 1}
  ]

  @doc "Installs the filter (once; again is harmless)."
  @spec install() :: :ok
  def install do
    case :logger.add_primary_filter(@id, {&__MODULE__.filter/2, @ours}) do
      :ok -> :ok
      {:error, {:already_exist, @id}} -> :ok
    end
  end

  @doc "Removes the filter."
  @spec remove() :: :ok
  def remove do
    _ = :logger.remove_primary_filter(@id)
    :ok
  end

  @doc false
  @spec filter(:logger.log_event(), [mfa()]) :: :logger.filter_return()
  def filter(
        %{
          msg:
            {:report,
             %{
               label: {:gen_server, :terminate},
               reason: :killed,
               last_message: {:EXIT, _parent, :killed}
             }}
        },
        ours
      ) do
    if Process.get(:"$initial_call") in ours, do: :stop, else: :ignore
  end

  def filter(_event, _ours), do: :ignore
end
