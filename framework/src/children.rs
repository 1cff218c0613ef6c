//! Child objects: how a plan names them, how the framework marks them as owned, and the pure diff that
//! decides what to apply, what to delete and what to leave alone.
//!
//! Ownership is a controller owner reference plus a label carrying the owner's UID, so the children of
//! one primary are one label-selected query away, and garbage collection removes them with the owner.
//! An object that another controller (or nobody) controls is never adopted and never deleted: it is
//! reported as a conflict.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Resource;
use kube::core::{ApiResource, DynamicObject};
use serde::Serialize;
use std::collections::BTreeSet;

/// Errors turning an object into a child.
#[derive(Debug, thiserror::Error)]
pub enum ChildError {
    /// Children need a name (the framework applies them by name).
    #[error("child {kind} has no metadata.name")]
    NoName {
        /// Kind of the child.
        kind: String,
    },
    /// The object could not be serialized.
    #[error("serializing child {kind}/{name}: {source}")]
    Serialize {
        /// Kind of the child.
        kind: String,
        /// Name of the child.
        name: String,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
}

/// Identity of a child: type, namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChildKey {
    /// `group/version` or `version`.
    pub api_version: String,
    /// Kind.
    pub kind: String,
    /// Namespace (`None` for cluster-scoped children).
    pub namespace: Option<String>,
    /// Name.
    pub name: String,
}

impl std::fmt::Display for ChildKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {}/{}", self.kind, ns, self.name),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}

/// An object a plan wants to exist, typed away so one plan can hold several kinds.
#[derive(Clone, Debug)]
pub struct Child {
    pub(crate) key: ChildKey,
    pub(crate) resource: ApiResource,
    pub(crate) object: serde_json::Value,
    /// Created when absent, never applied again (see [`Child::create_only`]).
    pub(crate) create_only: bool,
}

impl Child {
    /// Wraps a typed object. It must have a name; owner reference and owner label are added later by
    /// the framework.
    ///
    /// ```
    /// use kube_plan::Child;
    /// use k8s_openapi::api::core::v1::ConfigMap;
    ///
    /// let mut cm = ConfigMap::default();
    /// cm.metadata.name = Some("settings".into());
    /// cm.metadata.namespace = Some("default".into());
    /// let child = Child::new(&cm).unwrap();
    /// assert_eq!(child.key().to_string(), "ConfigMap default/settings");
    /// ```
    pub fn new<C>(obj: &C) -> Result<Self, ChildError>
    where
        C: Resource<DynamicType = ()> + Serialize,
    {
        let kind = C::kind(&()).to_string();
        let name = obj
            .meta()
            .name
            .clone()
            .ok_or_else(|| ChildError::NoName { kind: kind.clone() })?;
        let mut object = serde_json::to_value(obj).map_err(|source| ChildError::Serialize {
            kind: kind.clone(),
            name: name.clone(),
            source,
        })?;
        let api_version = C::api_version(&()).to_string();
        if let Some(map) = object.as_object_mut() {
            map.insert("apiVersion".into(), api_version.clone().into());
            map.insert("kind".into(), kind.clone().into());
            if let Some(meta) = map.get_mut("metadata").and_then(|m| m.as_object_mut()) {
                for transient in [
                    "resourceVersion",
                    "uid",
                    "managedFields",
                    "creationTimestamp",
                    "generation",
                ] {
                    meta.remove(transient);
                }
            }
            map.remove("status");
        }
        Ok(Self {
            key: ChildKey {
                api_version,
                kind,
                namespace: obj.meta().namespace.clone(),
                name,
            },
            resource: ApiResource::erase::<C>(&()),
            object,
            create_only: false,
        })
    }

    /// Makes this a child that is created when it does not exist and otherwise left as it is,
    /// whatever later plans say of it: for objects whose spec cannot change once made (a Pod, a
    /// Job). Creating takes one request (a POST, whose 409 answers whether the name is taken),
    /// where an apply of a child the caches do not show first reads it, to make sure it is not
    /// someone else's. Ownership is checked as for any child: a name someone else holds is a
    /// conflict, never adopted.
    ///
    /// The fields of a created child belong to the field manager as an update, not an apply: a
    /// child that later plans change must stay a plain [`Child::new`].
    pub fn create_only(mut self) -> Self {
        self.create_only = true;
        self
    }

    /// The child's identity.
    pub fn key(&self) -> &ChildKey {
        &self.key
    }

    /// The object as it will be applied (before the framework adds ownership).
    pub fn object(&self) -> &serde_json::Value {
        &self.object
    }

    /// Adds the owner reference and owner label.
    pub(crate) fn owned_by(&self, owner: &OwnerReference, label_key: &str) -> serde_json::Value {
        let mut obj = self.object.clone();
        if let Some(meta) = obj.as_object_mut().and_then(|m| {
            m.entry("metadata")
                .or_insert_with(|| serde_json::json!({}))
                .as_object_mut()
        }) {
            let labels = meta
                .entry("labels")
                .or_insert_with(|| serde_json::json!({}));
            if let Some(labels) = labels.as_object_mut() {
                labels.insert(label_key.to_owned(), owner.uid.clone().into());
            }
            let refs = meta
                .entry("ownerReferences")
                .or_insert_with(|| serde_json::json!([]));
            if let Some(refs) = refs.as_array_mut() {
                refs.retain(|r| r.get("uid").and_then(|u| u.as_str()) != Some(owner.uid.as_str()));
                refs.push(serde_json::to_value(owner).unwrap_or_default());
            }
        }
        obj
    }
}

/// What the framework knows about an existing object that may be a child.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Existing {
    /// Identity.
    pub key: ChildKey,
    /// UID of its controller owner reference, if it has one.
    pub controller_uid: Option<String>,
    /// Whether it is being deleted already (it is not deleted again).
    pub deleting: bool,
    /// Its `metadata.generation` (changes with its spec), if the kind has one.
    pub generation: Option<i64>,
    /// Its `metadata.resourceVersion` (changes with anything).
    pub resource_version: Option<String>,
}

impl Existing {
    /// Reads the identity and controller of an object.
    pub fn of(obj: &DynamicObject, api_version: &str, kind: &str) -> Option<Self> {
        Self::from_meta(&obj.metadata, api_version, kind)
    }

    /// Reads the identity and controller of an object from its metadata.
    pub fn from_meta(meta: &ObjectMeta, api_version: &str, kind: &str) -> Option<Self> {
        Some(Self {
            key: ChildKey {
                api_version: api_version.to_owned(),
                kind: kind.to_owned(),
                namespace: meta.namespace.clone(),
                name: meta.name.clone()?,
            },
            controller_uid: controller_uid(&meta.owner_references),
            deleting: meta.deletion_timestamp.is_some(),
            generation: meta.generation,
            resource_version: meta.resource_version.clone(),
        })
    }
}

/// The UID of the controller among owner references.
pub fn controller_uid(refs: &Option<Vec<OwnerReference>>) -> Option<String> {
    refs.as_ref()?
        .iter()
        .find(|r| r.controller == Some(true))
        .map(|r| r.uid.clone())
}

/// Why a planned child was left alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    /// The child.
    pub key: ChildKey,
    /// Its controller's UID, or `None` if it exists without one.
    pub controller_uid: Option<String>,
}

impl std::fmt::Display for Conflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.controller_uid {
            Some(uid) => write!(f, "{} is controlled by another owner (uid {uid})", self.key),
            None => write!(
                f,
                "{} already exists and is not controlled by this object",
                self.key
            ),
        }
    }
}

/// A planned child the API server refused to create or update: an admission webhook or policy, a
/// ResourceQuota, or a field the schema accepts and the server does not. Nothing of it exists;
/// applying it again unchanged gets the same answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Refusal {
    /// The child.
    pub key: ChildKey,
    /// The body that was refused.
    pub object: serde_json::Value,
    /// The HTTP status code (400, 403 or 422).
    pub code: u16,
    /// The API server's reason (`Forbidden`, `Invalid`, ...).
    pub reason: String,
    /// The API server's message, as it gave it.
    pub message: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} refused by the API server: {}",
            self.key, self.message
        )
    }
}

/// The work one plan implies for its children.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ChildDiff {
    /// Planned children to apply (ours already, or not existing yet).
    pub apply: Vec<ChildKey>,
    /// Owned children no longer planned.
    pub delete: Vec<ChildKey>,
    /// Planned children that exist under someone else's control (or none): left alone.
    pub conflicts: Vec<Conflict>,
}

/// Decides what to apply, delete and leave alone.
///
/// `existing` holds what is known of the objects at the planned keys and of every object labelled as a
/// child of `owner_uid`. Only objects whose controller is `owner_uid` are ever deleted, and never one
/// that is being deleted already.
pub fn diff(owner_uid: &str, planned: &[ChildKey], existing: &[Existing]) -> ChildDiff {
    let planned_set: BTreeSet<&ChildKey> = planned.iter().collect();
    let mut out = ChildDiff::default();
    for key in planned {
        match existing.iter().find(|e| &e.key == key) {
            Some(e) if e.controller_uid.as_deref() != Some(owner_uid) => {
                out.conflicts.push(Conflict {
                    key: key.clone(),
                    controller_uid: e.controller_uid.clone(),
                })
            }
            _ => out.apply.push(key.clone()),
        }
    }
    for e in existing {
        if e.controller_uid.as_deref() == Some(owner_uid)
            && !e.deleting
            && !planned_set.contains(&e.key)
        {
            out.delete.push(e.key.clone());
        }
    }
    out.delete.sort();
    out.delete.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> ChildKey {
        ChildKey {
            api_version: "v1".into(),
            kind: "Pod".into(),
            namespace: Some("ns".into()),
            name: name.into(),
        }
    }

    fn existing(name: &str, controller: Option<&str>) -> Existing {
        Existing {
            key: key(name),
            controller_uid: controller.map(Into::into),
            deleting: false,
            generation: None,
            resource_version: None,
        }
    }

    #[test]
    fn children_new_planned_child_is_applied() {
        let d = diff("me", &[key("a")], &[]);
        assert_eq!(d.apply, vec![key("a")]);
        assert!(d.delete.is_empty() && d.conflicts.is_empty());
    }

    #[test]
    fn children_owned_child_no_longer_planned_is_deleted() {
        let d = diff(
            "me",
            &[key("a")],
            &[existing("a", Some("me")), existing("b", Some("me"))],
        );
        assert_eq!(d.apply, vec![key("a")]);
        assert_eq!(d.delete, vec![key("b")]);
    }

    #[test]
    fn children_foreign_controlled_child_is_a_conflict_never_deleted() {
        let d = diff(
            "me",
            &[key("a")],
            &[existing("a", Some("other")), existing("c", Some("other"))],
        );
        assert!(d.apply.is_empty());
        assert!(d.delete.is_empty());
        assert_eq!(d.conflicts.len(), 1);
        assert_eq!(d.conflicts[0].controller_uid.as_deref(), Some("other"));
        assert!(
            d.conflicts[0]
                .to_string()
                .contains("controlled by another owner")
        );
    }

    #[test]
    fn children_uncontrolled_object_is_not_adopted() {
        let d = diff("me", &[key("a")], &[existing("a", None)]);
        assert!(d.apply.is_empty());
        assert_eq!(d.conflicts[0].controller_uid, None);
    }

    #[test]
    fn children_child_being_deleted_is_not_deleted_again() {
        let mut going = existing("a", Some("me"));
        going.deleting = true;
        let d = diff("me", &[], &[going, existing("b", Some("me"))]);
        assert_eq!(d.delete, vec![key("b")]);
    }

    #[test]
    fn children_empty_plan_deletes_every_owned_child() {
        let d = diff(
            "me",
            &[],
            &[existing("a", Some("me")), existing("b", Some("me"))],
        );
        assert_eq!(d.delete, vec![key("a"), key("b")]);
    }

    #[test]
    fn children_ownership_is_added_without_duplicating_refs() {
        let mut cm = k8s_openapi::api::core::v1::ConfigMap::default();
        cm.metadata.name = Some("x".into());
        cm.metadata.uid = Some("should-go".into());
        let child = Child::new(&cm).unwrap();
        assert!(child.object()["metadata"].get("uid").is_none());
        let owner = OwnerReference {
            api_version: "example.com/v1".into(),
            kind: "Widget".into(),
            name: "w".into(),
            uid: "u1".into(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        };
        let once = child.owned_by(&owner, "example.com/owner-uid");
        assert_eq!(once["metadata"]["labels"]["example.com/owner-uid"], "u1");
        assert_eq!(
            once["metadata"]["ownerReferences"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
        assert_eq!(once["apiVersion"], "v1");
        assert_eq!(once["kind"], "ConfigMap");
    }
}
