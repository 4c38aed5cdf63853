//! Reconcile: one list of a server's keys, diffed against Postgres. Only the differences become
//! jobs; users keyfleet did not create (not named `kf-…`) are never touched.

use std::collections::{BTreeMap, HashSet};

use keyfleet_core::SubscriptionId;
use keyfleet_store::StoredKey;
use keyfleet_vpn::RemoteKey;

/// What a server needs to match Postgres.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Wanted keys missing on the server: create them.
    pub create: Vec<SubscriptionId>,
    /// Of those, keys Postgres believed active (lost in a node wipe): record that first.
    pub lost: Vec<SubscriptionId>,
    /// Wanted keys that exist on the server under an id Postgres does not have: adopt that key.
    pub adopt: Vec<(SubscriptionId, String)>,
    /// keyfleet-owned keys on the server that Postgres does not want (or extra duplicates).
    pub delete: Vec<(SubscriptionId, String)>,
    /// Keys on the server keyfleet did not create, left alone.
    pub foreign: usize,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.create.is_empty() && self.adopt.is_empty() && self.delete.is_empty()
    }

    /// Narrows this plan (from Postgres read before the server's list) to what a plan from a
    /// second read, after the list, agrees with: a key is created, adopted or deleted only if both
    /// reads say so. A purchase whose key appeared on the server between the reads is wanted in
    /// the second, so it is never deleted; a subscription deprovisioned between them is not
    /// recreated.
    pub fn keep_only_what(&mut self, later: &Plan) {
        self.create.retain(|sub| later.create.contains(sub));
        self.adopt.retain(|a| later.adopt.contains(a));
        self.delete.retain(|d| later.delete.contains(d));
        self.lost.retain(|sub| self.create.contains(sub));
    }
}

pub fn diff(stored: &[StoredKey], remote: &[RemoteKey]) -> Plan {
    let mut plan = Plan::default();
    let mut on_server: BTreeMap<&SubscriptionId, Vec<&str>> = BTreeMap::new();
    for key in remote {
        match &key.owner {
            Some(owner) => on_server.entry(owner).or_default().push(&key.server_key_id),
            None => plan.foreign += 1,
        }
    }
    let mut wanted: HashSet<&SubscriptionId> = HashSet::new();
    for key in stored.iter().filter(|k| k.wanted()) {
        wanted.insert(&key.subscription);
        match on_server.get(&key.subscription) {
            None => match key.state.as_str() {
                // A key that failed for good (401, bad certificate) waits for an operator; one that
                // failed for a transient reason (the server was down) is retried now it answers.
                "failed" if !key.failed_transiently => {}
                "active" => {
                    plan.lost.push(key.subscription.clone());
                    plan.create.push(key.subscription.clone());
                }
                _ => plan.create.push(key.subscription.clone()),
            },
            Some(ids) => {
                let keep = match &key.server_key_id {
                    Some(known) if ids.contains(&known.as_str()) => known.as_str(),
                    _ => {
                        let first = ids[0];
                        plan.adopt
                            .push((key.subscription.clone(), first.to_owned()));
                        first
                    }
                };
                for extra in ids.iter().filter(|id| **id != keep) {
                    plan.delete
                        .push((key.subscription.clone(), (*extra).to_owned()));
                }
            }
        }
    }
    for (owner, ids) in &on_server {
        if !wanted.contains(owner) {
            plan.delete
                .extend(ids.iter().map(|id| ((*owner).clone(), (*id).to_owned())));
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(s: &str) -> SubscriptionId {
        SubscriptionId::parse(s).unwrap()
    }

    fn stored(s: &str, state: &str, id: Option<&str>) -> StoredKey {
        StoredKey {
            subscription: sub(s),
            state: state.into(),
            server_key_id: id.map(Into::into),
            failed_transiently: false,
        }
    }

    fn remote(id: &str, owner: Option<&str>) -> RemoteKey {
        RemoteKey {
            server_key_id: id.into(),
            name: owner.unwrap_or("alice@example.com").into(),
            owner: owner.map(sub),
        }
    }

    #[test]
    fn an_in_sync_server_needs_nothing() {
        let plan = diff(
            &[
                stored("a", "active", Some("1")),
                stored("b", "active", Some("2")),
            ],
            &[
                remote("1", Some("a")),
                remote("2", Some("b")),
                remote("3", None),
            ],
        );
        assert!(plan.is_empty(), "{plan:?}");
        assert_eq!(plan.foreign, 1);
    }

    #[test]
    fn a_wiped_node_gets_exactly_the_lost_keys_back() {
        let plan = diff(
            &[
                stored("a", "active", Some("1")),
                stored("b", "active", Some("2")),
            ],
            &[remote("1", Some("a"))],
        );
        assert_eq!(plan.create, vec![sub("b")]);
        assert_eq!(plan.lost, vec![sub("b")]);
        assert!(plan.delete.is_empty() && plan.adopt.is_empty());
    }

    #[test]
    fn orphans_and_duplicates_are_deleted_but_foreign_users_never() {
        let plan = diff(
            &[
                stored("a", "active", Some("1")),
                stored("gone", "deleted", None),
            ],
            &[
                remote("1", Some("a")),
                remote("9", Some("a")),
                remote("5", Some("gone")),
                remote("6", Some("never-heard-of")),
                remote("7", None),
            ],
        );
        assert_eq!(
            plan.delete,
            vec![
                (sub("a"), "9".to_string()),
                (sub("gone"), "5".to_string()),
                (sub("never-heard-of"), "6".to_string()),
            ]
        );
        assert_eq!(plan.foreign, 1);
        assert!(plan.create.is_empty());
    }

    #[test]
    fn a_key_that_failed_while_its_server_was_down_is_retried() {
        let mut down = stored("d", "failed", None);
        down.failed_transiently = true;
        let plan = diff(&[down, stored("f", "failed", None)], &[]);
        assert_eq!(
            plan.create,
            vec![sub("d")],
            "only the transient failure: {plan:?}"
        );
    }

    #[test]
    fn only_what_both_reads_agree_on_is_done() {
        // Before the list: no row for "new" (its purchase had not been recorded yet); the list
        // shows its key; after the list Postgres wants it.
        let before = diff(
            &[stored("gone", "deleting", None)],
            &[remote("1", Some("new")), remote("2", Some("gone"))],
        );
        let after = diff(
            &[
                stored("gone", "deleting", None),
                stored("new", "pending", None),
            ],
            &[remote("1", Some("new")), remote("2", Some("gone"))],
        );
        let mut plan = before.clone();
        plan.keep_only_what(&after);
        assert_eq!(
            plan.delete,
            vec![(sub("gone"), "2".to_string())],
            "{plan:?}"
        );
        // Created between the reads: active in the second read, missing from the list.
        let before = diff(&[stored("a", "pending", None)], &[]);
        let after = diff(&[stored("a", "deleting", None)], &[]);
        let mut plan = before.clone();
        plan.keep_only_what(&after);
        assert!(
            plan.create.is_empty(),
            "deprovisioned between the reads: {plan:?}"
        );
    }

    #[test]
    fn a_key_created_behind_a_lost_response_is_adopted_not_recreated() {
        let plan = diff(
            &[stored("a", "pending", None), stored("f", "failed", None)],
            &[remote("4", Some("a"))],
        );
        assert_eq!(plan.adopt, vec![(sub("a"), "4".to_string())]);
        assert!(
            plan.create.is_empty(),
            "a failed key is not retried blindly: {plan:?}"
        );
    }
}
