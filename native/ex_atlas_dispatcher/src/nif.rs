//! The NIF glue of `ExAtlas.Fly.Dispatcher.Native`: decodes terms, calls the plain-Rust
//! core (`registry`, `fanout`, `handoff`, `route`, `history`) and encodes results. No
//! registry, queue or replay logic lives here; every call into the VM's C API does.
//!
//! Built only outside `cargo test` (see `lib.rs`). One module per concern, each with the
//! NIFs of that concern:
//!
//! * `dispatcher`: the `Dispatcher` resource, its `down`, `new/4` and `close/1`;
//! * `dispatch`: a producer's side of a dispatch (`dispatch/2,3`, `resume/2`);
//! * `lanes`: the senders' side (`deliver/2`, `set_senders/2`, `take_parked/2` ...);
//! * `replay`: `join/4`, `replay/2`, and the history a dispatch records;
//! * `subscriptions`: `subscribe/3`, `unsubscribe/2,3`, and the cluster relay's hints;
//! * `introspection`: counts, lists and stats;
//! * `skip`: `on_slow: :skip`'s state, set by the watchdog, and the send loops' gate;
//! * `term`, `timeslice`, `kept`: term and environment plumbing, the timeslice each
//!   call reports, and the messages replay keeps.

mod dispatch;
mod dispatcher;
mod introspection;
mod kept;
mod lanes;
mod parking;
mod replay;
mod skip;
mod subscriptions;
mod term;
mod timeslice;

pub(crate) use dispatch::unpublish;

/// The atoms the NIFs answer with and the tags of the messages they send: names on the
/// wire, which the Elixir side matches.
mod atoms {
    rustler::atoms! {
        ok,
        forward,
        full,
        wait,
        closed,
        more,
        not_alive,
        too_many_topics,
        undefined,
        nif_panicked,
        topics,
        subscriptions,
        subscribers,
        monitors,
        lanes,
        queue_capacity,
        in_flight,
        max_in_flight,
        peak_in_flight,
        delivered_batches,
        dispatches,
        deliveries,
        waiting,
        lost_batches,
        lost_deliveries,
        allocated_bytes,
        ex_atlas_deliver = "$ex_atlas_deliver",
        ex_atlas_drain = "$ex_atlas_drain",
        done,
        ex_atlas_room = "$ex_atlas_room",
        ex_atlas_interest = "$ex_atlas_interest",
        plain,
        removed,
        parked,
        not_parked,
        not_joining,
        joining,
        not_subscribed,
        gap,
        ex_atlas_fly_gap,
        replay_messages,
        replay_bytes,
        replay_joiners,
        replay_parked,
        replay_retained_bytes,
        replay_cuts,
        replay_missed,
        replay_monitors,
    }
}
