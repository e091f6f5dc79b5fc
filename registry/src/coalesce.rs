//! Requests that share a round trip.
//!
//! Many sessions on a node send the same kind of request to the same peer
//! (writes forwarded to the leader). Sent one by one, each pays its own
//! frame, system calls and wake-ups on both sides, and the leader receives
//! them spread out, which splits its log appends into small groups. A
//! [`Coalescer`] keeps at most a few batches in flight; requests arriving
//! meanwhile wait and leave together in the next batch. On an idle node a
//! request leaves at once: there is no timer.

use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

/// Batches items of type `T` whose answers are `R` (one per item, in order).
pub struct Coalescer<T, R> {
    state: Mutex<State<T, R>>,
    max_in_flight: usize,
    max_batch: usize,
}

struct State<T, R> {
    waiting: Vec<(T, oneshot::Sender<R>)>,
    in_flight: usize,
}

impl<T: Send + 'static, R: Send + 'static> Coalescer<T, R> {
    /// At most `max_in_flight` batches out at once, each of at most
    /// `max_batch` items (both at least 1).
    pub fn new(max_in_flight: usize, max_batch: usize) -> Arc<Self> {
        Arc::new(Coalescer {
            state: Mutex::new(State {
                waiting: Vec::new(),
                in_flight: 0,
            }),
            max_in_flight: max_in_flight.max(1),
            max_batch: max_batch.max(1),
        })
    }

    /// Sends `item` in the next batch and waits for its answer. When fewer
    /// than `max_in_flight` batches are out, this call starts a sender task
    /// that runs the function `sender()` makes on batches until none is
    /// waiting (`sender` is called only then, so that a caller that joins a
    /// batch pays nothing for it); that function must return one answer per
    /// item, in order. `None` when the batch's answer did not include this
    /// item (a function that broke that rule, or a task that was
    /// cancelled).
    pub async fn submit<S, F, Fut>(self: &Arc<Self>, item: T, sender: S) -> Option<R>
    where
        S: FnOnce() -> F,
        F: Fn(Vec<T>) -> Fut + Send + 'static,
        Fut: Future<Output = Vec<R>> + Send,
    {
        let (tx, rx) = oneshot::channel();
        let start_sender = {
            let mut s = self.state.lock().ok()?;
            s.waiting.push((item, tx));
            let start = s.in_flight < self.max_in_flight;
            if start {
                s.in_flight += 1;
            }
            start
        };
        if start_sender {
            let this = self.clone();
            let send = sender();
            tokio::spawn(async move {
                while let Some(batch) = this.next_batch() {
                    let (items, answers): (Vec<T>, Vec<_>) = batch.into_iter().unzip();
                    let results = send(items).await;
                    for (answer, result) in answers.into_iter().zip(results) {
                        let _ = answer.send(result);
                    }
                }
            });
        }
        rx.await.ok()
    }

    /// The next batch to send, or `None` (and one sender fewer) when no
    /// item waits.
    fn next_batch(&self) -> Option<Vec<(T, oneshot::Sender<R>)>> {
        let mut s = self.state.lock().ok()?;
        if s.waiting.is_empty() {
            s.in_flight -= 1;
            return None;
        }
        let n = s.waiting.len().min(self.max_batch);
        Some(s.waiting.drain(..n).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    /// Requests arriving while a batch is out share the next one, every
    /// caller gets its own answer, and no more than `max_in_flight` batches
    /// are ever out at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_items_share_batches_and_get_their_own_answers() {
        let coalescer = Coalescer::<u32, u32>::new(2, 64);
        let batches = Arc::new(AtomicUsize::new(0));
        let out = Arc::new(AtomicUsize::new(0));
        let most_out = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for i in 0..200u32 {
            let (c, batches, out, most_out) = (
                coalescer.clone(),
                batches.clone(),
                out.clone(),
                most_out.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let send = move |items: Vec<u32>| {
                    let (batches, out, most_out) = (batches.clone(), out.clone(), most_out.clone());
                    async move {
                        batches.fetch_add(1, Ordering::SeqCst);
                        let now = out.fetch_add(1, Ordering::SeqCst) + 1;
                        most_out.fetch_max(now, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        out.fetch_sub(1, Ordering::SeqCst);
                        items.into_iter().map(|x| x * 10).collect()
                    }
                };
                (i, c.submit(i, || send).await)
            }));
        }
        for t in tasks {
            let (i, answer) = t.await.unwrap();
            assert_eq!(answer, Some(i * 10));
        }
        let batches = batches.load(Ordering::SeqCst);
        assert!(batches <= 100, "200 items went in {batches} batches");
        assert!(most_out.load(Ordering::SeqCst) <= 2);
        // Every sender has stopped: a lone item now leaves at once.
        let lone = coalescer
            .submit(7, || |items: Vec<u32>| async move { items })
            .await;
        assert_eq!(lone, Some(7));
    }

    /// A `send` that answers fewer items than it was given leaves the rest
    /// with `None` instead of waiting forever.
    #[tokio::test]
    async fn a_short_answer_is_none_not_a_hang() {
        let coalescer = Coalescer::<u32, u32>::new(1, 8);
        let answer = coalescer
            .submit(1, || |_items: Vec<u32>| async move { Vec::new() })
            .await;
        assert_eq!(answer, None);
    }
}
