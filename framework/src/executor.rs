//! Carries out the children part of a plan: apply what is planned, delete what the reconcile saw and
//! no longer plans, leave alone what someone else controls.

use crate::applied::{Applied, body_hash};
use crate::children::{self, Child, ChildKey, Conflict, Existing, Refusal};
use crate::controller::ExecError;
use crate::owned::ChildStore;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, PropagationPolicy};
use kube::core::{ApiResource, DynamicObject, Resource};
use serde::de::IgnoredAny;
use std::collections::HashSet;
use std::sync::Arc;

/// What became of the planned children that were not applied.
#[derive(Debug, Default)]
pub(crate) struct Unapplied {
    /// Left alone: someone else controls them.
    pub(crate) conflicts: Vec<Conflict>,
    /// Refused by the API server.
    pub(crate) refused: Vec<Refusal>,
}

/// What an apply came to, short of an error that fails the reconcile.
enum Applying {
    Done,
    Conflict(Conflict),
    Refused(Refusal),
}

/// Applies and prunes one controller's children.
pub(crate) struct Executor {
    pub(crate) client: Client,
    /// Field manager of every apply.
    pub(crate) manager: String,
    pub(crate) label_key: String,
    pub(crate) stores: Vec<Arc<dyn ChildStore>>,
    /// What was last applied to each child.
    pub(crate) applied: Applied,
}

impl Executor {
    /// Applies `planned` (skipping children whose body and version are what the last apply left),
    /// keeps `kept`, and deletes the children in `seen` (the view the reconciler was given) that are
    /// neither. Returns the planned children left alone because someone else controls them, and
    /// those the API server refused (the others are still applied, and the pruning still done).
    pub(crate) async fn run(
        &self,
        owner: &OwnerReference,
        seen: &[Existing],
        planned: &[Child],
        kept: &[ChildKey],
    ) -> Result<Unapplied, ExecError> {
        let mut existing: Vec<Existing> = seen.to_vec();
        let known: HashSet<ChildKey> = existing.iter().map(|e| e.key.clone()).collect();
        for child in planned {
            if known.contains(child.key()) {
                continue;
            }
            // Not in the view: the cache may have caught up since; else, as the caches only hold
            // objects carrying our owner label, ask the API server whether someone else has it.
            // A child to create only is not read first: its create's answer tells.
            let found = match self.lookup(child.key()) {
                Some(e) => Some(e),
                None if child.create_only => None,
                None => self.get(child).await?,
            };
            existing.extend(found);
        }
        let mut keys: Vec<ChildKey> = planned.iter().map(|c| c.key().clone()).collect();
        keys.extend(kept.iter().cloned());
        let diff = children::diff(&owner.uid, &keys, &existing);
        let mut out = Unapplied {
            conflicts: diff.conflicts,
            refused: Vec::new(),
        };
        for key in &diff.apply {
            // Kept children have no object in the plan: they stay as they are.
            let Some(child) = planned.iter().find(|c| c.key() == key) else {
                continue;
            };
            let body = child.owned_by(owner, &self.label_key);
            let current = existing.iter().find(|e| &e.key == key);
            let applying = if child.create_only {
                if current.is_some() {
                    continue; // ours (the diff left out anyone else's), and left as it is
                }
                self.create(owner, child, &body).await?
            } else {
                let hash = body_hash(&body);
                if current.is_some_and(|e| self.applied.unchanged(&owner.uid, e, hash)) {
                    continue;
                }
                self.apply(owner, child, &body, hash).await?
            };
            match applying {
                Applying::Done => {}
                Applying::Conflict(c) => out.conflicts.push(c),
                Applying::Refused(r) => out.refused.push(r),
            }
        }
        for key in &diff.delete {
            // Deleted by an earlier reconcile, and the view has not caught up: once is enough.
            if self.applied.deleting(&owner.uid, key) {
                continue;
            }
            self.delete(key).await?;
            self.applied.deleted(&owner.uid, key);
        }
        self.applied.settle(&owner.uid, seen);
        Ok(out)
    }

    fn store_of(&self, key: &ChildKey) -> Option<&Arc<dyn ChildStore>> {
        self.stores
            .iter()
            .find(|s| s.resource().api_version == key.api_version && s.resource().kind == key.kind)
    }

    fn lookup(&self, key: &ChildKey) -> Option<Existing> {
        self.store_of(key).and_then(|s| s.lookup(key))
    }

    async fn get(&self, child: &Child) -> Result<Option<Existing>, ExecError> {
        let key = child.key();
        let api = dynamic_api(&self.client, &child.resource, key.namespace.as_deref());
        let found = api
            .get_opt(&key.name)
            .await
            .map_err(|source| ExecError::Api {
                action: "reading",
                target: key.to_string(),
                source,
            })?;
        Ok(found.and_then(|o| Existing::of(&o, &key.api_version, &key.kind)))
    }

    async fn apply(
        &self,
        owner: &OwnerReference,
        child: &Child,
        body: &serde_json::Value,
        hash: u64,
    ) -> Result<Applying, ExecError> {
        let key = child.key();
        let params = PatchParams::apply(&self.manager).force();
        match self.patch(child, &params, body).await {
            Ok(answer) => {
                let meta = answer.metadata;
                self.applied.record(
                    &owner.uid,
                    key,
                    hash,
                    meta.generation,
                    meta.resource_version.as_deref(),
                );
                Ok(Applying::Done)
            }
            // A child created by someone else between our look and our apply shows up as a 409 or
            // 422 (two controllers); report it rather than fight over it.
            Err(source) if is_conflict(&source) => {
                tracing::info!(controller = %self.manager, child = %key, error = %source, "child apply conflict");
                Ok(Applying::Conflict(Conflict {
                    key: key.clone(),
                    controller_uid: None,
                }))
            }
            Err(kube::Error::Api(s)) if is_refusal(&s) => Ok(self.refused(key, body, &s)),
            Err(source) => Err(ExecError::Api {
                action: "applying",
                target: key.to_string(),
                source,
            }),
        }
    }

    /// Creates a child that does not exist yet. A 409 means the name is taken: by this owner's own
    /// child the view has not caught up with (nothing to do), or by someone else's object (a
    /// conflict, left alone).
    async fn create(
        &self,
        owner: &OwnerReference,
        child: &Child,
        body: &serde_json::Value,
    ) -> Result<Applying, ExecError> {
        let key = child.key();
        let path = DynamicObject::url_path(&child.resource, key.namespace.as_deref());
        let params = PostParams {
            field_manager: Some(self.manager.clone()),
            ..PostParams::default()
        };
        let answer = match serde_json::to_vec(body) {
            Ok(bytes) => match kube::core::Request::new(path).create(&params, bytes) {
                Ok(request) => self.client.request::<IgnoredAny>(request).await,
                Err(e) => Err(kube::Error::BuildRequest(e)),
            },
            Err(e) => Err(kube::Error::SerdeError(e)),
        };
        match answer {
            Ok(_) => Ok(Applying::Done),
            Err(kube::Error::Api(s)) if s.code == 409 => match self.get(child).await? {
                Some(e) if e.controller_uid.as_deref() != Some(owner.uid.as_str()) => {
                    Ok(Applying::Conflict(Conflict {
                        key: key.clone(),
                        controller_uid: e.controller_uid,
                    }))
                }
                _ => Ok(Applying::Done),
            },
            Err(kube::Error::Api(s)) if is_refusal(&s) => Ok(self.refused(key, body, &s)),
            Err(source) => Err(ExecError::Api {
                action: "creating",
                target: key.to_string(),
                source,
            }),
        }
    }

    /// Admission said no (a policy, a webhook, a quota, validation): the child does not exist, and
    /// the reconciler decides what that means.
    fn refused(
        &self,
        key: &ChildKey,
        body: &serde_json::Value,
        s: &kube::core::Status,
    ) -> Applying {
        tracing::info!(controller = %self.manager, child = %key, code = s.code, message = %s.message, "child refused");
        Applying::Refused(Refusal {
            key: key.clone(),
            object: body.clone(),
            code: s.code,
            reason: s.reason.clone(),
            message: s.message.clone(),
        })
    }

    /// Server-side applies `body` to the child, reading of the answer only the version it left
    /// (decoding whole objects, managed fields included, was most of an apply's cost).
    async fn patch(
        &self,
        child: &Child,
        params: &PatchParams,
        body: &serde_json::Value,
    ) -> Result<Answer, kube::Error> {
        let key = child.key();
        let path = DynamicObject::url_path(&child.resource, key.namespace.as_deref());
        let request = kube::core::Request::new(path)
            .patch(&key.name, params, &Patch::Apply(body))
            .map_err(kube::Error::BuildRequest)?;
        self.client.request::<Answer>(request).await
    }

    async fn delete(&self, key: &ChildKey) -> Result<(), ExecError> {
        // Deleted children were reported by a store, which knows their endpoint exactly.
        let Some(store) = self.store_of(key) else {
            return Ok(());
        };
        let dp = DeleteParams {
            propagation_policy: Some(PropagationPolicy::Background),
            ..DeleteParams::default()
        };
        // The answer (the object as deleted, or a Status) is not read: decoding a whole object
        // into a JSON tree for nothing was a large part of a delete's cost.
        let path = DynamicObject::url_path(store.resource(), key.namespace.as_deref());
        let answer = match kube::core::Request::new(path).delete(&key.name, &dp) {
            Ok(request) => self.client.request::<IgnoredAny>(request).await,
            Err(e) => Err(kube::Error::BuildRequest(e)),
        };
        match answer {
            Ok(_) => {
                tracing::debug!(controller = %self.manager, child = %key, "deleted child");
                Ok(())
            }
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(source) => Err(ExecError::Api {
                action: "deleting",
                target: key.to_string(),
                source,
            }),
        }
    }
}

/// What the executor reads of an apply's answer.
#[derive(serde::Deserialize)]
struct Answer {
    metadata: AnswerMeta,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct AnswerMeta {
    generation: Option<i64>,
    resource_version: Option<String>,
}

/// The endpoint of kind `ar` in `namespace` (or cluster-wide).
pub(crate) fn dynamic_api(
    client: &Client,
    ar: &ApiResource,
    namespace: Option<&str>,
) -> Api<DynamicObject> {
    match namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, ar),
        None => Api::all_with(client.clone(), ar),
    }
}

/// An answer that refuses the object itself (as opposed to failing the request).
fn is_refusal(s: &kube::core::Status) -> bool {
    matches!(s.code, 400 | 403 | 422)
}

/// A refusal caused by someone else's control of the object: a field conflict, or a second controller
/// owner reference.
fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409 || (s.code == 422 && s.message.contains("Controller")))
}
