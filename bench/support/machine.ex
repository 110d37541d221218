defmodule FanoutBench.Machine do
  @moduledoc false
  # What the figures were measured on.

  @doc "Date, machine, versions and the state of the tree, as an ordered keyword list."
  @spec info() :: keyword(String.t())
  def info do
    [
      date: DateTime.utc_now() |> DateTime.truncate(:second) |> DateTime.to_iso8601(),
      machine: "#{nproc()} CPUs (nproc), #{cpu_model()}, #{mem_total()} RAM",
      schedulers: "#{:erlang.system_info(:schedulers_online)} online",
      otp:
        "Erlang/OTP #{:erlang.system_info(:otp_release)} (erts #{:erlang.system_info(:version)})",
      elixir: "Elixir #{System.version()}",
      vm_flags: vm_flags(),
      commit: commit(),
      load_average_at_start: load_average()
    ]
  end

  # Emulator flags such as +sbwt are not visible from inside the VM; the environment
  # variables that usually carry them are.
  defp vm_flags do
    flags =
      for var <- ["ERL_FLAGS", "ERL_AFLAGS", "ERL_ZFLAGS"],
          value = System.get_env(var),
          value not in [nil, ""],
          do: "#{var}=#{inspect(value)}"

    if flags == [], do: "none (ERL_FLAGS etc. unset)", else: Enum.join(flags, " ")
  end

  @doc "The 1, 5 and 15 minute load averages."
  @spec load_average() :: String.t()
  def load_average do
    case File.read("/proc/loadavg") do
      {:ok, text} -> text |> String.split() |> Enum.take(3) |> Enum.join(" ")
      {:error, _} -> "unknown"
    end
  end

  defp nproc do
    case System.find_executable("nproc") do
      nil -> "#{:erlang.system_info(:logical_processors_available)}"
      path -> path |> System.cmd([]) |> elem(0) |> String.trim()
    end
  end

  defp cpu_model do
    with {:ok, text} <- File.read("/proc/cpuinfo"),
         [_, model] <- Regex.run(~r/^model name\s*:\s*(.+)$/m, text) do
      String.trim(model)
    else
      _ -> "unknown CPU"
    end
  end

  defp mem_total do
    with {:ok, text} <- File.read("/proc/meminfo"),
         [_, kib] <- Regex.run(~r/^MemTotal:\s*(\d+) kB$/m, text) do
      "#{Float.round(String.to_integer(kib) / 1_048_576, 1)} GiB"
    else
      _ -> "unknown"
    end
  end

  # Several engineers change lib/ and native/ in the same tree: say when the measured code
  # differs from the commit.
  defp commit do
    with git when is_binary(git) <- System.find_executable("git"),
         {sha, 0} <- System.cmd(git, ["rev-parse", "--short", "HEAD"], stderr_to_stdout: true),
         {status, 0} <- System.cmd(git, ["status", "--porcelain", "--", "lib", "native"]) do
      dirty = if String.trim(status) == "", do: "", else: " (lib/ or native/ modified)"
      String.trim(sha) <> dirty
    else
      _ -> "unknown"
    end
  end
end
