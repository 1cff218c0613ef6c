//! Deletions that a re-list hides. When a watch cannot resume (its resource version is gone, the
//! API server restarted) the watcher lists again; an object deleted meanwhile is simply missing from
//! the new list, and no Delete event ever comes for it. A primary's per-object state (triggers,
//! status writes, applied children) and the reconciler's `deleted` hook would wait for ever, and
//! the owner of a vanished child, or the objects a vanished related object maps to, would not wake.
//! [`with_hidden_deletions`] puts the missing Delete events into the stream.

use futures::{Stream, StreamExt};
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use std::collections::HashSet;
use std::hash::Hash;
use std::sync::Arc;

/// `events` (after the reflector that fills `store`), with a Delete event for each object a
/// re-list shows gone, just before the list's `InitDone`. The store already left them out.
pub(super) fn with_hidden_deletions<K, E>(
    events: impl Stream<Item = Result<watcher::Event<K>, E>>,
    store: Store<K>,
) -> impl Stream<Item = Result<watcher::Event<K>, E>>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + Hash + Clone,
{
    let mut relist = Relist::new(store);
    events.flat_map(move |item| {
        let gone = match &item {
            Ok(event) => relist.observe(event),
            Err(_) => Vec::new(),
        };
        futures::stream::iter(
            gone.into_iter()
                .map(|obj| Ok(watcher::Event::Delete(K::clone(&obj))))
                .chain(std::iter::once(item)),
        )
    })
}

/// Compares what the cache held before a (re-)list with what the list brought.
struct Relist<K: Resource + 'static>
where
    K::DynamicType: Eq + Hash + Clone,
{
    /// The primary cache (replaced by the reflector when the list is done).
    store: Store<K>,
    /// The cache's objects when the list began; `None` outside a list.
    before: Option<Vec<Arc<K>>>,
    /// The objects the list brought so far, by UID.
    listed: HashSet<String>,
}

impl<K> Relist<K>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + Hash + Clone,
{
    fn new(store: Store<K>) -> Self {
        Self {
            store,
            before: None,
            listed: HashSet::new(),
        }
    }

    /// Takes in the next event, after the reflector applied it to the store; returns the objects
    /// a finished list showed to be gone.
    fn observe(&mut self, event: &watcher::Event<K>) -> Vec<Arc<K>> {
        match event {
            // The store still holds the old objects: it is replaced only when the list is done.
            // An empty cache (the first list) can lose nothing: nothing is tracked then.
            watcher::Event::Init => {
                let before = self.store.state();
                self.before = (!before.is_empty()).then_some(before);
                self.listed.clear();
                Vec::new()
            }
            watcher::Event::InitApply(obj) => {
                if self.before.is_some() {
                    self.listed.insert(key(obj));
                }
                Vec::new()
            }
            watcher::Event::InitDone => {
                let before = self.before.take().unwrap_or_default();
                let gone = before
                    .into_iter()
                    .filter(|obj| !self.listed.contains(&key(obj.as_ref())))
                    .collect();
                self.listed = HashSet::new();
                gone
            }
            watcher::Event::Apply(_) | watcher::Event::Delete(_) => Vec::new(),
        }
    }
}

/// An object's identity across a re-list: its UID (a deleted and re-created object is another).
fn key<K: Resource>(obj: &K) -> String {
    obj.uid().unwrap_or_else(|| obj.name_any())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::runtime::reflector;

    fn cm(name: &str, uid: &str) -> ConfigMap {
        let mut cm = ConfigMap::default();
        cm.metadata.name = Some(name.into());
        cm.metadata.namespace = Some("ns".into());
        cm.metadata.uid = Some(uid.into());
        cm
    }

    /// Feeds `events` through a store writer and `relist`, as the reflector does; returns the
    /// names of the objects found gone.
    fn feed(
        writer: &mut reflector::store::Writer<ConfigMap>,
        relist: &mut Relist<ConfigMap>,
        events: Vec<watcher::Event<ConfigMap>>,
    ) -> Vec<String> {
        let mut gone = Vec::new();
        for event in events {
            writer.apply_watcher_event(&event);
            gone.extend(relist.observe(&event).iter().map(|o| o.name_any()));
        }
        gone
    }

    #[test]
    fn relist_an_object_missing_from_it_is_found_gone_and_a_recreated_one_too() {
        let (store, mut writer) = reflector::store::<ConfigMap>();
        let mut relist = Relist::new(store);
        use watcher::Event::{Apply, Init, InitApply, InitDone};
        let first = feed(
            &mut writer,
            &mut relist,
            vec![
                Init,
                InitApply(cm("a", "1")),
                InitApply(cm("b", "2")),
                InitDone,
                Apply(cm("c", "3")),
            ],
        );
        assert!(first.is_empty(), "nothing was there before: {first:?}");
        // "a" was deleted while the watch was down; "c" was deleted and created again.
        let second = feed(
            &mut writer,
            &mut relist,
            vec![
                Init,
                InitApply(cm("b", "2")),
                InitApply(cm("c", "4")),
                InitDone,
            ],
        );
        let mut second = second;
        second.sort();
        assert_eq!(second, ["a", "c"]);
        // Watch events between lists find nothing gone.
        assert!(feed(&mut writer, &mut relist, vec![Apply(cm("d", "5"))]).is_empty());
    }

    #[tokio::test]
    async fn relist_the_stream_gets_a_delete_before_the_list_is_done() {
        use watcher::Event::{Delete, Init, InitApply, InitDone};
        let (store, writer) = reflector::store::<ConfigMap>();
        let events = futures::stream::iter(
            [
                Init,
                InitApply(cm("a", "1")),
                InitDone,
                Init,
                InitApply(cm("b", "2")),
                InitDone,
            ]
            .map(Ok::<_, watcher::Error>),
        );
        let out: Vec<String> = with_hidden_deletions(reflector::reflector(writer, events), store)
            .map(|e| match e.unwrap() {
                Init => "init".to_owned(),
                InitApply(o) => format!("list {}", o.name_any()),
                InitDone => "done".to_owned(),
                Delete(o) => format!("delete {}", o.name_any()),
                watcher::Event::Apply(o) => format!("apply {}", o.name_any()),
            })
            .collect()
            .await;
        assert_eq!(
            out,
            [
                "init", "list a", "done", "init", "list b", "delete a", "done"
            ]
        );
    }
}
