use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use tokio::sync::watch;

use crate::Queue;

/// A counter bumped whenever Redis says the ring of claimable servers stopped being empty (an
/// enqueue, a freed slot, a promoted retry), or this process handed a claim over
/// ([`WakeSignal::notify_local`]). Idle claimers wait for it to change instead of polling, so new
/// work is picked up within milliseconds.
#[derive(Clone)]
pub struct WakeSignal {
    rx: watch::Receiver<u64>,
    tx: Arc<watch::Sender<u64>>,
}

impl WakeSignal {
    /// Subscribes to the queue's wake channel in a background task that reconnects on failure.
    /// The task ends when every `WakeSignal` clone is dropped.
    pub fn spawn(queue: &Queue) -> Self {
        let (tx, rx) = watch::channel(0u64);
        let tx = Arc::new(tx);
        let local = tx.clone();
        let client = queue.client().clone();
        let channel = queue.wake_channel();
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(100);
            loop {
                let subscribed = async {
                    let mut pubsub = client.get_async_pubsub().await?;
                    pubsub.subscribe(&channel).await?;
                    Ok::<_, redis::RedisError>(pubsub)
                };
                let listen = async {
                    match subscribed.await {
                        Ok(pubsub) => {
                            delay = Duration::from_millis(100);
                            // Whatever was published while we were not listening: look now.
                            tx.send_modify(|g| *g += 1);
                            let mut messages = pubsub.into_on_message();
                            while messages.next().await.is_some() {
                                tx.send_modify(|g| *g += 1);
                            }
                            tracing::warn!("Lost the Redis wake subscription; reconnecting.");
                        }
                        Err(error) => {
                            tracing::warn!(%error, "Cannot subscribe to Redis wake-ups; retrying.")
                        }
                    }
                };
                tokio::select! {
                    () = tx.closed() => return,
                    () = listen => {}
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        });
        Self { rx, tx: local }
    }

    /// Wakes this process's idle claimers without a round trip through Redis.
    pub fn notify_local(&self) {
        self.tx.send_modify(|g| *g += 1);
    }

    /// The current generation; pass it to [`WakeSignal::changed_since`] after a claim found nothing.
    pub fn generation(&self) -> u64 {
        *self.rx.borrow()
    }

    /// Resolves once the generation differs from `seen` (at once if it already does).
    pub async fn changed_since(mut self, seen: u64) {
        let _ = self.rx.wait_for(|g| *g != seen).await;
    }
}
