//! What a controller keeps of the objects it caches.
//!
//! Every watched object is held in memory for as long as the operator runs, so what a reconciler
//! never reads is worth dropping before it reaches the cache. The framework always drops
//! `metadata.managedFields` (server-side apply bookkeeping, often the largest part of an object);
//! [`Controller::trim_cached`](crate::Controller::trim_cached) adds per-kind trimming, such as a
//! Node's `status` for an operator that only reads labels and taints.

use kube::Resource;
use kube::runtime::{WatchStreamExt, watcher};
use std::sync::Arc;

/// A trimming function for objects of kind `O`.
pub(crate) type TrimFn<O> = Arc<dyn Fn(&mut O) + Send + Sync>;

/// A watch whose objects arrive trimmed: without managed fields, then through `trim` if given.
pub(crate) fn trimmed<O, S>(
    stream: S,
    trim: Option<TrimFn<O>>,
) -> impl futures::Stream<Item = Result<watcher::Event<O>, watcher::Error>> + Send
where
    O: Resource + Send + 'static,
    S: futures::Stream<Item = Result<watcher::Event<O>, watcher::Error>> + Send,
{
    stream.modify(move |o: &mut O| {
        o.meta_mut().managed_fields = None;
        if let Some(trim) = &trim {
            trim(o);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use k8s_openapi::api::core::v1::{Node, NodeStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;

    fn node() -> Node {
        let mut n = Node::default();
        n.metadata.name = Some("n1".into());
        n.metadata.managed_fields = Some(vec![ManagedFieldsEntry::default()]);
        n.status = Some(NodeStatus::default());
        n
    }

    #[tokio::test]
    async fn trim_drops_managed_fields_and_applies_the_declared_trim() {
        let trim: TrimFn<Node> = Arc::new(|n: &mut Node| n.status = None);
        let events = futures::stream::iter([Ok(watcher::Event::Apply(node()))]);
        let got: Vec<_> = trimmed(events, Some(trim)).collect().await;
        let Some(Ok(watcher::Event::Apply(n))) = got.first() else {
            panic!("{got:?}");
        };
        assert_eq!(n.metadata.managed_fields, None);
        assert_eq!(n.status, None);
        assert_eq!(n.metadata.name.as_deref(), Some("n1"));
    }

    #[tokio::test]
    async fn trim_without_a_declared_trim_keeps_everything_else() {
        let events = futures::stream::iter([Ok(watcher::Event::Apply(node()))]);
        let got: Vec<_> = trimmed(events, None::<TrimFn<Node>>).collect().await;
        let Some(Ok(watcher::Event::Apply(n))) = got.first() else {
            panic!("{got:?}");
        };
        assert_eq!(n.metadata.managed_fields, None);
        assert!(n.status.is_some());
    }
}
