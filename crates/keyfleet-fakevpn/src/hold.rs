//! Holds: park requests to one endpoint right before they act, for deterministic race tests.

use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::watch;

use crate::{Endpoint, net::wait_closing};

/// Requests to `endpoint` that arrive while this is active wait, counted and in flight, right
/// before their operation (before the list snapshot, the delete, the create) until
/// [`Hold::release`] or the `Hold` is dropped. Made by [`crate::FakeServer::hold`].
///
/// ```ignore
/// let hold = fake.hold(Endpoint::ListUsers);
/// let reconcile = tokio::spawn(async move { client.list_keys().await });
/// hold.wait_arrived(1).await; // the list request is parked before its snapshot
/// fake.wipe();                // ... change the state under it ...
/// hold.release();             // the list now sees the changed state
/// ```
#[must_use = "dropping a Hold releases it at once"]
pub struct Hold {
    state: Arc<HoldState>,
}

pub(crate) struct HoldState {
    endpoint: Endpoint,
    arrived: watch::Sender<u64>,
    released: watch::Sender<bool>,
}

impl HoldState {
    fn is_released(&self) -> bool {
        *self.released.borrow()
    }
}

impl Hold {
    pub fn endpoint(&self) -> Endpoint {
        self.state.endpoint
    }

    /// How many requests have reached the hold since it was made (held now, or let go by a
    /// release).
    pub fn arrived(&self) -> u64 {
        *self.state.arrived.borrow()
    }

    /// Waits until at least `n` requests have reached the hold.
    pub async fn wait_arrived(&self, n: u64) {
        let mut rx = self.state.arrived.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = rx.wait_for(|arrived| *arrived >= n).await;
    }

    /// Lets every held request go on; later requests are not held. Idempotent.
    pub fn release(&self) {
        self.state.released.send_replace(true);
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.release();
    }
}

impl std::fmt::Debug for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hold")
            .field("endpoint", &self.state.endpoint)
            .field("arrived", &self.arrived())
            .field("released", &self.state.is_released())
            .finish()
    }
}

/// The active holds of one server.
#[derive(Default)]
pub(crate) struct Holds {
    active: Mutex<Vec<Arc<HoldState>>>,
}

impl Holds {
    pub fn add(&self, endpoint: Endpoint) -> Hold {
        let state = Arc::new(HoldState {
            endpoint,
            arrived: watch::Sender::new(0),
            released: watch::Sender::new(false),
        });
        let mut active = self.active.lock();
        active.retain(|h| !h.is_released());
        active.push(Arc::clone(&state));
        Hold { state }
    }

    /// Counts the request at every active hold on `endpoint`, then waits until all of them are
    /// released or the server shuts down.
    pub async fn pass(&self, endpoint: Endpoint, closing: &watch::Sender<bool>) {
        let holding: Vec<Arc<HoldState>> = {
            let mut active = self.active.lock();
            active.retain(|h| !h.is_released());
            active
                .iter()
                .filter(|h| h.endpoint == endpoint)
                .cloned()
                .collect()
        };
        if holding.is_empty() {
            return;
        }
        for hold in &holding {
            hold.arrived.send_modify(|n| *n += 1);
        }
        let mut closing = closing.subscribe();
        for hold in holding {
            let mut released = hold.released.subscribe();
            tokio::select! {
                _ = released.wait_for(|r| *r) => {}
                _ = wait_closing(&mut closing) => return,
            }
        }
    }
}
