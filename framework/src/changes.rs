//! Which changes of a watched kind wake a reconcile.
//!
//! By default every event of a child or related kind does. A controller that reacts to only part of
//! an object (a Node's labels and taints, not its heartbeat; a Pod's phase, not each status tweak)
//! declares a key with [`Controller::reconcile_on_change`](crate::Controller::reconcile_on_change):
//! an update then wakes reconciles only when the key differs from the key of the last event about
//! that object. Creations and deletions always wake them, and caches still receive every event.

use kube::Resource;
use kube::runtime::watcher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

/// The key of an object of kind `O`, hashed.
pub(crate) type KeyFn<O> = Arc<dyn Fn(&O) -> u64 + Send + Sync>;

/// Hashes what `key` returns, for [`waking`].
pub(crate) fn key_fn<O: 'static, H: Hash>(
    key: impl Fn(&O) -> H + Send + Sync + 'static,
) -> KeyFn<O> {
    Arc::new(move |o: &O| {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        key(o).hash(&mut h);
        h.finish()
    })
}

/// A filter over watch events that lets through what should wake a reconcile: with no key, every
/// event; with one, creations, deletions and updates that change the key.
pub(crate) fn waking<O: Resource + Send>(
    key: Option<KeyFn<O>>,
) -> impl FnMut(&watcher::Event<O>) -> futures::future::Ready<bool> + Send {
    let mut last: HashMap<String, u64> = HashMap::new();
    move |event| {
        let uid = |o: &O| o.meta().uid.clone().unwrap_or_default();
        let wake = match (&key, event) {
            (None, _) => true,
            (Some(key), watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => {
                let now = key(o);
                last.insert(uid(o), now) != Some(now)
            }
            (Some(_), watcher::Event::Delete(o)) => {
                last.remove(&uid(o));
                true
            }
            (Some(_), _) => true,
        };
        futures::future::ready(wake)
    }
}

/// Marks an object the watch reports deleted as going (`metadata.deletionTimestamp` set, to now if
/// the API server had not set one), so a mapper handed it can tell a deletion from an update.
pub(crate) fn mark_deleted<O: Resource>(event: watcher::Event<O>) -> watcher::Event<O> {
    match event {
        watcher::Event::Delete(mut o) => {
            let meta = o.meta_mut();
            if meta.deletion_timestamp.is_none() {
                meta.deletion_timestamp = Some(
                    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now()),
                );
            }
            watcher::Event::Delete(o)
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use k8s_openapi::api::core::v1::Node;
    use std::collections::BTreeMap;

    fn node(uid: &str, label: &str, heartbeat: i64) -> Node {
        let mut n = Node::default();
        n.metadata.uid = Some(uid.into());
        n.metadata.labels = Some(BTreeMap::from([("pool".to_owned(), label.to_owned())]));
        n.metadata.generation = Some(heartbeat);
        n
    }

    async fn woken(key: Option<KeyFn<Node>>, events: Vec<watcher::Event<Node>>) -> usize {
        futures::stream::iter(events)
            .filter(waking(key))
            .count()
            .await
    }

    #[tokio::test]
    async fn changes_without_a_key_every_event_wakes() {
        let events = vec![
            watcher::Event::Apply(node("a", "x", 1)),
            watcher::Event::Apply(node("a", "x", 2)),
        ];
        assert_eq!(woken(None, events).await, 2);
    }

    #[tokio::test]
    async fn changes_with_a_key_only_key_changes_creations_and_deletions_wake() {
        let key = key_fn(|n: &Node| n.metadata.labels.clone());
        let events = vec![
            watcher::Event::Apply(node("a", "x", 1)), // first sight
            watcher::Event::Apply(node("a", "x", 2)), // heartbeat only
            watcher::Event::Apply(node("b", "x", 1)), // another object
            watcher::Event::Apply(node("a", "y", 3)), // relabelled
            watcher::Event::Delete(node("a", "y", 3)),
            watcher::Event::Apply(node("a", "y", 4)), // recreated with the same uid: first sight again
        ];
        assert_eq!(woken(Some(key), events).await, 5);
    }

    #[test]
    fn changes_a_deleted_object_is_marked_going() {
        let watcher::Event::Delete(n) = mark_deleted(watcher::Event::Delete(node("a", "x", 1)))
        else {
            panic!("not a deletion");
        };
        assert!(n.metadata.deletion_timestamp.is_some());
        let watcher::Event::Apply(n) = mark_deleted(watcher::Event::Apply(node("a", "x", 1)))
        else {
            panic!("not an update");
        };
        assert!(n.metadata.deletion_timestamp.is_none());
    }
}
