//! Waiting for a subscription's keys without polling: one `LISTEN keyfleet_keys` connection per
//! API process (a trigger notifies, at commit, the subscriptions a statement changed), fanned out
//! to the requests waiting on each subscription. A waiter re-reads Postgres only when its
//! subscription changed, so many waiting purchases cost one connection and one read per change.

use std::{collections::HashMap, future::Future, sync::Arc, time::Duration};

use keyfleet_core::SubscriptionId;
use keyfleet_store::Store;
use parking_lot::Mutex;
use tokio::{sync::watch, time::Instant};

const CHANNEL: &str = "keyfleet_keys";

#[derive(Clone, Default)]
pub struct KeyWatch {
    waiters: Arc<Mutex<HashMap<String, Entry>>>,
}

struct Entry {
    changed: watch::Sender<u64>,
    waiting: usize,
}

/// Interest in one subscription's changes; registered before the first read, so no change
/// committed after that read is missed.
pub struct Interest {
    watch: KeyWatch,
    subscription: String,
    changed: watch::Receiver<u64>,
}

impl Interest {
    async fn changed(&mut self) {
        // An error means the sender is gone, which cannot happen while we are registered.
        let _ = self.changed.changed().await;
    }
}

impl Drop for Interest {
    fn drop(&mut self) {
        let mut waiters = self.watch.waiters.lock();
        if let Some(entry) = waiters.get_mut(&self.subscription) {
            entry.waiting -= 1;
            if entry.waiting == 0 {
                waiters.remove(&self.subscription);
            }
        }
    }
}

impl KeyWatch {
    /// Starts listening; the returned future resolves once the first `LISTEN` is in place (so
    /// the API does not answer before waits can be woken).
    pub async fn start(store: Store) -> anyhow::Result<Self> {
        let watch = Self::default();
        let mut listener = sqlx::postgres::PgListener::connect_with(store.pool()).await?;
        listener.listen(CHANNEL).await?;
        let this = watch.clone();
        tokio::spawn(async move { this.relay(listener).await });
        Ok(watch)
    }

    async fn relay(self, mut listener: sqlx::postgres::PgListener) {
        loop {
            match listener.try_recv().await {
                Ok(Some(note)) => self.bump(note.payload()),
                // The connection was lost and is re-established by the next call: notifications
                // in between are lost, so every waiter re-reads.
                Ok(None) => {
                    tracing::warn!("the LISTEN connection to Postgres was lost; reconnecting");
                    self.bump_all();
                }
                Err(e) => {
                    tracing::warn!("LISTEN {CHANNEL}: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    self.bump_all();
                }
            }
        }
    }

    fn bump(&self, subscription: &str) {
        if let Some(entry) = self.waiters.lock().get(subscription) {
            entry.changed.send_modify(|n| *n += 1);
        }
    }

    fn bump_all(&self) {
        for entry in self.waiters.lock().values() {
            entry.changed.send_modify(|n| *n += 1);
        }
    }

    pub fn interest(&self, subscription: &SubscriptionId) -> Interest {
        let mut waiters = self.waiters.lock();
        let entry = waiters
            .entry(subscription.as_str().to_owned())
            .or_insert_with(|| Entry {
                changed: watch::channel(0).0,
                waiting: 0,
            });
        entry.waiting += 1;
        Interest {
            watch: self.clone(),
            subscription: subscription.as_str().to_owned(),
            changed: entry.changed.subscribe(),
        }
    }

    /// Reads with `read` until `done` holds of the result or `wait` has passed; returns the last
    /// read. Reads again only when the subscription's keys changed.
    pub async fn wait_until<T, F, Fut>(
        &self,
        subscription: &SubscriptionId,
        wait: Duration,
        mut read: F,
        done: impl Fn(&T) -> bool,
    ) -> anyhow::Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = anyhow::Result<T>>,
    {
        let deadline = Instant::now() + wait;
        let mut interest = self.interest(subscription);
        loop {
            let value = read().await?;
            if done(&value) || Instant::now() >= deadline {
                return Ok(value);
            }
            tokio::select! {
                _ = interest.changed() => {}
                _ = tokio::time::sleep_until(deadline) => return read().await,
            }
        }
    }

    #[cfg(test)]
    fn registered(&self) -> usize {
        self.waiters.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn interests_are_counted_and_dropped() {
        let watch = KeyWatch::default();
        let sub = SubscriptionId::parse("s1").unwrap();
        let a = watch.interest(&sub);
        let mut b = watch.interest(&sub);
        assert_eq!(watch.registered(), 1);
        drop(a);
        assert_eq!(watch.registered(), 1);
        watch.bump("s1");
        tokio::time::timeout(Duration::from_secs(5), b.changed())
            .await
            .expect("a bump wakes the waiter");
        drop(b);
        assert_eq!(watch.registered(), 0);
    }
}
