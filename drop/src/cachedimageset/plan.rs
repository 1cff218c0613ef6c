//! What a CachedImageSet wants: its child CachedImages, and its status. Pure.

use crate::api::{
    CachedImage, CachedImagePhase, CachedImageSet, CachedImageSetPhase, CachedImageSetStatus,
    CachedImageSpec, DiscoveryPolicy, IMAGESET_LABEL,
};
use jiff::Timestamp;
use kube::ResourceExt;
use kube_plan::conditions::{self, Cond};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// One image a set caches: repository plus tag or digest.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Wanted {
    /// Repository, without tag or digest.
    pub image: String,
    /// Tag.
    pub tag: Option<String>,
    /// Digest.
    pub digest: Option<String>,
}

impl Wanted {
    /// The full reference.
    pub fn reference(&self) -> String {
        crate::api::image_reference(&self.image, self.tag.as_deref(), self.digest.as_deref())
    }

    /// Splits a full reference (as discovery reports it) into repository and tag or digest.
    pub fn parse(reference: &str) -> Result<Self, String> {
        let r: crate::reference::ImageRef = reference
            .parse()
            .map_err(|e| format!("{reference:?} is not an image reference: {e}"))?;
        Ok(Self {
            image: format!("{}/{}", r.registry(), r.repository()),
            tag: if r.digest().is_some() {
                None
            } else {
                r.tag().map(str::to_owned)
            },
            digest: r.digest().map(str::to_owned),
        })
    }
}

/// Why the discovered half of a set is not usable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiscoveryTrouble {
    /// The referenced DiscoveryPolicy does not exist.
    NotFound(String),
    /// It exists but its last sync failed (its list is the last good one, or empty).
    Failing {
        /// Its name.
        name: String,
        /// Its Ready condition's message.
        message: String,
    },
}

/// The images of a set: the static list merged with the policy's discovered images, duplicates
/// collapsed, in a stable order; plus references that could not be parsed.
pub fn wanted(
    set: &CachedImageSet,
    policy: Option<&DiscoveryPolicy>,
) -> (Vec<Wanted>, Vec<String>) {
    let mut out: BTreeMap<String, Wanted> = BTreeMap::new();
    let mut invalid = Vec::new();
    // Keyed by the normalized reference, so `alpine:3.19` and `docker.io/library/alpine:3.19` are one.
    let key = |w: &Wanted| {
        Wanted::parse(&w.reference())
            .map(|n| n.reference())
            .unwrap_or_else(|_| w.reference())
    };
    for e in &set.spec.images {
        let w = Wanted {
            image: e.image.clone(),
            tag: e.tag.clone(),
            digest: e.digest.clone(),
        };
        out.entry(key(&w)).or_insert(w);
    }
    for d in policy
        .and_then(|p| p.status.as_ref())
        .map(|s| s.discovered_images.as_slice())
        .unwrap_or_default()
    {
        match Wanted::parse(&d.image) {
            Ok(w) => {
                out.entry(key(&w)).or_insert(w);
            }
            Err(e) => invalid.push(e),
        }
    }
    (out.into_values().collect(), invalid)
}

fn short_hash(s: &str) -> String {
    Sha256::digest(s.as_bytes())
        .iter()
        .take(4)
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn dns_part(s: &str, max: usize) -> String {
    let cleaned: String = s
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let mut out = String::new();
    for c in cleaned.chars() {
        if !(c == '-' && out.ends_with('-')) {
            out.push(c);
        }
    }
    out.chars()
        .take(max)
        .collect::<String>()
        .trim_matches('-')
        .to_owned()
}

/// The child's name: `<set>-<image>-<tag>-<hash>`, readable, stable for a reference, at most 63
/// characters, a valid DNS name whatever the reference looks like. The hash covers the whole set
/// name and the whole reference, so two sets whose names share the cut prefix never name the same
/// child.
pub fn child_name(set: &str, w: &Wanted) -> String {
    let last = w.image.rsplit('/').next().unwrap_or(&w.image);
    let version = w
        .tag
        .clone()
        .or_else(|| {
            w.digest
                .as_ref()
                .map(|d| d.trim_start_matches("sha256:").chars().take(12).collect())
        })
        .unwrap_or_else(|| "latest".into());
    let hash = short_hash(&format!("{set}\n{}", w.reference()));
    let set_part = dns_part(set, 24);
    let readable = dns_part(
        &format!("{last}-{version}"),
        63 - set_part.len() - hash.len() - 2,
    );
    [set_part, readable, hash]
        .into_iter()
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join("-")
}

/// The child CachedImage for one image: the set's pull settings, its labels plus the imageset label.
pub fn child(set: &CachedImageSet, w: &Wanted) -> CachedImage {
    let mut ci = CachedImage::new(
        &child_name(&set.name_any(), w),
        CachedImageSpec {
            image: w.image.clone(),
            tag: w.tag.clone(),
            digest: w.digest.clone(),
            image_pull_policy: set.spec.image_pull_policy,
            image_pull_secrets: set.spec.image_pull_secrets.clone(),
            node_selector: set.spec.node_selector.clone(),
            tolerations: set.spec.tolerations.clone(),
            priority: None,
            policy_ref: set.spec.policy_ref.clone(),
        },
    );
    let mut labels = set.labels().clone();
    labels.insert(IMAGESET_LABEL.to_owned(), set.name_any());
    ci.metadata.labels = Some(labels);
    ci
}

/// The set's status from its children's.
pub fn status(
    previous: Option<&CachedImageSetStatus>,
    children: &[&CachedImage],
    trouble: Option<&DiscoveryTrouble>,
    invalid: &[String],
    now: Timestamp,
) -> CachedImageSetStatus {
    let mut st = previous.cloned().unwrap_or_default();
    let phase_of = |c: &&CachedImage| c.status.as_ref().and_then(|s| s.phase);
    let total = children.len();
    let ready = children
        .iter()
        .filter(|c| phase_of(c) == Some(CachedImagePhase::Ready))
        .count();
    let failing = children
        .iter()
        .filter(|c| phase_of(c) == Some(CachedImagePhase::Degraded))
        .count();
    st.images_managed = i32::try_from(total).unwrap_or(i32::MAX);
    st.images_ready = i32::try_from(ready).unwrap_or(i32::MAX);
    let (phase, cond) = match trouble {
        Some(DiscoveryTrouble::NotFound(name)) => (
            CachedImageSetPhase::Degraded,
            Cond::ready(
                false,
                "DiscoveryPolicyNotFound",
                format!("DiscoveryPolicy {name:?} does not exist; {ready}/{total} images cached"),
            ),
        ),
        Some(DiscoveryTrouble::Failing { name, message }) => (
            CachedImageSetPhase::Degraded,
            Cond::ready(
                false,
                "Degraded",
                format!(
                    "{ready}/{total} images cached, DiscoveryPolicy {name:?} failing: {message}"
                ),
            ),
        ),
        None if !invalid.is_empty() => (
            CachedImageSetPhase::Degraded,
            Cond::ready(
                false,
                "Degraded",
                format!(
                    "{ready}/{total} images cached; skipped: {}",
                    invalid.join("; ")
                ),
            ),
        ),
        None if failing > 0 => (
            CachedImageSetPhase::Degraded,
            Cond::ready(
                false,
                "Degraded",
                format!("{ready}/{total} images cached, failing: {failing}"),
            ),
        ),
        None if total > 0 && ready == total => (
            CachedImageSetPhase::Ready,
            Cond::ready(true, "Ready", format!("All {total} images are cached")),
        ),
        None => (
            CachedImageSetPhase::Pending,
            Cond::ready(
                false,
                "Progressing",
                format!("{ready}/{total} images cached"),
            ),
        ),
    };
    st.phase = Some(phase);
    conditions::set(&mut st.conditions, cond, None, now);
    st
}

#[cfg(test)]
mod tests;
