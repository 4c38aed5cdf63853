//! The batched write-back: job results reach Postgres in multi-row statements, flushed when a batch
//! is full, when every job that could still add to it already has (results in a batch being
//! committed count as in), or when a short window passed. Up to two batches commit at once. The
//! caller waits for the commit before acknowledging its job.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{
    sync::{Notify, Semaphore, mpsc, oneshot},
    task::JoinSet,
};

use crate::{Error, KeyWrite, Result, Store, WriteOutcome};

/// Histogram: rows per committed write-back transaction.
pub const WRITEBACK_BATCH_ROWS_METRIC: &str = "keyfleet_writeback_batch_rows";
/// Histogram: how long a committed write-back transaction took (statements and commit).
pub const WRITEBACK_COMMIT_METRIC: &str = "keyfleet_writeback_commit_seconds";

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

type Pending = (KeyWrite, oneshot::Sender<Result<WriteOutcome>>);

/// Handle to the write-back task; cheap to clone. The task ends when every handle is dropped,
/// after flushing what it holds.
#[derive(Clone)]
pub struct WriteBack {
    tx: mpsc::Sender<Pending>,
    recount: Arc<Notify>,
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
        let recount = Arc::new(Notify::new());
        let task = tokio::spawn(run(store, config, contributors, rx, recount.clone()));
        (Self { tx, recount }, task)
    }

    /// Says that the number of contributors may have dropped (a job ended without a write, or
    /// after its write was committed): a waiting batch whose every remaining contributor is now
    /// in it is flushed at once instead of at the end of its window.
    pub fn recount(&self) {
        self.recount.notify_one();
    }

    /// Queues a result and waits until it is committed; the outcome says whether it was applied,
    /// and if not, why (fenced out by a newer attempt, the key's state moved on, the row is gone).
    /// `Err(Error::Rejected)`: the database refuses this result (a bad value, a constraint); the
    /// other results of its batch are written all the same.
    pub async fn write(&self, write: KeyWrite) -> Result<WriteOutcome> {
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

/// Batches being committed at once, at most: a batch that is ready does not wait for the commit
/// before it (a purchase's last keys are not held back by its first key's commit), while a slow
/// database still gets no more than this many write-back transactions.
const FLUSHES_IN_FLIGHT: usize = 2;

async fn run(
    store: Store,
    config: WriteBackConfig,
    contributors: Option<Contributors>,
    mut rx: mpsc::Receiver<Pending>,
    recount: Arc<Notify>,
) {
    // Results in batches being committed: their jobs still count as held, but they are in.
    let flushing = Arc::new(AtomicUsize::new(0));
    let slots = Arc::new(Semaphore::new(FLUSHES_IN_FLIGHT));
    let mut flushes = JoinSet::new();
    let mut batch: Vec<Pending> = Vec::with_capacity(config.max_batch);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        let deadline = tokio::time::Instant::now() + config.max_delay;
        while batch.len() < config.max_batch {
            if contributors
                .as_ref()
                .is_some_and(|held| batch.len() + flushing.load(Ordering::SeqCst) >= held())
            {
                break;
            }
            tokio::select! {
                next = rx.recv() => match next {
                    Some(next) => batch.push(next),
                    None => break,
                },
                () = recount.notified() => {}
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        let permit = slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let rows = std::mem::replace(&mut batch, Vec::with_capacity(config.max_batch));
        flushing.fetch_add(rows.len(), Ordering::SeqCst);
        let (store, config, flushing) = (store.clone(), config.clone(), flushing.clone());
        flushes.spawn(async move {
            flush(&store, &config, rows, &flushing).await;
            drop(permit);
        });
        while flushes.try_join_next().is_some() {}
    }
    while flushes.join_next().await.is_some() {}
}

/// Writes a batch; `flushing` loses its rows once they are committed, before their writers hear.
async fn flush(
    store: &Store,
    config: &WriteBackConfig,
    batch: Vec<Pending>,
    flushing: &AtomicUsize,
) {
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
    let mut outcome: Vec<Option<Result<WriteOutcome>>> = batch
        .iter()
        .map(|(write, _)| {
            let (sub, server) = write.key();
            let winner = &batch[newest[&(sub.as_str().to_owned(), server.0)]].0;
            Some(Ok(WriteOutcome::Fenced {
                row_fence: winner.fence(),
            }))
        })
        .collect();
    let mut winners: Vec<usize> = newest.into_values().collect();
    winners.sort_unstable();
    let writes: Vec<KeyWrite> = winners.iter().map(|&i| batch[i].0.clone()).collect();
    for (&i, result) in winners
        .iter()
        .zip(write_isolated(store, config, &writes).await)
    {
        outcome[i] = Some(result);
    }
    flushing.fetch_sub(batch.len(), Ordering::SeqCst);
    for ((_, done), result) in batch.into_iter().zip(outcome) {
        let _ = done.send(result.expect("one outcome per pending write"));
    }
}

/// Writes the batch in one transaction; if the database rejects it, writes each half in its own
/// transaction, and so on down to single results, so one bad result fails alone and every other
/// result is committed. A transient error (Postgres unreachable, a deadlock, ...) is retried with
/// back-off, holding the part being written.
async fn write_isolated(
    store: &Store,
    config: &WriteBackConfig,
    writes: &[KeyWrite],
) -> Vec<Result<WriteOutcome>> {
    let mut results: Vec<Option<Result<WriteOutcome>>> = writes.iter().map(|_| None).collect();
    // Ranges of `writes` still to write.
    let mut parts = Vec::new();
    parts.push(0..writes.len());
    while let Some(part) = parts.pop() {
        if part.is_empty() {
            continue;
        }
        let rejected = loop {
            let started = std::time::Instant::now();
            match store.write_keys(&writes[part.clone()]).await {
                Ok(applied) => {
                    metrics::histogram!(WRITEBACK_BATCH_ROWS_METRIC).record(part.len() as f64);
                    metrics::histogram!(WRITEBACK_COMMIT_METRIC)
                        .record(started.elapsed().as_secs_f64());
                    for (slot, ok) in results[part.clone()].iter_mut().zip(applied) {
                        *slot = Some(Ok(ok));
                    }
                    break None;
                }
                Err(e) if e.is_transient() => {
                    tracing::warn!(error = %e, rows = part.len(), "Write-back failed; retrying.");
                    tokio::time::sleep(config.retry_delay).await;
                }
                Err(e) => break Some(e),
            }
        };
        let Some(e) = rejected else { continue };
        if part.len() == 1 {
            let message = rejection(&writes[part.start], &e);
            tracing::error!(error = %message, "Write-back rejected a result.");
            results[part.start] = Some(Err(Error::Rejected(message)));
        } else {
            tracing::warn!(
                error = %redacted(&e.to_string(), &writes[part.clone()]),
                rows = part.len(),
                "Write-back rejected a batch; writing its halves apart."
            );
            let middle = part.start + part.len() / 2;
            // Popped first: the results are written in order.
            parts.push(middle..part.end);
            parts.push(part.start..middle);
        }
    }
    results
        .into_iter()
        .map(|r| r.expect("every part written or rejected"))
        .collect()
}

/// What the database refused in one result, without its secrets: a link is a credential, so no
/// link's text ever appears in the message.
fn rejection(write: &KeyWrite, e: &Error) -> String {
    let (sub, server) = write.key();
    let what = match write {
        KeyWrite::Created { .. } => "created key",
        KeyWrite::Failed { .. } => "failure",
        KeyWrite::Deleted { .. } => "deletion",
        KeyWrite::ConfigSynced { .. } => "synced config",
        KeyWrite::Lost { .. } => "lost key",
    };
    let reason = match e {
        Error::Db(sqlx::Error::Database(db)) => {
            let code = db.code().unwrap_or_default().into_owned();
            let nul_in: Vec<&str> = fields(write)
                .into_iter()
                .filter(|(_, value)| value.contains('\0'))
                .map(|(name, _)| name)
                .collect();
            let detail = if code == "22021" && !nul_in.is_empty() {
                format!("the {} contains a NUL byte", nul_in.join(" and the "))
            } else if db.constraint() == Some("keys_server_key_id_unique") {
                "its server key id is held by another live key of the server, written by a newer \
                 attempt (constraint keys_server_key_id_unique)"
                    .to_owned()
            } else {
                match db.constraint() {
                    Some(constraint) => format!("{} (constraint {constraint})", db.message()),
                    None => db.message().to_owned(),
                }
            };
            format!("SQLSTATE {code}: {detail}")
        }
        other => other.to_string(),
    };
    redacted(
        &format!("Postgres rejected the {what} of subscription {sub} on server {server}: {reason}"),
        std::slice::from_ref(write),
    )
}

/// The text fields of a result, by name.
fn fields(write: &KeyWrite) -> Vec<(&'static str, &str)> {
    match write {
        KeyWrite::Created {
            server_key_id,
            link,
            ..
        } => vec![("server key id", server_key_id), ("link", link)],
        KeyWrite::Failed { error, .. } => vec![("error", error)],
        KeyWrite::ConfigSynced { link, .. } => vec![("link", link)],
        KeyWrite::Deleted { .. } | KeyWrite::Lost { .. } => vec![],
    }
}

/// A message with the text of every link of `writes` it might quote taken out.
fn redacted(message: &str, writes: &[KeyWrite]) -> String {
    let mut message = message.to_owned();
    for write in writes {
        if let KeyWrite::Created { link, .. } | KeyWrite::ConfigSynced { link, .. } = write
            && !link.is_empty()
            && message.contains(link.as_str())
        {
            message = message.replace(link.as_str(), "(link)");
        }
    }
    message
}

#[cfg(test)]
mod tests {
    use keyfleet_core::{ServerId, SubscriptionId};

    use super::*;

    #[test]
    fn a_rejection_never_quotes_a_link() {
        let link = "vless://0f6c@secret.example:443?pbk=abc";
        let write = KeyWrite::Created {
            subscription: SubscriptionId::parse("alice").unwrap(),
            server: ServerId(3),
            fence: 1,
            server_key_id: "0f6c".into(),
            link: link.into(),
        };
        let e = Error::Db(sqlx::Error::Protocol(format!("bad value {link:?}")));
        let message = rejection(&write, &e);
        assert!(!message.contains(link), "{message}");
        assert!(message.contains("(link)"), "{message}");
        assert!(
            message.contains("alice") && message.contains("server 3"),
            "{message}"
        );
        assert_eq!(redacted("no link here", &[write]), "no link here");
    }
}
