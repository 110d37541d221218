//! Bounded job queues, each drained in order by a sender thread of its own.
//!
//! Plain Rust with no rustler types: the glue decides what a job is and what a thread
//! does with it. What this module guarantees:
//!
//! * one queue per thread, first in first out, so jobs pushed to one queue by one caller
//!   are handled in the order pushed;
//! * every queue is bounded: `try_push` hands the job back when the queue is full and
//!   `push` waits for room, so memory never grows past `threads * capacity` jobs;
//! * a panicking job is contained and the thread carries on with the next one;
//! * `close` lets the threads finish what is queued and then exit; no thread is joined
//!   from the caller, so closing never blocks on a slow queue.

use crossbeam_channel::{bounded, Receiver, Sender, TryRecvError, TrySendError};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;

/// A job could not be queued; the job is handed back.
#[derive(Debug, PartialEq, Eq)]
pub enum PushError<J> {
    /// The queue is at its bound.
    Full(J),
    /// The queues were closed.
    Closed(J),
}

enum Envelope<J> {
    Job(J),
    Stop,
}

#[derive(Default)]
struct Counters {
    handled: AtomicU64,
    panicked: AtomicU64,
    running: AtomicUsize,
}

/// The sender threads and their queues.
pub struct Fanout<J> {
    queues: Vec<Sender<Envelope<J>>>,
    capacity: usize,
    closed: AtomicBool,
    counters: Arc<Counters>,
}

/// Point-in-time figures about the queues.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FanoutStats {
    /// Sender threads (= queues).
    pub threads: usize,
    /// Bound of each queue, in jobs.
    pub capacity: usize,
    /// Jobs waiting in all queues.
    pub queued: usize,
    /// Most jobs waiting in any one queue.
    pub max_queued: usize,
    /// Jobs handled since start.
    pub handled: u64,
    /// Jobs whose handler panicked (contained).
    pub panicked: u64,
    /// Threads still running.
    pub running: usize,
}

impl<J: Send + 'static> Fanout<J> {
    /// Starts `threads` sender threads (at least one), each with a queue of `capacity`
    /// jobs (at least one). `handle(queue_index, job)` runs on the queue's thread.
    pub fn start<F>(threads: usize, capacity: usize, name: &str, handle: F) -> std::io::Result<Self>
    where
        F: Fn(usize, J) + Send + Clone + 'static,
    {
        let threads = threads.max(1);
        let capacity = capacity.max(1);
        let counters = Arc::new(Counters::default());
        let mut queues = Vec::with_capacity(threads);
        let mut spawned: Vec<Sender<Envelope<J>>> = Vec::new();
        for index in 0..threads {
            let (tx, rx) = bounded(capacity);
            let handle = handle.clone();
            let thread_counters = counters.clone();
            thread_counters.running.fetch_add(1, Ordering::SeqCst);
            let started = thread::Builder::new()
                .name(format!("{name}_{index}"))
                .spawn(move || run(index, rx, handle, thread_counters));
            if let Err(error) = started {
                counters.running.fetch_sub(1, Ordering::SeqCst);
                // Stop the threads already started before failing.
                for tx in &spawned {
                    let _ = tx.send(Envelope::Stop);
                }
                return Err(error);
            }
            spawned.push(tx.clone());
            queues.push(tx);
        }
        Ok(Fanout {
            queues,
            capacity,
            closed: AtomicBool::new(false),
            counters,
        })
    }

    /// Number of queues (= threads).
    pub fn threads(&self) -> usize {
        self.queues.len()
    }

    /// Queues `job` on queue `queue` (taken modulo the number of queues) without waiting.
    pub fn try_push(&self, queue: usize, job: J) -> Result<(), PushError<J>> {
        if self.closed.load(Ordering::Acquire) {
            return Err(PushError::Closed(job));
        }
        match self.queue(queue).try_send(Envelope::Job(job)) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(Envelope::Job(job))) => Err(PushError::Full(job)),
            Err(TrySendError::Disconnected(Envelope::Job(job))) => Err(PushError::Closed(job)),
            Err(_) => unreachable_stop(),
        }
    }

    /// Queues `job`, waiting for room. Only for threads that may block (dirty schedulers,
    /// tests), never for a normal scheduler.
    pub fn push(&self, queue: usize, job: J) -> Result<(), PushError<J>> {
        if self.closed.load(Ordering::Acquire) {
            return Err(PushError::Closed(job));
        }
        match self.queue(queue).send(Envelope::Job(job)) {
            Ok(()) => Ok(()),
            Err(error) => match error.into_inner() {
                Envelope::Job(job) => Err(PushError::Closed(job)),
                Envelope::Stop => unreachable_stop(),
            },
        }
    }

    /// Refuses new jobs and tells every thread to exit once its queue is drained. Waits
    /// for room for the stop marker, so call it where blocking is allowed.
    pub fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        for queue in &self.queues {
            let _ = queue.send(Envelope::Stop);
        }
    }

    /// True once `close` ran.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Current figures.
    pub fn stats(&self) -> FanoutStats {
        let lens = self.queues.iter().map(Sender::len);
        FanoutStats {
            threads: self.queues.len(),
            capacity: self.capacity,
            queued: lens.clone().sum(),
            max_queued: lens.max().unwrap_or(0),
            handled: self.counters.handled.load(Ordering::Relaxed),
            panicked: self.counters.panicked.load(Ordering::Relaxed),
            running: self.counters.running.load(Ordering::SeqCst),
        }
    }

    fn queue(&self, index: usize) -> &Sender<Envelope<J>> {
        &self.queues[index % self.queues.len()]
    }
}

impl<J> Drop for Fanout<J> {
    fn drop(&mut self) {
        // Dropping the senders disconnects the queues: each thread drains what is left
        // and exits. Nothing is joined here, so a drop never waits on a busy thread.
        self.closed.store(true, Ordering::Release);
    }
}

fn unreachable_stop<T>() -> T {
    // Only `close` sends `Stop`, and it never hands it back to a caller.
    panic!("stop marker returned from a push")
}

fn run<J, F>(index: usize, rx: Receiver<Envelope<J>>, handle: F, counters: Arc<Counters>)
where
    F: Fn(usize, J),
{
    loop {
        let envelope = match rx.try_recv() {
            Ok(envelope) => envelope,
            Err(TryRecvError::Empty) => match rx.recv() {
                Ok(envelope) => envelope,
                Err(_) => break,
            },
            Err(TryRecvError::Disconnected) => break,
        };
        match envelope {
            Envelope::Job(job) => {
                if catch_unwind(AssertUnwindSafe(|| handle(index, job))).is_err() {
                    counters.panicked.fetch_add(1, Ordering::Relaxed);
                }
                counters.handled.fetch_add(1, Ordering::Relaxed);
            }
            Envelope::Stop => break,
        }
    }
    counters.running.fetch_sub(1, Ordering::SeqCst);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Barrier, Mutex};
    use std::time::{Duration, Instant};

    fn wait_until(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn each_queue_keeps_the_push_order() {
        let seen = Arc::new(Mutex::new(vec![Vec::new(); 3]));
        let sink = seen.clone();
        let fanout = Fanout::start(3, 8, "order", move |q, job: u32| {
            sink.lock().unwrap()[q].push(job);
        })
        .unwrap();
        for job in 0..3_000u32 {
            fanout.push(job as usize % 3, job).unwrap();
        }
        wait_until("all jobs", || fanout.stats().handled == 3_000);
        let seen = seen.lock().unwrap();
        for (q, jobs) in seen.iter().enumerate() {
            let want: Vec<u32> = (0..3_000).filter(|j| *j as usize % 3 == q).collect();
            assert_eq!(jobs, &want);
        }
    }

    #[test]
    fn full_queue_hands_the_job_back_and_push_waits_for_room() {
        let gate = Arc::new(Barrier::new(2));
        let thread_gate = gate.clone();
        let fanout = Fanout::start(1, 2, "full", move |_, job: u32| {
            if job == 0 {
                thread_gate.wait();
            }
        })
        .unwrap();
        fanout.push(0, 0).unwrap(); // taken by the thread, which now waits on the gate
        wait_until("thread to take job 0", || fanout.stats().queued == 0);
        fanout.try_push(0, 1).unwrap();
        fanout.try_push(0, 2).unwrap();
        assert_eq!(fanout.try_push(0, 3), Err(PushError::Full(3)));
        assert_eq!(fanout.stats().max_queued, 2);
        let fanout = Arc::new(fanout);
        let pusher = {
            let fanout = fanout.clone();
            thread::spawn(move || fanout.push(0, 3))
        };
        thread::sleep(Duration::from_millis(20));
        assert!(
            !pusher.is_finished(),
            "push returned while the queue was full"
        );
        gate.wait();
        pusher.join().unwrap().unwrap();
        wait_until("all jobs", || fanout.stats().handled == 4);
    }

    #[test]
    fn a_panicking_job_does_not_stop_the_thread() {
        let done = Arc::new(AtomicUsize::new(0));
        let counter = done.clone();
        let fanout = Fanout::start(1, 4, "panic", move |_, job: u32| {
            if job.is_multiple_of(2) {
                panic!("job {job} fails on purpose");
            }
            counter.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
        for job in 0..10 {
            fanout.push(0, job).unwrap();
        }
        wait_until("all jobs", || fanout.stats().handled == 10);
        assert_eq!(done.load(Ordering::SeqCst), 5);
        assert_eq!(fanout.stats().panicked, 5);
    }

    #[test]
    fn close_drains_then_stops_every_thread_and_refuses_new_jobs() {
        let done = Arc::new(AtomicUsize::new(0));
        let counter = done.clone();
        let fanout = Fanout::start(2, 16, "close", move |_, _job: u32| {
            thread::sleep(Duration::from_micros(200));
            counter.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
        for job in 0..20 {
            fanout.push(job as usize, job).unwrap();
        }
        fanout.close();
        assert_eq!(fanout.try_push(0, 99), Err(PushError::Closed(99)));
        assert_eq!(fanout.push(1, 98), Err(PushError::Closed(98)));
        wait_until("threads to exit", || fanout.stats().running == 0);
        assert_eq!(done.load(Ordering::SeqCst), 20);
    }

    #[test]
    fn dropping_the_fanout_lets_threads_finish_and_exit() {
        let done = Arc::new(AtomicUsize::new(0));
        let counter = done.clone();
        let fanout = Fanout::start(2, 64, "drop", move |_, _job: u32| {
            counter.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
        let counters = fanout.counters.clone();
        for job in 0..50 {
            fanout.push(job as usize, job).unwrap();
        }
        drop(fanout);
        wait_until("threads to exit", || {
            counters.running.load(Ordering::SeqCst) == 0
        });
        assert_eq!(done.load(Ordering::SeqCst), 50);
    }

    #[test]
    fn concurrent_producers_keep_their_own_order_per_queue() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let fanout = Arc::new(
            Fanout::start(2, 4, "producers", move |q, job: (u32, u32)| {
                sink.lock().unwrap().push((q, job));
            })
            .unwrap(),
        );
        let producers: Vec<_> = (0..4u32)
            .map(|producer| {
                let fanout = fanout.clone();
                thread::spawn(move || {
                    for seq in 0..2_000u32 {
                        fanout
                            .push((producer + seq) as usize % 2, (producer, seq))
                            .unwrap();
                    }
                })
            })
            .collect();
        for p in producers {
            p.join().unwrap();
        }
        wait_until("all jobs", || fanout.stats().handled == 8_000);
        let seen = seen.lock().unwrap();
        for producer in 0..4u32 {
            for q in 0..2usize {
                let seqs: Vec<u32> = seen
                    .iter()
                    .filter(|(queue, (p, _))| *queue == q && *p == producer)
                    .map(|(_, (_, s))| *s)
                    .collect();
                assert!(
                    seqs.windows(2).all(|w| w[0] < w[1]),
                    "producer {producer} queue {q} out of order"
                );
                assert_eq!(seqs.len(), 1_000);
            }
        }
    }
}
