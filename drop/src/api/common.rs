//! Types and rules shared by several kinds.

use kube::KubeSchema;
use kube_plan::PrinterColumns;
use serde::{Deserialize, Serialize};

/// When the kubelet contacts the registry for an image (the Pod field of the same name).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema,
)]
pub enum ImagePullPolicy {
    /// Ask the registry every time, so a moved tag is followed.
    #[default]
    Always,
    /// Use the node's copy when there is one.
    IfNotPresent,
    /// Never pull; only useful for images loaded onto nodes by other means.
    Never,
}

impl ImagePullPolicy {
    /// The Pod field value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Always => "Always",
            Self::IfNotPresent => "IfNotPresent",
            Self::Never => "Never",
        }
    }
}

/// Names a PullPolicy.
#[derive(
    Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, KubeSchema, PrinterColumns,
)]
pub struct PolicyReference {
    /// Name of the PullPolicy.
    #[schemars(length(max = 253))]
    #[x_kube(validation = Rule::new("self != ''").message("policyRef.name must name a PullPolicy"))]
    pub name: String,
}

/// Names a DiscoveryPolicy.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, KubeSchema)]
pub struct DiscoveryPolicyReference {
    /// Name of the DiscoveryPolicy.
    #[schemars(length(max = 253))]
    #[x_kube(validation = Rule::new("self != ''").message("discoveryPolicyRef.name must name a DiscoveryPolicy"))]
    pub name: String,
}

/// The duration format every duration field accepts: Go's `time.ParseDuration` syntax, not
/// negative, with at most four parts of at most five digits each. The bound keeps every accepted
/// value far from the integer limits of both the API server's CEL `duration()` (nanoseconds in 64
/// bits) and kube's parser, so a typo such as `99999999999999999999h` is refused at admission
/// instead of failing (or panicking) in a watch.
macro_rules! duration_format {
    () => {
        "^(0|([0-9]{1,5}([.][0-9]{1,9})?(ns|us|µs|ms|s|m|h)){1,4})$"
    };
}

/// CEL: a duration in [`duration_format!`].
pub(crate) const DURATION_RULE: &str = concat!("self.matches('", duration_format!(), "')");
/// Message of [`DURATION_RULE`].
pub(crate) const DURATION_MESSAGE: &str = "must be a duration such as 30s, 5m or 1h30m: up to 4 parts, each a number of at most 5 digits with a unit (ns, us, ms, s, m, h)";
/// CEL: a duration (when well formed) of at most one year. Each duration field carries it beside
/// [`DURATION_RULE`], which reports a malformed value.
pub(crate) const DURATION_MAX_RULE: &str = concat!(
    "!self.matches('",
    duration_format!(),
    "') || duration(self) <= duration('8760h')"
);
/// Message of [`DURATION_MAX_RULE`].
pub(crate) const DURATION_MAX_MESSAGE: &str = "must be at most 8760h (one year)";
/// CEL: a duration (when well formed) of at least 10 seconds, for intervals that repeat work.
pub(crate) const INTERVAL_MIN_RULE: &str = concat!(
    "!self.matches('",
    duration_format!(),
    "') || duration(self) >= duration('10s')"
);
/// CEL: a duration (when well formed) that is zero (off) or at least a minute.
pub(crate) const REPULL_INTERVAL_RULE: &str = concat!(
    "!self.matches('",
    duration_format!(),
    "') || duration(self) == duration('0s') || duration(self) >= duration('1m')"
);

/// CEL: a URL without userinfo (`user:password@host`): credentials belong in a Secret.
pub(crate) const NO_USERINFO_RULE: &str = "!self.matches('^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*@')";

/// CEL: an image repository without tag or digest.
pub(crate) const IMAGE_RULE: &str = "!self.contains('@') && !self.matches(':[^/]*$')";
/// Message of [`IMAGE_RULE`].
pub(crate) const IMAGE_MESSAGE: &str = "image must be a repository without tag or digest (e.g. docker.io/library/nginx); put the tag in tag or the digest in digest";
/// CEL: a tag as the OCI distribution spec allows.
pub(crate) const TAG_RULE: &str = "self.matches('^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$')";
/// Message of [`TAG_RULE`].
pub(crate) const TAG_MESSAGE: &str = "tag must be 1-128 characters of letters, digits, '_', '.' or '-', not starting with '.' or '-'";
/// CEL: a sha256 digest.
pub(crate) const DIGEST_RULE: &str = "self.matches('^sha256:[a-f0-9]{64}$')";
/// Message of [`DIGEST_RULE`].
pub(crate) const DIGEST_MESSAGE: &str =
    "digest must be sha256: followed by 64 lowercase hex characters";
/// CEL on an object with `tag` and `digest`.
pub(crate) const TAG_XOR_DIGEST_RULE: &str = "!(has(self.tag) && has(self.digest))";
/// Message of [`TAG_XOR_DIGEST_RULE`].
pub(crate) const TAG_XOR_DIGEST_MESSAGE: &str =
    "tag and digest are mutually exclusive: set one of them (or neither, for the tag latest)";
/// CEL: a regular expression that compiles (an invalid one makes `matches` fail to evaluate).
pub(crate) const REGEX_RULE: &str = "self == '' || ''.matches(self) || !''.matches(self)";
/// Message of [`REGEX_RULE`].
pub(crate) const REGEX_MESSAGE: &str = "must be a valid regular expression (RE2 syntax)";

/// The image reference a tag or digest makes of a repository: `repo@digest`, `repo:tag`, or
/// `repo:latest` when neither is given.
pub fn image_reference(image: &str, tag: Option<&str>, digest: Option<&str>) -> String {
    match (
        digest.filter(|d| !d.is_empty()),
        tag.filter(|t| !t.is_empty()),
    ) {
        (Some(d), _) => format!("{image}@{d}"),
        (None, Some(t)) => format!("{image}:{t}"),
        (None, None) => format!("{image}:latest"),
    }
}

/// The registry host a reference pulls from, normalised as the container runtimes do: `nginx` and
/// `library/nginx` come from `docker.io`, `registry.example.com:5000/team/app` from
/// `registry.example.com:5000`. A reference that does not parse yields its first path segment.
pub fn registry_of(reference: &str) -> String {
    match reference.parse::<crate::reference::ImageRef>() {
        Ok(r) => r.registry().to_owned(),
        Err(_) => reference.split('/').next().unwrap_or_default().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn registry_budget_registry_of_normalises_docker_hub_and_keeps_ports() {
        assert_eq!(registry_of("nginx:1.27"), "docker.io");
        assert_eq!(registry_of("library/nginx:1.27"), "docker.io");
        assert_eq!(registry_of("docker.io/library/nginx:1.27"), "docker.io");
        assert_eq!(
            registry_of(
                "ghcr.io/org/app@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
            ),
            "ghcr.io"
        );
        assert_eq!(
            registry_of("registry.example.com:5000/team/app:1"),
            "registry.example.com:5000"
        );
        assert_eq!(registry_of("localhost:5000/app:1"), "localhost:5000");
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            rng_seed: proptest::test_runner::RngSeed::Fixed(0x0d20_9bad),
            ..ProptestConfig::default()
        })]

        /// Every duration admission accepts parses in the operator without a panic (kube's parser
        /// panics on numbers too long for it; the format's bounds keep them out).
        #[test]
        fn hostile_durations_admission_accepts_parse(
            value in proptest::string::string_regex(
                duration_format!().trim_start_matches('^').trim_end_matches('$')
            ).unwrap()
        ) {
            let parsed = serde_json::from_value::<kube::core::Duration>(serde_json::json!(value));
            prop_assert!(parsed.is_ok(), "{value}: {parsed:?}");
        }
    }

    #[test]
    fn cachedimage_reference_prefers_digest_then_tag_then_latest() {
        let d = "sha256:a3ed95caeb02ffe68cdd9fd84406680ae93d633cb16422d00e8a7c22955b46d4";
        assert_eq!(
            image_reference("r/x", Some("1"), Some(d)),
            format!("r/x@{d}")
        );
        assert_eq!(image_reference("r/x", Some("1"), None), "r/x:1");
        assert_eq!(image_reference("r/x", None, None), "r/x:latest");
        assert_eq!(image_reference("r/x", Some(""), Some("")), "r/x:latest");
    }
}
