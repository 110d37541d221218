//! Which process sends which part of a dispatch: the rules that keep each producer's order
//! for every subscriber, whatever OTP does to the order of messages from different
//! processes. Plain Rust; the glue (`dispatch_to` in `nif::dispatch`) carries the plan out.
//!
//! * The direct partition (off-heap subscribers, whose signals OTP may buffer per sender)
//!   is always sent by the producer itself: one process sends all of a producer's
//!   messages to such a subscriber.
//! * A lane's part of a small dispatch (at most `inline_limit` subscriptions over the
//!   lanes) is sent by the producer when nothing it handed to that lane before is still
//!   on its way (`clear_for(lane)`); on-heap queues keep that order.
//! * Everything else goes to the lane's sender, behind the producer's earlier batches.

use crate::registry::{Part, Snapshot};
use smallvec::SmallVec;

/// The two kinds of work of one dispatch, each part with its first position not sent,
/// in the order to do them. Inline vectors of a snapshot's size: a small dispatch, the
/// common case, allocates nothing here.
#[derive(Default)]
pub struct Work {
    /// Parts for the lanes' senders: lane, subscribers, first position not sent.
    pub hand_over: SmallVec<[(usize, Part, usize); 4]>,
    /// Parts the producer sends itself: subscribers, first position not sent.
    pub inline: SmallVec<[(Part, usize); 4]>,
}

/// Splits `snapshot` (parts by lane; the direct partition's index is `direct`) into what
/// the producer sends and what goes to the senders. `clear_for(lane)` is asked only for
/// the lanes of a small dispatch.
pub fn route(
    snapshot: Snapshot,
    direct: usize,
    inline_limit: usize,
    mut clear_for: impl FnMut(usize) -> bool,
) -> Work {
    let on_lanes: usize = snapshot
        .iter()
        .filter(|(lane, _)| *lane != direct)
        .map(|(_, part)| part.len())
        .sum();
    let small = on_lanes <= inline_limit;
    let mut work = Work::default();
    for (lane, part) in snapshot {
        if lane == direct || (small && clear_for(lane)) {
            work.inline.push((part, 0));
        } else {
            work.hand_over.push((lane, part, 0));
        }
    }
    work
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::registry::Sharded;

    /// A snapshot of topic `t` with `on_lanes` subscribers spread over two lanes and
    /// `direct` in the direct partition.
    fn snapshot(on_lanes: u64, direct: u64) -> (Snapshot, usize) {
        let registry: Sharded<()> = Sharded::new(2);
        for pid in 0..on_lanes {
            registry
                .subscribe(b"t", pid * 16 + 3, || Some(()))
                .unwrap()
                .unwrap();
        }
        for pid in 0..direct {
            let pid = 1_000_000 + pid * 16 + 3;
            registry
                .subscribe_direct(b"t", pid, || Some(()))
                .unwrap()
                .unwrap();
        }
        (registry.snapshot(b"t").unwrap(), registry.direct())
    }

    fn lanes(work: &Work) -> (Vec<usize>, usize) {
        let handed = work.hand_over.iter().map(|(lane, _, _)| *lane).collect();
        let inline = work.inline.iter().map(|(part, _)| part.len()).sum();
        (handed, inline)
    }

    #[test]
    fn the_direct_partition_is_always_sent_by_the_producer() {
        let (snap, direct) = snapshot(100, 5_000);
        let work = route(snap, direct, 16, |_| true);
        let (handed, inline) = lanes(&work);
        assert_eq!(
            handed,
            vec![0, 1],
            "a big dispatch's lanes go to the senders"
        );
        assert_eq!(inline, 5_000, "however many off-heap subscribers there are");
    }

    #[test]
    fn a_small_dispatch_is_sent_by_the_producer_where_it_is_clear() {
        let (snap, direct) = snapshot(10, 0);
        let work = route(snap, direct, 16, |lane| lane == 1);
        let (handed, inline) = lanes(&work);
        assert_eq!(
            handed,
            vec![0],
            "not clear of lane 0: its sender, after the rest"
        );
        assert!(inline > 0 && inline < 10);
    }

    #[test]
    fn only_the_lanes_count_towards_a_small_dispatch() {
        let (snap, direct) = snapshot(16, 1_000);
        let mut asked = Vec::new();
        let work = route(snap, direct, 16, |lane| {
            asked.push(lane);
            true
        });
        assert_eq!(asked, vec![0, 1]);
        assert!(work.hand_over.is_empty());
        let (snap, direct) = snapshot(17, 0);
        let work = route(snap, direct, 16, |_| panic!("a big dispatch asks nobody"));
        assert_eq!(work.hand_over.len(), 2);
    }
}
