# Soak tests run for minutes; run them with `mix test --only soak`.
#
# An `assert_receive` without a timeout waits for something that must happen (a spawned
# subscriber's `:ready`, a reply): 100 ms, ExUnit's default, is too short on a loaded
# 2-core machine, and waiting longer costs nothing unless the test fails anyway.
# `refute_receive` keeps its own default.
ExUnit.start(exclude: [:soak], assert_receive_timeout: 5_000)
