//! What a node's own report says about an image: the kubelet lists the images it holds in
//! `Node.status.images`, at most `nodeStatusMaxImages` of them (the largest first). Pure.
//!
//! An image in the list is on the node. An image missing from a list shorter than the limit is not;
//! missing from a full list, it may still be there, so nothing can be concluded.

use k8s_openapi::api::core::v1::Node;
use oci_spec::distribution::Reference;
use std::hash::{DefaultHasher, Hash, Hasher};

/// The kubelet's default `nodeStatusMaxImages`.
pub const KUBELET_MAX_IMAGES: i32 = 50;

/// What a node's image list says about one image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listed {
    /// Listed: on the node.
    Yes,
    /// Missing from a list that is not full: not on the node.
    No,
    /// No list, or a full one without it.
    Unknown,
}

/// The names under which the kubelet lists `reference` (with its resolved `digest`, if known):
/// the normalised `registry/repository:tag` and `registry/repository@digest`.
pub fn names(reference: &str, digest: Option<&str>) -> Vec<String> {
    let Ok(r) = reference.parse::<Reference>() else {
        return vec![reference.to_owned()];
    };
    let repository = format!("{}/{}", r.registry(), r.repository());
    let mut out = Vec::new();
    if let Some(tag) = r.tag() {
        out.push(format!("{repository}:{tag}"));
    }
    for d in r.digest().into_iter().chain(digest) {
        out.push(format!("{repository}@{d}"));
    }
    out
}

/// Whether `node` lists an image known by `names`; `max_images` is the kubelet's
/// `nodeStatusMaxImages` (negative: no limit).
pub fn listed(node: &Node, names: &[String], max_images: i32) -> Listed {
    let Some(images) = node.status.as_ref().and_then(|s| s.images.as_ref()) else {
        return Listed::Unknown;
    };
    // The kubelet lists at most five names per image (digests first), so an image known under many
    // names may show another repository's name with the same digest: the content is on the node
    // all the same, and a pull of it fetches only its manifest.
    let digests: Vec<&str> = names
        .iter()
        .filter_map(|n| n.rfind('@').map(|at| &n[at..]))
        .collect();
    let present = images
        .iter()
        .flat_map(|i| i.names.iter().flatten())
        .any(|n| names.contains(n) || digests.iter().any(|d| n.ends_with(d)));
    let full = usize::try_from(max_images).is_ok_and(|max| images.len() >= max);
    match (present, full) {
        (true, _) => Listed::Yes,
        (false, false) => Listed::No,
        (false, true) => Listed::Unknown,
    }
}

/// A fingerprint of the node's image list: it changes when an image comes or goes.
pub fn fingerprint(node: &Node) -> Option<u64> {
    let images = node.status.as_ref()?.images.as_ref()?;
    let mut h = DefaultHasher::new();
    images.iter().for_each(|i| i.names.hash(&mut h));
    Some(h.finish())
}

/// Keeps of a node's status only the names of its images (no sizes, conditions, addresses or
/// capacity): what [`listed`] reads.
pub fn trim(node: &mut Node) {
    let images = node.status.take().and_then(|s| s.images).map(|images| {
        images
            .into_iter()
            .map(|i| k8s_openapi::api::core::v1::ContainerImage {
                names: i.names,
                size_bytes: None,
            })
            .collect()
    });
    if images.is_some() {
        node.status = Some(k8s_openapi::api::core::v1::NodeStatus {
            images,
            ..Default::default()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ContainerImage, NodeCondition, NodeStatus};

    fn node(lists: &[&[&str]]) -> Node {
        Node {
            status: Some(NodeStatus {
                images: Some(
                    lists
                        .iter()
                        .map(|names| ContainerImage {
                            names: Some(names.iter().map(|s| (*s).to_owned()).collect()),
                            size_bytes: Some(1 << 20),
                        })
                        .collect(),
                ),
                conditions: Some(vec![NodeCondition::default()]),
                ..NodeStatus::default()
            }),
            ..Node::default()
        }
    }

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn cachedimage_presence_names_are_the_kubelets_normalised_forms() {
        assert_eq!(
            names("nginx:1.27", Some(D)),
            [
                "docker.io/library/nginx:1.27".to_owned(),
                format!("docker.io/library/nginx@{D}")
            ]
        );
        assert_eq!(
            names("127.0.0.1:5000/team/app:1", None),
            ["127.0.0.1:5000/team/app:1"]
        );
        assert_eq!(
            names(&format!("ghcr.io/o/app@{D}"), None),
            [format!("ghcr.io/o/app@{D}")]
        );
    }

    #[test]
    fn cachedimage_presence_needs_a_list_that_is_not_full_to_say_no() {
        let me = names("registry.example.com/app:1", None);
        let with = node(&[&[
            "registry.example.com/app:1",
            "registry.example.com/app@sha256:1",
        ]]);
        assert_eq!(listed(&with, &me, 50), Listed::Yes);
        let without = node(&[&["registry.example.com/other:1"]]);
        assert_eq!(listed(&without, &me, 50), Listed::No);
        assert_eq!(
            listed(&without, &me, 1),
            Listed::Unknown,
            "a full list proves nothing"
        );
        assert_eq!(listed(&without, &me, -1), Listed::No, "no limit");
        assert_eq!(listed(&Node::default(), &me, 50), Listed::Unknown);
        // Listed by digest only (a tag moved on, or the kubelet lists the digest form).
        let by_digest = node(&[&["registry.example.com/app@sha256:1"]]);
        let me = names("registry.example.com/app:2", Some("sha256:1"));
        assert_eq!(listed(&by_digest, &me, 50), Listed::Yes);
        // The same content under another name (the kubelet shows five names per image at most).
        let elsewhere = node(&[&["mirror.example.com/app@sha256:1"]]);
        assert_eq!(listed(&elsewhere, &me, 50), Listed::Yes);
        assert_eq!(
            listed(&elsewhere, &names("registry.example.com/app:2", None), 50),
            Listed::No
        );
    }

    #[test]
    fn cachedimage_presence_trim_keeps_image_names_only() {
        let mut n = node(&[&["a:1"], &["b:1"]]);
        let before = fingerprint(&n);
        trim(&mut n);
        let status = n.status.as_ref().unwrap();
        assert_eq!(status.conditions, None);
        let images = status.images.as_ref().unwrap();
        assert_eq!(images.len(), 2);
        assert!(images.iter().all(|i| i.size_bytes.is_none()));
        assert_eq!(fingerprint(&n), before);
        let mut bare = Node {
            status: Some(NodeStatus::default()),
            ..Node::default()
        };
        trim(&mut bare);
        assert_eq!(bare.status, None, "nothing kept of a status without images");
        assert_ne!(fingerprint(&node(&[&["a:1"]])), before);
    }
}
