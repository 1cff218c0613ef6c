//! What the executor last applied to each child, so that a child whose planned body has not changed,
//! and which nobody changed since, is not applied again.
//!
//! A plan names every child on every reconcile; applying each one each time costs a write per child
//! per reconcile (a set of 50 images reconciled at each of its children's progress updates writes
//! 50 objects each time). The executor remembers, per child, a hash of the body it applied and the
//! version the API server answered with: `metadata.generation` for kinds that have one (it moves
//! when the spec changes, not with status), else `metadata.resourceVersion`. A child is applied
//! again when the body differs, or when the cached child's version differs from the remembered one
//! (someone edited it, so the framework restores what it owns). The memory is per process: after a
//! restart every child is applied once.

use crate::children::{ChildKey, Existing};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;

/// The version of a child as the apply left it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Version {
    Generation(i64),
    ResourceVersion(String),
}

impl Version {
    fn of(generation: Option<i64>, resource_version: Option<&str>) -> Option<Self> {
        match (generation, resource_version) {
            (Some(g), _) => Some(Self::Generation(g)),
            (None, Some(rv)) => Some(Self::ResourceVersion(rv.to_owned())),
            (None, None) => None,
        }
    }
}

/// What the executor last did to a child.
#[derive(Clone, Debug)]
enum Memory {
    /// Applied this body, and the API server answered with this version.
    Applied { body: u64, version: Version },
    /// Deleted it; the caches may still show it for a moment.
    Deleted,
}

/// What one controller last did to each child, by owner UID.
#[derive(Default)]
pub(crate) struct Applied(Mutex<HashMap<String, HashMap<ChildKey, Memory>>>);

/// A hash of a body about to be applied.
pub(crate) fn body_hash(body: &serde_json::Value) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    body.to_string().hash(&mut h);
    h.finish()
}

impl Applied {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, HashMap<ChildKey, Memory>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `current` (the child as cached or read) is what the last apply of body `body` left.
    pub(crate) fn unchanged(&self, owner: &str, current: &Existing, body: u64) -> bool {
        let Some(version) = Version::of(current.generation, current.resource_version.as_deref())
        else {
            return false;
        };
        self.lock()
            .get(owner)
            .and_then(|children| children.get(&current.key))
            .is_some_and(|m| matches!(m, Memory::Applied { body: b, version: v } if *b == body && *v == version))
    }

    /// Remembers that body `body` was applied to `key`, which the API server answered with `obj`.
    pub(crate) fn record(
        &self,
        owner: &str,
        key: &ChildKey,
        body: u64,
        generation: Option<i64>,
        resource_version: Option<&str>,
    ) {
        if let Some(version) = Version::of(generation, resource_version) {
            self.lock()
                .entry(owner.to_owned())
                .or_default()
                .insert(key.clone(), Memory::Applied { body, version });
        }
    }

    /// Remembers that `key` was deleted, so a view that still shows it does not delete it again.
    pub(crate) fn deleted(&self, owner: &str, key: &ChildKey) {
        self.lock()
            .entry(owner.to_owned())
            .or_default()
            .insert(key.clone(), Memory::Deleted);
    }

    /// Whether `key` was deleted and may still show in the caches.
    pub(crate) fn deleting(&self, owner: &str, key: &ChildKey) -> bool {
        self.lock()
            .get(owner)
            .and_then(|children| children.get(key))
            .is_some_and(|m| matches!(m, Memory::Deleted))
    }

    /// Forgets deletions that the view `seen` no longer shows (they are done).
    pub(crate) fn settle(&self, owner: &str, seen: &[Existing]) {
        if let Some(children) = self.lock().get_mut(owner) {
            children.retain(|key, m| {
                !matches!(m, Memory::Deleted) || seen.iter().any(|e| &e.key == key)
            });
        }
    }

    /// Forgets every child of a deleted owner.
    pub(crate) fn forget_owner(&self, owner: &str) {
        self.lock().remove(owner);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> ChildKey {
        ChildKey {
            api_version: "v1".into(),
            kind: "ConfigMap".into(),
            namespace: Some("ns".into()),
            name: "c".into(),
        }
    }

    fn existing(generation: Option<i64>, rv: &str) -> Existing {
        Existing {
            key: key(),
            controller_uid: Some("o".into()),
            deleting: false,
            generation,
            resource_version: Some(rv.into()),
        }
    }

    #[test]
    fn applied_same_body_same_generation_is_unchanged() {
        let a = Applied::default();
        let body = body_hash(&serde_json::json!({"spec": {"size": 1}}));
        assert!(!a.unchanged("o", &existing(Some(1), "10"), body));
        a.record("o", &key(), body, Some(1), Some("10"));
        // Status updates move the resourceVersion, not the generation.
        assert!(a.unchanged("o", &existing(Some(1), "11"), body));
        // Someone edited the spec, or the plan changed: apply again.
        assert!(!a.unchanged("o", &existing(Some(2), "12"), body));
        let other = body_hash(&serde_json::json!({"spec": {"size": 2}}));
        assert!(!a.unchanged("o", &existing(Some(1), "11"), other));
    }

    #[test]
    fn applied_kinds_without_generation_compare_resource_versions() {
        let a = Applied::default();
        let body = body_hash(&serde_json::json!({"data": {"k": "v"}}));
        a.record("o", &key(), body, None, Some("10"));
        assert!(a.unchanged("o", &existing(None, "10"), body));
        assert!(!a.unchanged("o", &existing(None, "11"), body));
    }

    #[test]
    fn applied_deleted_children_are_deleted_once_and_applied_again() {
        let a = Applied::default();
        let body = body_hash(&serde_json::json!({}));
        a.record("o", &key(), body, Some(1), Some("10"));
        a.deleted("o", &key());
        assert!(a.deleting("o", &key()));
        assert!(!a.unchanged("o", &existing(Some(1), "10"), body));
        // Still in the view: still deleting; gone from it: forgotten.
        a.settle("o", &[existing(Some(1), "10")]);
        assert!(a.deleting("o", &key()));
        a.settle("o", &[]);
        assert!(!a.deleting("o", &key()));
        a.record("o", &key(), body, Some(1), Some("10"));
        a.forget_owner("o");
        assert!(!a.unchanged("o", &existing(Some(1), "10"), body));
    }
}
