//! Whether a run that kube-runtime starts still owes the object anything.
//!
//! While a run of an object is in progress, kube-runtime holds back the object's new triggers and
//! starts one more run as soon as that one ends. Here a run can wait a long time for a worker
//! (every worker busy), and it reads the object from the cache only once it has one: a trigger
//! that came during the wait was already answered by that read, since a watch puts its change in
//! the cache before it passes the event on. Without a check, a saturated controller runs every
//! such object twice in a row.
//!
//! [`Triggers`] numbers each trigger and each read from one counter. A run that starts when the
//! object's latest trigger is older than its latest read, and with no requeue due, is let go.

use kube::Resource;
use kube::runtime::reflector::ObjectRef;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Per object: the numbers of its latest trigger and latest read, and when its requeue is due.
pub(super) struct Triggers<K: Resource>
where
    K::DynamicType: Hash + Eq,
{
    inner: Mutex<Inner<K>>,
}

struct Inner<K: Resource>
where
    K::DynamicType: Hash + Eq,
{
    /// The last number handed out.
    counter: u64,
    /// Only objects read at least once: a trigger for any other object owes a run anyway.
    marks: HashMap<ObjectRef<K>, Marks>,
}

#[derive(Debug, Clone, Copy)]
struct Marks {
    triggered: u64,
    read: u64,
    /// When the requeue the last run asked for (or its error's backoff) is due.
    due: Option<Instant>,
}

/// What a run that is about to start owes its object.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Owed {
    /// A reconcile: the object was never read, changed since, or its requeue is due.
    Run,
    /// Nothing: every trigger came before the last read. The requeue still to come (kube-runtime
    /// drops a requeue asked for while the object had a run pending) is handed back.
    Nothing { requeue: Option<Duration> },
}

impl<K: Resource> Default for Triggers<K>
where
    K::DynamicType: Hash + Eq,
{
    fn default() -> Self {
        Self {
            inner: Mutex::new(Inner {
                counter: 0,
                marks: HashMap::new(),
            }),
        }
    }
}

impl<K: Resource> Triggers<K>
where
    K::DynamicType: Hash + Eq + Clone,
{
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner<K>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A trigger for `key` is on its way to kube-runtime.
    pub fn triggered(&self, key: &ObjectRef<K>) {
        let mut inner = self.lock();
        inner.counter += 1;
        let n = inner.counter;
        if let Some(marks) = inner.marks.get_mut(key) {
            marks.triggered = n;
        }
    }

    /// `key` was read from the cache for a run.
    pub fn read(&self, key: &ObjectRef<K>) {
        let mut inner = self.lock();
        inner.counter += 1;
        let n = inner.counter;
        match inner.marks.get_mut(key) {
            Some(marks) => marks.read = n,
            None => {
                let mut key = key.clone();
                key.extra = Default::default();
                inner.marks.insert(
                    key,
                    Marks {
                        triggered: 0,
                        read: n,
                        due: None,
                    },
                );
            }
        }
    }

    /// The run of `key` that read it asked to run again `after` this long (or not at all).
    pub fn requeued(&self, key: &ObjectRef<K>, after: Option<Duration>, now: Instant) {
        if let Some(marks) = self.lock().marks.get_mut(key) {
            marks.due = after.and_then(|a| now.checked_add(a));
        }
    }

    /// What a run of `key` starting `now` owes it.
    pub fn owed(&self, key: &ObjectRef<K>, now: Instant) -> Owed {
        let inner = self.lock();
        let Some(marks) = inner.marks.get(key) else {
            return Owed::Run;
        };
        if marks.triggered > marks.read || marks.due.is_some_and(|due| due <= now) {
            return Owed::Run;
        }
        Owed::Nothing {
            requeue: marks.due.map(|due| due - now),
        }
    }

    /// `key` was deleted.
    pub fn forget(&self, key: &ObjectRef<K>) {
        self.lock().marks.remove(key);
    }

    /// How many objects are remembered.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().marks.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;

    fn key(name: &str) -> ObjectRef<ConfigMap> {
        ObjectRef::new(name).within("ns")
    }

    #[test]
    fn triggers_an_object_never_read_is_owed_a_run() {
        let t = Triggers::<ConfigMap>::default();
        t.triggered(&key("a"));
        assert_eq!(t.owed(&key("a"), Instant::now()), Owed::Run);
        // A trigger alone remembers nothing: only reads do.
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn triggers_a_trigger_before_the_read_is_answered_by_it() {
        let t = Triggers::<ConfigMap>::default();
        let now = Instant::now();
        t.read(&key("a"));
        t.requeued(&key("a"), None, now);
        // A change while the object waited for its worker, then its run read the cache.
        t.triggered(&key("a"));
        t.read(&key("a"));
        t.requeued(&key("a"), None, now);
        assert_eq!(t.owed(&key("a"), now), Owed::Nothing { requeue: None });
        // A change after the read is owed a run; another object's is not this one's.
        t.triggered(&key("b"));
        assert_eq!(t.owed(&key("a"), now), Owed::Nothing { requeue: None });
        t.triggered(&key("a"));
        assert_eq!(t.owed(&key("a"), now), Owed::Run);
    }

    #[test]
    fn triggers_a_requeue_is_run_when_due_and_handed_back_before() {
        let t = Triggers::<ConfigMap>::default();
        let now = Instant::now();
        t.read(&key("a"));
        t.requeued(&key("a"), Some(Duration::from_secs(30)), now);
        assert_eq!(
            t.owed(&key("a"), now + Duration::from_secs(10)),
            Owed::Nothing {
                requeue: Some(Duration::from_secs(20))
            }
        );
        assert_eq!(t.owed(&key("a"), now + Duration::from_secs(30)), Owed::Run);
        // A run that asks for nothing more clears the requeue.
        t.read(&key("a"));
        t.requeued(&key("a"), None, now + Duration::from_secs(30));
        assert_eq!(
            t.owed(&key("a"), now + Duration::from_secs(60)),
            Owed::Nothing { requeue: None }
        );
    }

    #[test]
    fn triggers_keys_match_whatever_extra_they_carry_and_go_with_the_object() {
        let t = Triggers::<ConfigMap>::default();
        let mut with_uid = key("a");
        with_uid.extra.uid = Some("u1".into());
        with_uid.extra.resource_version = Some("7".into());
        t.read(&with_uid);
        t.requeued(&with_uid, None, Instant::now());
        // A mapper's key for the same object carries no uid.
        t.triggered(&key("a"));
        assert_eq!(t.owed(&with_uid, Instant::now()), Owed::Run);
        t.forget(&key("a"));
        assert_eq!(t.len(), 0);
    }
}
