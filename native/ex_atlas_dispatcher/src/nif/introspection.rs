//! Introspection: what the registry holds (`count/2`, `subscribers/2`, `topics/1`,
//! `topics_of/2`), and the figures of the registry, the lanes and replay (`stats/1`,
//! `lost/1`). Calls that walk every topic or subscriber run on a dirty scheduler.

use super::atoms;
use super::dispatcher::Dispatcher;
use super::term::{binary_term, pid_from_raw, pid_to_raw};
use crate::memory;
use crate::sync::lock;
use rustler::{Atom, Binary, Env, LocalPid, ResourceArc, Term};
use std::sync::atomic::Ordering;

#[rustler::nif]
fn count(dispatcher: ResourceArc<Dispatcher>, topic: Binary<'_>) -> usize {
    dispatcher.registry.count(topic.as_slice())
}

#[rustler::nif(schedule = "DirtyCpu")]
fn subscribers(dispatcher: ResourceArc<Dispatcher>, topic: Binary<'_>) -> Vec<LocalPid> {
    let snapshot = dispatcher
        .registry
        .snapshot(topic.as_slice())
        .unwrap_or_default();
    snapshot
        .iter()
        .flat_map(|(_, part)| part.pids())
        .map(pid_from_raw)
        .collect()
}

/// Cluster mode: true while this node wants `topic`'s dispatches: it has a subscription
/// to it, or a subscriber catching up on it or parked on it (`on_slow: :catch_up`), whom
/// the history keeps the topic's dispatches for.
#[rustler::nif]
fn wanted(dispatcher: ResourceArc<Dispatcher>, topic: Binary<'_>) -> bool {
    let topic = topic.as_slice();
    dispatcher.registry.count(topic) > 0
        || dispatcher
            .history
            .as_ref()
            .is_some_and(|history| lock(history).has_joiners(topic))
}

/// Every topic this node wants (see `wanted/2`), once each.
#[rustler::nif(schedule = "DirtyCpu")]
fn topics<'a>(env: Env<'a>, dispatcher: ResourceArc<Dispatcher>) -> Vec<Term<'a>> {
    let mut names = dispatcher.registry.topic_names();
    if let Some(history) = &dispatcher.history {
        let joined = lock(history).joined_topics();
        names.extend(joined);
        names.sort_unstable();
        names.dedup();
    }
    names.iter().map(|name| binary_term(env, name)).collect()
}

#[rustler::nif(schedule = "DirtyCpu")]
fn topics_of<'a>(
    env: Env<'a>,
    dispatcher: ResourceArc<Dispatcher>,
    pid: LocalPid,
) -> Vec<Term<'a>> {
    let names = dispatcher.registry.topics_of(pid_to_raw(&pid));
    names.iter().map(|name| binary_term(env, name)).collect()
}

// Counting distinct topics walks every topic name: dirty, like any O(topics) call.
#[rustler::nif(schedule = "DirtyCpu")]
fn stats(dispatcher: ResourceArc<Dispatcher>) -> Vec<(Atom, u64)> {
    let registry = dispatcher.registry.stats();
    let lanes = dispatcher.lanes.stats();
    let activity = dispatcher.activity.totals();
    let mut stats = vec![
        (atoms::topics(), registry.topics as u64),
        (atoms::subscriptions(), registry.subscriptions as u64),
        (atoms::subscribers(), registry.subscribers as u64),
        (
            atoms::monitors(),
            dispatcher.subscriber_monitors.load(Ordering::Relaxed) as u64,
        ),
        (atoms::lanes(), lanes.lanes as u64),
        (atoms::queue_capacity(), lanes.capacity as u64),
        (atoms::in_flight(), lanes.in_flight as u64),
        (atoms::max_in_flight(), lanes.max_in_flight as u64),
        (atoms::peak_in_flight(), lanes.peak as u64),
        (atoms::delivered_batches(), lanes.delivered),
        (atoms::dispatches(), activity.dispatches),
        (atoms::deliveries(), activity.deliveries),
        (atoms::waiting(), lanes.waiting as u64),
        (atoms::lost_batches(), lanes.lost_batches),
        (atoms::lost_deliveries(), lanes.lost_deliveries),
    ];
    let kept = dispatcher
        .history
        .as_ref()
        .map(|history| lock(history).stats())
        .unwrap_or_default();
    stats.push((atoms::replay_messages(), kept.messages as u64));
    stats.push((atoms::replay_bytes(), kept.bytes as u64));
    stats.push((atoms::replay_joiners(), kept.joiners as u64));
    stats.push((atoms::replay_parked(), kept.parked as u64));
    stats.push((atoms::replay_retained_bytes(), kept.retained as u64));
    stats.push((atoms::replay_cuts(), kept.cuts));
    stats.push((atoms::replay_missed(), kept.missed));
    stats.push((
        atoms::replay_monitors(),
        dispatcher.joiner_monitors.load(Ordering::Relaxed) as u64,
    ));
    if let Some(bytes) = memory::live_bytes() {
        stats.push((atoms::allocated_bytes(), bytes as u64));
    }
    stats
}

/// `{lost_batches, lost_deliveries}`: constant work per lane, for polling.
#[rustler::nif]
fn lost(dispatcher: ResourceArc<Dispatcher>) -> (u64, u64) {
    dispatcher.lanes.lost()
}
