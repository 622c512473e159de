//! The long-running tasks of a server, an agent or a listener: named, watched for an early end,
//! and stopped when their owner is dropped.

use std::future::Future as _;
use std::time::Duration;

use tokio::task::JoinHandle;

/// Named tasks that run until their owner stops them. Dropping the set aborts every task in
/// it, so an owner dropped without a shutdown leaves nothing running.
#[derive(Debug, Default)]
pub struct Tasks(Vec<(String, JoinHandle<()>)>);

impl Tasks {
    /// An empty set.
    pub fn new() -> Tasks {
        Tasks::default()
    }

    /// Adds `task`, named by what it serves (`"the agent listener"`).
    pub fn push(&mut self, name: impl Into<String>, task: JoinHandle<()>) {
        self.0.push((name.into(), task));
    }

    /// Adds `task` if there is one.
    pub fn push_some(&mut self, name: &str, task: Option<JoinHandle<()>>) {
        if let Some(t) = task {
            self.push(name, t);
        }
    }

    /// Moves every task of `other` into this set.
    pub fn extend(&mut self, mut other: Tasks) {
        self.0.append(&mut other.0);
    }

    /// Tasks in the set.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Waits until one task ends, removes it (a finished task is not polled again) and says
    /// which and why: `"<name> stopped"`, with tokio's panic or cancellation message if it
    /// failed. Never ready while all run, nor with none: these tasks end before their owner
    /// stops them only by failing (a panic, which tokio catches in the task, so the process
    /// would run on without it).
    pub async fn first_to_end(&mut self) -> String {
        let (i, result) = std::future::poll_fn(|cx| {
            for (i, (_, t)) in self.0.iter_mut().enumerate() {
                if let std::task::Poll::Ready(r) = std::pin::Pin::new(t).poll(cx) {
                    return std::task::Poll::Ready((i, r));
                }
            }
            std::task::Poll::Pending
        })
        .await;
        let (name, _) = self.0.swap_remove(i);
        match result {
            Ok(()) => format!("{name} stopped"),
            Err(e) => format!("{name} stopped: {e}"),
        }
    }

    /// Aborts every task and waits until each has ended, so whatever they held (a listening
    /// socket) is released when this returns.
    pub async fn stop(mut self) {
        for (name, t) in std::mem::take(&mut self.0) {
            t.abort();
            if let Err(e) = t.await
                && !e.is_cancelled()
            {
                tracing::warn!(task = %name, error = %e, "a task failed");
            }
        }
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        for (_, t) in &self.0 {
            t.abort();
        }
    }
}

/// Polls `ready` every 10 ms until it holds or `timeout` passes; whether it held.
pub async fn wait_until(timeout: Duration, ready: impl Fn() -> bool) -> bool {
    let end = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < end {
        if ready() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    ready()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn running_tasks_never_count_as_ended() {
        let mut t = Tasks::new();
        t.push("the agent listener", tokio::spawn(std::future::pending()));
        t.push("the health port", tokio::spawn(std::future::pending()));
        let waited = tokio::time::timeout(Duration::from_secs(3600), t.first_to_end()).await;
        assert!(waited.is_err(), "{waited:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_that_panics_is_named_with_its_panic() {
        let mut t = Tasks::new();
        t.push("the agent listener", tokio::spawn(std::future::pending()));
        t.push(
            "the health port",
            tokio::spawn(async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                panic!("planted");
            }),
        );
        let why = t.first_to_end().await;
        assert!(why.starts_with("the health port stopped: "), "{why}");
        assert!(why.contains("planted"), "{why}");
        assert_eq!(t.len(), 1, "the rest still run");
        t.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_that_ends_is_named() {
        let mut t = Tasks::new();
        t.push("the agent listener", tokio::spawn(async {}));
        t.push("the health port", tokio::spawn(std::future::pending()));
        assert_eq!(t.first_to_end().await, "the agent listener stopped");
    }

    #[tokio::test]
    async fn dropping_the_set_ends_its_tasks() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let mut t = Tasks::new();
        // The task holds the sender: it is dropped when the task is.
        t.push(
            "holder",
            tokio::spawn(async move {
                let _tx = tx;
                std::future::pending::<()>().await;
            }),
        );
        drop(t);
        assert!(
            rx.await.is_err(),
            "the task ended and let go of what it held"
        );
    }
}
