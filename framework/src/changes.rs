//! Which changes of a watched kind wake a reconcile.
//!
//! By default every event of a child or related kind does. A controller that reacts to only part of
//! an object (a Node's labels and taints, not its heartbeat; a Pod's phase, not each status tweak)
//! declares a key with [`Controller::reconcile_on_change`](crate::Controller::reconcile_on_change):
//! an update then wakes reconciles only when the key differs from the key of the last event about
//! that object; creations and deletions always wake them. A controller that knows more, say that
//! the creation of a child it made itself tells it nothing, chooses which transitions of the key
//! wake with [`Controller::reconcile_on_transition`](crate::Controller::reconcile_on_transition).
//! Caches still receive every event.

use kube::Resource;
use kube::runtime::watcher;
use std::collections::HashMap;
use std::sync::Arc;

/// Makes, for one watch stream of kind `O`, the filter that tells which of its events wake.
pub(crate) type WakeFn<O> =
    Arc<dyn Fn() -> Box<dyn FnMut(&watcher::Event<O>) -> bool + Send> + Send + Sync>;

/// The filter of events whose key makes `wakes(before, after)` true: `before` is the key of the last
/// event about the same object (`None` at first sight), `after` the key now (`None` once deleted).
pub(crate) fn wake_fn<O, H>(
    key: impl Fn(&O) -> H + Send + Sync + 'static,
    wakes: impl Fn(Option<&H>, Option<&H>) -> bool + Send + Sync + 'static,
) -> WakeFn<O>
where
    O: Resource + 'static,
    H: Send + 'static,
{
    let key = Arc::new(key);
    let wakes = Arc::new(wakes);
    Arc::new(move || {
        let key = Arc::clone(&key);
        let wakes = Arc::clone(&wakes);
        let mut last: HashMap<String, H> = HashMap::new();
        Box::new(move |event: &watcher::Event<O>| {
            let uid = |o: &O| o.meta().uid.clone().unwrap_or_default();
            match event {
                watcher::Event::Apply(o) | watcher::Event::InitApply(o) => {
                    let now = key(o);
                    let uid = uid(o);
                    let wake = wakes(last.get(&uid), Some(&now));
                    last.insert(uid, now);
                    wake
                }
                watcher::Event::Delete(o) => {
                    let before = last.remove(&uid(o));
                    wakes(before.as_ref(), None)
                }
                watcher::Event::Init | watcher::Event::InitDone => true,
            }
        })
    })
}

/// The rule of [`Controller::reconcile_on_change`](crate::Controller::reconcile_on_change): a
/// creation, a deletion, or a changed key.
pub(crate) fn changed<H: PartialEq>(before: Option<&H>, after: Option<&H>) -> bool {
    before.is_none() || after.is_none() || before != after
}

/// A filter over watch events that lets through what should wake a reconcile: with no rule, every
/// event.
pub(crate) fn waking<O: Resource + Send>(
    rule: Option<WakeFn<O>>,
) -> impl FnMut(&watcher::Event<O>) -> futures::future::Ready<bool> + Send {
    let mut filter = rule.map(|make| make());
    move |event| futures::future::ready(filter.as_mut().is_none_or(|f| f(event)))
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

    async fn woken(key: Option<WakeFn<Node>>, events: Vec<watcher::Event<Node>>) -> usize {
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
        let key = wake_fn(|n: &Node| n.metadata.labels.clone(), changed);
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

    #[tokio::test]
    async fn changes_a_transition_rule_sees_the_key_before_and_after() {
        // Wake when a node is relabelled or goes, not when it first appears.
        let label = |n: &Node| n.metadata.labels.clone().unwrap_or_default()["pool"].clone();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        let rule = wake_fn(
            label,
            move |before: Option<&String>, after: Option<&String>| {
                log.lock().unwrap().push((before.cloned(), after.cloned()));
                before.is_some() && before != after
            },
        );
        let events = vec![
            watcher::Event::Apply(node("a", "x", 1)),  // first sight: no
            watcher::Event::Apply(node("a", "x", 2)),  // same key: no
            watcher::Event::Apply(node("a", "y", 3)),  // relabelled: yes
            watcher::Event::Delete(node("a", "y", 3)), // gone: yes
            watcher::Event::Apply(node("a", "y", 4)),  // back, first sight again: no
        ];
        assert_eq!(woken(Some(rule), events).await, 2);
        let some = |s: &str| Some(s.to_owned());
        assert_eq!(
            *seen.lock().unwrap(),
            vec![
                (None, some("x")),
                (some("x"), some("x")),
                (some("x"), some("y")),
                (some("y"), None),
                (None, some("y")),
            ]
        );
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
