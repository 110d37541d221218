//! Cluster change-tracking: the topics a node gained or lost. In cluster mode the glue
//! tells the relay about each topic that a subscription change created or emptied in its
//! shard (a hint, which the relay checks against the count), so every shard records
//! those while tracking is on, until the glue takes them.

use super::shard::Registry;
use super::sharded::Sharded;
use super::Pid;
use std::sync::Arc;

/// The topics one shard created or emptied since they were last taken, recorded only
/// while tracking.
#[derive(Default)]
pub(super) struct Changes {
    changed: Vec<Arc<[u8]>>,
    tracking: bool,
}

impl Changes {
    /// `name` was created or emptied.
    pub(super) fn note(&mut self, name: &Arc<[u8]>) {
        if self.tracking {
            self.changed.push(name.clone());
        }
    }
}

impl<M> Registry<M> {
    /// Starts or stops recording the topics that are created or emptied.
    pub fn set_tracking(&mut self, tracking: bool) {
        self.changes.tracking = tracking;
        if !tracking {
            self.changes.changed = Vec::new();
        }
    }

    /// The topics created or emptied since the last call (while tracking), in order; a
    /// topic may appear more than once.
    pub fn take_changed(&mut self) -> Vec<Arc<[u8]>> {
        std::mem::take(&mut self.changes.changed)
    }
}

impl<M> Sharded<M> {
    /// [`Registry::set_tracking`] in every shard.
    pub fn set_tracking(&self, tracking: bool) {
        for shard in self.shards.iter() {
            shard.lock().registry.set_tracking(tracking);
        }
    }

    /// [`Registry::take_changed`] where `pid`'s last change happened: the shards of
    /// `topic` in its partitions, or every shard of them for `None` (all its
    /// subscriptions went).
    pub fn take_changed(&self, pid: Pid, topic: Option<&[u8]>) -> Vec<Arc<[u8]>> {
        match topic {
            Some(topic) => self
                .partitions_of(pid)
                .into_iter()
                .flat_map(|partition| self.shard_in(partition, topic).registry.take_changed())
                .collect(),
            None => self
                .shards_of(pid)
                .flat_map(|mut shard| shard.registry.take_changed())
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::ok_monitor;
    use super::*;

    #[test]
    fn tracking_records_topics_created_and_emptied() {
        let mut reg = Registry::new();
        reg.subscribe(b"quiet", 1, ok_monitor(1)).unwrap();
        assert!(
            reg.take_changed().is_empty(),
            "nothing recorded while not tracking"
        );

        reg.set_tracking(true);
        reg.subscribe(b"a", 1, ok_monitor(1)).unwrap();
        reg.subscribe(b"a", 2, ok_monitor(2)).unwrap();
        reg.subscribe(b"b", 2, ok_monitor(2)).unwrap();
        let names = |v: Vec<Arc<[u8]>>| v.iter().map(|n| n.to_vec()).collect::<Vec<_>>();
        assert_eq!(
            names(reg.take_changed()),
            vec![b"a".to_vec(), b"b".to_vec()]
        );
        assert!(reg.take_changed().is_empty());

        reg.unsubscribe(b"a", 1);
        assert!(reg.take_changed().is_empty(), "a still has a subscriber");
        reg.remove_subscriber(2);
        let mut emptied = names(reg.take_changed());
        emptied.sort();
        assert_eq!(emptied, vec![b"a".to_vec(), b"b".to_vec()]);

        reg.set_tracking(false);
        reg.subscribe(b"c", 3, ok_monitor(3)).unwrap();
        assert!(reg.take_changed().is_empty());

        // Stopping drops what was recorded and not taken; starting again starts empty.
        reg.set_tracking(true);
        reg.subscribe(b"d", 4, ok_monitor(4)).unwrap();
        reg.set_tracking(false);
        reg.set_tracking(true);
        assert!(reg.take_changed().is_empty());
        reg.subscribe(b"e", 5, ok_monitor(5)).unwrap();
        reg.set_tracking(true);
        assert_eq!(
            names(reg.take_changed()),
            vec![b"e".to_vec()],
            "kept while on"
        );
    }

    #[test]
    fn a_sharded_registry_tracks_in_every_shard_and_hands_a_pids_changes_back() {
        let reg: Sharded<u64> = Sharded::new(2);
        reg.subscribe(b"quiet", 1, ok_monitor(1)).unwrap().unwrap();
        assert!(reg.take_changed(1, Some(b"quiet")).is_empty());

        reg.set_tracking(true);
        let names = |v: Vec<Arc<[u8]>>| v.iter().map(|n| n.to_vec()).collect::<Vec<_>>();
        for pid in [1, 2] {
            reg.subscribe(b"a", pid, ok_monitor(pid)).unwrap().unwrap();
        }
        reg.subscribe_direct(b"b", 2, ok_monitor(2))
            .unwrap()
            .unwrap();
        // Where each pid's change happened: its partitions' shards of the topic (with
        // whatever else those shards recorded: a hint, which the relay checks).
        let mut changed = names(reg.take_changed(1, Some(b"a")));
        changed.extend(names(reg.take_changed(2, Some(b"a"))));
        changed.extend(names(reg.take_changed(2, Some(b"b"))));
        changed.sort_unstable();
        changed.dedup();
        assert_eq!(changed, vec![b"a".to_vec(), b"b".to_vec()]);

        // All of a pid's subscriptions gone: its shards' changes, whatever the topic.
        reg.remove_subscriber(2);
        let gone = names(reg.take_changed(2, None));
        assert!(gone.contains(&b"b".to_vec()), "{gone:?}");
        reg.remove_subscriber(1);
        let gone = names(reg.take_changed(1, None));
        assert!(gone.contains(&b"a".to_vec()) && gone.contains(&b"quiet".to_vec()));
    }
}
