# Soak tests run for minutes; run them with `mix test --only soak`.
ExUnit.start(exclude: [:soak])
