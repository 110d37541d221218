//! The duplicate-key subscriber registry: topic → subscribers, subscriber → subscriptions.
//!
//! Plain Rust with no rustler types, so `cargo test` exercises it without a VM. A
//! subscriber is an opaque `u64` (the glue stores the raw term of a local pid there) and
//! `M` is whatever the glue needs to undo its process monitor.
//!
//! Layout, chosen so that no operation scales with the size of a topic:
//!
//! * [`Sharded`] (`sharded`) gives each fan-out lane its own [`Registry`]s. A
//!   subscriber's lane is picked by a hash of its pid, so one sender always serves the
//!   same subscriber (that keeps per-sender order while several senders share one
//!   dispatch). One more partition, the *direct* one, holds the subscriptions that every
//!   dispatching process sends to itself, never through a sender (the NIF puts off-heap
//!   subscribers there: OTP orders their messages per sending process only). Within a
//!   lane, a topic lives in one of [`STRIPES`] registries, picked by a hash of its name,
//!   so concurrent subscribers rarely take the same lock, even in one lane, and a
//!   dispatch still takes one lock per lane.
//! * Within a registry (`shard`), a topic's subscribers are a [`Part`], chunks shared
//!   copy-on-write with dispatch snapshots, and every subscription knows its slot.
//! * Each subscriber's one monitor lives in a watch table (`watches`), whichever shards
//!   hold its subscriptions.
//! * In cluster mode every shard records the topics it created or emptied (`tracking`),
//!   for the relay.

mod shard;
mod sharded;
mod tracking;
mod watches;

pub use shard::{topic_key, Part, Registry, Removed, Stats, SubscribeError, CHUNK};
pub use sharded::{partition_of, Cleared, ClosedError, Sharded, Snapshot, STRIPES};

/// An opaque subscriber id (the raw term of a local pid in the NIF).
pub type Pid = u64;

/// What the tests of the registry's modules share.
#[cfg(test)]
mod testing {
    use super::Pid;

    /// A monitor for `pid` that is always made: `pid * 10`.
    pub fn ok_monitor(pid: Pid) -> impl FnOnce() -> Option<u64> {
        move || Some(pid * 10)
    }

    pub fn sorted(mut v: Vec<Pid>) -> Vec<Pid> {
        v.sort_unstable();
        v
    }
}
