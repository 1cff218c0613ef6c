//! What a node's own report says about an image: the kubelet lists the images it holds in
//! `Node.status.images`, at most `nodeStatusMaxImages` of them (the largest first). Pure.
//!
//! An image in the list is on the node. An image missing from a list shorter than the limit is not;
//! missing from a full list, it may still be there, so nothing can be concluded.

use crate::reference::ImageRef;
use k8s_openapi::api::core::v1::Node;
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
    let Ok(r) = reference.parse::<ImageRef>() else {
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

/// Whether `node`, as [`trim`] keeps it, lists an image known by `names`; `max_images` is the
/// kubelet's `nodeStatusMaxImages` (negative: no limit).
pub fn listed(node: &Node, names: &[String], max_images: i32) -> Listed {
    let Some(kept) = node
        .status
        .as_ref()
        .and_then(|s| s.images.as_ref())
        .and_then(|i| i.first())
    else {
        return Listed::Unknown;
    };
    let wanted = tokens(names);
    let present = kept.names.iter().flatten().any(|all| {
        all.as_bytes()
            .chunks(TOKEN)
            .any(|t| wanted.iter().any(|w| w.as_bytes() == t))
    });
    let count = kept.size_bytes.unwrap_or(0);
    let full = i64::from(max_images) >= 0 && count >= i64::from(max_images);
    match (present, full) {
        (true, _) => Listed::Yes,
        (false, false) => Listed::No,
        (false, true) => Listed::Unknown,
    }
}

/// Characters of one token.
const TOKEN: usize = 8;

/// The tokens an image is known by: a short hash of each name, and of each `@digest` part on its
/// own. The kubelet shows at most five names per image (digests first), so an image known under
/// many names may appear under another repository's name with the same digest: its content is on
/// the node all the same, and a pull would fetch only its manifest; the digest token matches it.
fn tokens(names: &[String]) -> Vec<String> {
    let mut out: Vec<String> = names
        .iter()
        .map(String::as_str)
        .chain(names.iter().filter_map(|n| n.rfind('@').map(|at| &n[at..])))
        .map(|n| {
            let mut h = DefaultHasher::new();
            n.hash(&mut h);
            // 32 bits: a false match among a node's few hundred names is a one-in-ten-million
            // event, and costs one skipped re-pull.
            format!("{:08x}", h.finish() as u32)
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// A fingerprint of the node's image list: it changes when an image comes or goes.
pub fn fingerprint(node: &Node) -> Option<u64> {
    let images = node.status.as_ref()?.images.as_ref()?;
    let mut h = DefaultHasher::new();
    images.iter().for_each(|i| i.names.hash(&mut h));
    Some(h.finish())
}

/// Keeps of a node's status only what [`listed`] reads, in one entry of `status.images`: its
/// `names` hold one string of short hashes of every name (and digest) of every image the node
/// lists (see [`tokens`]), its `sizeBytes` how many images the node listed. No sizes, conditions,
/// addresses or capacity, and none of the long names: a node listing 50 images keeps about 1 KiB
/// (5000 such nodes: `cargo bench -p drop --bench node_cache`). A node that lists no images keeps
/// no status at all.
pub fn trim(node: &mut Node) {
    let Some(images) = node.status.take().and_then(|s| s.images) else {
        return;
    };
    let count = i64::try_from(images.len()).unwrap_or(i64::MAX);
    let all: String = images
        .iter()
        .map(|i| tokens(i.names.as_deref().unwrap_or_default()).concat())
        .collect();
    node.status = Some(k8s_openapi::api::core::v1::NodeStatus {
        images: Some(vec![k8s_openapi::api::core::v1::ContainerImage {
            names: Some(vec![all]),
            size_bytes: Some(count),
        }]),
        ..Default::default()
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ContainerImage, NodeCondition, NodeStatus};

    /// A node listing these images, as the cache keeps it.
    fn node(lists: &[&[&str]]) -> Node {
        let mut n = untrimmed(lists);
        trim(&mut n);
        n
    }

    fn untrimmed(lists: &[&[&str]]) -> Node {
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
    fn cachedimage_presence_trim_keeps_short_hashes_of_image_names_only() {
        let mut n = untrimmed(&[&["a:1"], &["b:1"]]);
        trim(&mut n);
        let before = fingerprint(&n);
        let status = n.status.as_ref().unwrap();
        assert_eq!(status.conditions, None);
        let kept = &status.images.as_ref().unwrap()[..];
        assert_eq!(kept.len(), 1, "one entry for the whole list");
        assert_eq!(
            kept[0].size_bytes,
            Some(2),
            "how many images the node listed"
        );
        let names = kept[0].names.as_ref().unwrap();
        assert_eq!(
            names[0].len(),
            2 * TOKEN,
            "two names, no digest: two tokens"
        );
        let mut bare = Node {
            status: Some(NodeStatus::default()),
            ..Node::default()
        };
        trim(&mut bare);
        assert_eq!(bare.status, None, "nothing kept of a status without images");
        assert_ne!(fingerprint(&node(&[&["a:1"]])), before);
    }
}
