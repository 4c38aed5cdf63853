//! The batched write-back: job results reach Postgres in multi-row statements, flushed when a batch
//! is full, when every job that could still add to it already has, or when a short window passed.
//! The caller waits for the commit before acknowledging its job.

use std::{collections::HashMap, sync::Arc, time::Duration};

use tokio::sync::{mpsc, oneshot};

use crate::{Error, KeyWrite, Result, Store};

#[derive(Debug, Clone)]
pub struct WriteBackConfig {
    pub max_batch: usize,
    /// How long the first result of a batch may wait for others to join it.
    pub max_delay: Duration,
    /// Back-off between attempts while Postgres is unreachable; results wait, none is dropped.
    pub retry_delay: Duration,
}

impl Default for WriteBackConfig {
    fn default() -> Self {
        Self {
            max_batch: 500,
            max_delay: Duration::from_millis(50),
            retry_delay: Duration::from_millis(500),
        }
    }
}

type Pending = (KeyWrite, oneshot::Sender<Result<bool>>);

/// Handle to the write-back task; cheap to clone. The task ends when every handle is dropped,
/// after flushing what it holds.
#[derive(Clone)]
pub struct WriteBack {
    tx: mpsc::Sender<Pending>,
}

impl WriteBack {
    pub fn spawn(store: Store, config: WriteBackConfig) -> (Self, tokio::task::JoinHandle<()>) {
        Self::spawn_with(store, config, None)
    }

    /// Like [`WriteBack::spawn`]; a batch is also flushed as soon as it holds a result from every
    /// one of the `contributors` (so the window only delays results while more are coming).
    pub fn spawn_with(
        store: Store,
        config: WriteBackConfig,
        contributors: Option<Contributors>,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(config.max_batch * 4);
        let task = tokio::spawn(run(store, config, contributors, rx));
        (Self { tx }, task)
    }

    /// Queues a result and waits until it is committed. `Ok(false)`: fenced out (a newer attempt
    /// already wrote this key) or the key row is gone.
    pub async fn write(&self, write: KeyWrite) -> Result<bool> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send((write, done))
            .await
            .map_err(|_| Error::WriteBackClosed)?;
        wait.await.map_err(|_| Error::WriteBackClosed)?
    }
}

/// How many results could join the batch now: the jobs the caller holds. When every one of them
/// is waiting on the write-back, waiting longer only adds latency.
pub type Contributors = Arc<dyn Fn() -> usize + Send + Sync>;

async fn run(
    store: Store,
    config: WriteBackConfig,
    contributors: Option<Contributors>,
    mut rx: mpsc::Receiver<Pending>,
) {
    let mut batch: Vec<Pending> = Vec::with_capacity(config.max_batch);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        let deadline = tokio::time::Instant::now() + config.max_delay;
        while batch.len() < config.max_batch {
            if contributors
                .as_ref()
                .is_some_and(|held| batch.len() >= held())
            {
                break;
            }
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(next)) => batch.push(next),
                Ok(None) | Err(_) => break,
            }
        }
        flush(&store, &config, &mut batch).await;
    }
}

async fn flush(store: &Store, config: &WriteBackConfig, batch: &mut Vec<Pending>) {
    // Two results for one key in a batch: only the newest attempt's can win, the older is fenced out.
    let mut newest: HashMap<(String, i64), usize> = HashMap::new();
    for (i, (write, _)) in batch.iter().enumerate() {
        let (sub, server) = write.key();
        let slot = newest
            .entry((sub.as_str().to_owned(), server.0))
            .or_insert(i);
        if batch[*slot].0.fence() < write.fence() {
            *slot = i;
        }
    }
    let mut winners: Vec<usize> = newest.into_values().collect();
    winners.sort_unstable();
    let writes: Vec<KeyWrite> = winners.iter().map(|&i| batch[i].0.clone()).collect();
    let applied = loop {
        match store.write_keys(&writes).await {
            Ok(applied) => break Ok(applied),
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %e, rows = writes.len(), "Write-back failed; retrying.");
                tokio::time::sleep(config.retry_delay).await;
            }
            Err(e) => break Err(e),
        }
    };
    let mut outcome: Vec<Option<Result<bool>>> =
        (0..batch.len()).map(|_| Some(Ok(false))).collect();
    match applied {
        Ok(applied) => {
            for (&i, ok) in winners.iter().zip(applied) {
                outcome[i] = Some(Ok(ok));
            }
        }
        Err(e) => {
            let message = e.to_string();
            tracing::error!(error = %message, rows = writes.len(), "Write-back rejected.");
            for slot in &mut outcome {
                *slot = Some(Err(Error::Rejected(message.clone())));
            }
        }
    }
    for ((_, done), result) in batch.drain(..).zip(outcome) {
        let _ = done.send(result.expect("one outcome per pending write"));
    }
}
