//! Image references (`[registry/]repository[:tag][@digest]`), parsed and normalised the way the
//! container runtimes read them: `nginx` is `docker.io/library/nginx:latest`.
//!
//! The grammar is the distribution project's (the one the kubelet and containerd follow), checked by
//! hand rather than with its regular expression: compiled with Unicode classes, as the OCI crates
//! do it, that expression holds 7.5 MiB of heap for the life of the process, a third of the
//! operator's resident memory at start. The tests hold this parser to `oci-spec`'s on generated
//! references.

use std::fmt;
use std::str::FromStr;

/// The registry of references that name none.
const DOCKER_HUB: &str = "docker.io";
/// The organisation of Docker Hub's one-segment names (`nginx` is `library/nginx`).
const DOCKER_HUB_OFFICIAL: &str = "library";
/// The longest repository (after normalisation) the grammar allows.
const MAX_REPOSITORY: usize = 255;
/// The longest tag.
const MAX_TAG: usize = 128;

/// A parsed image reference, normalised.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRef {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<String>,
}

/// Why a string is not an image reference.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    /// The string is empty.
    #[error("the reference is empty")]
    Empty,
    /// The registry or repository is not well formed.
    #[error(
        "{0:?} is not a valid registry and repository (lower-case path segments, e.g. registry.example.com/team/app)"
    )]
    Name(String),
    /// The tag is not well formed.
    #[error(
        "{0:?} is not a valid tag (up to 128 letters, digits, '_', '.' and '-', not starting with '.' or '-')"
    )]
    Tag(String),
    /// The digest is not well formed or uses an unknown algorithm.
    #[error(
        "{0:?} is not a valid digest (sha256, sha384 or sha512 followed by ':' and its hex value)"
    )]
    Digest(String),
    /// The repository is longer than the grammar allows.
    #[error("the repository is {0} characters long; at most 255 are allowed")]
    TooLong(usize),
}

impl ImageRef {
    /// The registry host (and port), `docker.io` when the reference names none.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The repository within the registry, `library/` added for Docker Hub's one-segment names.
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// The tag: `latest` when the reference has neither tag nor digest.
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The digest (`algorithm:hex`), if the reference pins one.
    pub fn digest(&self) -> Option<&str> {
        self.digest.as_deref()
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl FromStr for ImageRef {
    type Err = ReferenceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(ReferenceError::Empty);
        }
        let (rest, digest) = match s.split_once('@') {
            Some((rest, digest)) if valid_digest(digest) => (rest, Some(digest)),
            Some((_, digest)) => return Err(ReferenceError::Digest(digest.to_owned())),
            None => (s, None),
        };
        // A ':' after the last '/' starts the tag; one before it is a registry's port.
        let (name, tag) = match rest.rfind(':') {
            Some(i) if !rest[i..].contains('/') => (&rest[..i], Some(&rest[i + 1..])),
            _ => (rest, None),
        };
        if let Some(tag) = tag.filter(|t| !valid_tag(t)) {
            return Err(ReferenceError::Tag(tag.to_owned()));
        }
        let (registry, repository) = split_name(name)?;
        if repository.len() > MAX_REPOSITORY {
            return Err(ReferenceError::TooLong(repository.len()));
        }
        let tag = match (tag, digest) {
            (None, None) => Some("latest"),
            (tag, _) => tag,
        };
        Ok(Self {
            registry,
            repository,
            tag: tag.map(str::to_owned),
            digest: digest.map(str::to_owned),
        })
    }
}

/// The registry and the normalised repository of a reference's name (what comes before its tag
/// and digest).
fn split_name(name: &str) -> Result<(String, String), ReferenceError> {
    let invalid = || ReferenceError::Name(name.to_owned());
    let (first, rest) = match name.split_once('/') {
        Some((first, rest)) => (first, Some(rest)),
        None => (name, None),
    };
    // The grammar: an optional registry followed by a path; the first segment is read as a
    // registry when it looks like a host (a '.' or a port, or `localhost`), as the runtimes do.
    let valid = valid_path(name) || (valid_host(first) && rest.is_some_and(valid_path));
    if !valid {
        return Err(invalid());
    }
    let (registry, repository) = match rest {
        Some(rest) if first.contains(['.', ':']) || first == "localhost" => (first, rest),
        _ => (DOCKER_HUB, name),
    };
    let registry = if registry == "index.docker.io" {
        DOCKER_HUB
    } else {
        registry
    };
    let repository = if registry == DOCKER_HUB && !repository.contains('/') {
        format!("{DOCKER_HUB_OFFICIAL}/{repository}")
    } else {
        repository.to_owned()
    };
    Ok((registry.to_owned(), repository))
}

/// `host[:port]`: dot-separated components of letters, digits and inner dashes.
fn valid_host(s: &str) -> bool {
    let (host, port) = match s.split_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (s, None),
    };
    let component = |c: &str| {
        !c.is_empty()
            && c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !c.starts_with('-')
            && !c.ends_with('-')
    };
    host.split('.').all(component)
        && port.is_none_or(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

/// Slash-separated path components, each lower-case letters and digits joined by one separator:
/// `.`, `_`, `__` or any number of `-`.
fn valid_path(s: &str) -> bool {
    s.split('/').all(|component| {
        let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
        let bytes = component.as_bytes();
        if !bytes.first().is_some_and(|&b| alnum(b)) || !bytes.last().is_some_and(|&b| alnum(b)) {
            return false;
        }
        bytes
            .split(|&b| alnum(b))
            .filter(|separator| !separator.is_empty())
            .all(|separator| {
                matches!(separator, b"." | b"_" | b"__") || separator.iter().all(|&b| b == b'-')
            })
    })
}

/// Letters, digits, `_`, `.` and `-`, not starting with `.` or `-`, at most 128.
fn valid_tag(s: &str) -> bool {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    s.len() <= MAX_TAG
        && s.as_bytes().first().is_some_and(|&b| word(b))
        && s.bytes().all(|b| word(b) || b == b'.' || b == b'-')
}

/// `sha256:` with 64 hex digits, `sha384:` with 96 or `sha512:` with 128.
fn valid_digest(s: &str) -> bool {
    let Some((algorithm, hex)) = s.split_once(':') else {
        return false;
    };
    let length = match algorithm {
        "sha256" => 64,
        "sha384" => 96,
        "sha512" => 128,
        _ => return false,
    };
    hex.len() == length && hex.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Registry, repository, tag and digest, owned: what both parsers are compared on.
    type Parts = (String, String, Option<String>, Option<String>);

    fn owned(registry: &str, repository: &str, tag: Option<&str>, digest: Option<&str>) -> Parts {
        (
            registry.to_owned(),
            repository.to_owned(),
            tag.map(str::to_owned),
            digest.map(str::to_owned),
        )
    }

    fn parts(s: &str) -> Parts {
        let r: ImageRef = s.parse().expect("a reference");
        owned(r.registry(), r.repository(), r.tag(), r.digest())
    }

    #[test]
    fn reference_is_normalised_as_the_runtimes_do() {
        let some = |s: &str| Some(s.to_owned());
        let d = format!("sha256:{}", "f".repeat(64));
        for (input, registry, repository, tag, digest) in [
            (
                "busybox",
                "docker.io",
                "library/busybox",
                some("latest"),
                None,
            ),
            (
                "test.com:5000",
                "docker.io",
                "library/test.com",
                some("5000"),
                None,
            ),
            ("test:5000/repo", "test:5000", "repo", some("latest"), None),
            ("localhost/app:v1", "localhost", "app", some("v1"), None),
            (
                "index.docker.io/nginx",
                "docker.io",
                "library/nginx",
                some("latest"),
                None,
            ),
            ("team/app", "docker.io", "team/app", some("latest"), None),
            ("Team/app", "docker.io", "Team/app", some("latest"), None),
            (
                "a.io/b/c__d-e.f:T_1",
                "a.io",
                "b/c__d-e.f",
                some("T_1"),
                None,
            ),
            (&format!("r.io/x:t@{d}"), "r.io", "x", some("t"), some(&d)),
            (&format!("r.io:1/x@{d}"), "r.io:1", "x", None, some(&d)),
        ] {
            assert_eq!(
                parts(input),
                (registry.into(), repository.into(), tag, digest),
                "{input}"
            );
        }
        assert_eq!(
            "nginx".parse::<ImageRef>().map(|r| r.to_string()),
            Ok("docker.io/library/nginx:latest".to_owned())
        );
    }

    #[test]
    fn reference_errors_say_which_part_is_wrong() {
        for (input, error) in [
            ("", ReferenceError::Empty),
            ("App", ReferenceError::Name("App".into())),
            ("a..b", ReferenceError::Name("a..b".into())),
            ("a/b/", ReferenceError::Name("a/b/".into())),
            ("-a.io/b", ReferenceError::Name("-a.io/b".into())),
            ("a:", ReferenceError::Tag(String::new())),
            ("a:.x", ReferenceError::Tag(".x".into())),
            ("a@sha256:abc", ReferenceError::Digest("sha256:abc".into())),
            ("a@md5:0123", ReferenceError::Digest("md5:0123".into())),
        ] {
            assert_eq!(input.parse::<ImageRef>(), Err(error), "{input:?}");
        }
        let long = format!("r.io/{}", "a".repeat(256));
        assert_eq!(long.parse::<ImageRef>(), Err(ReferenceError::TooLong(256)));
        let message = "App"
            .parse::<ImageRef>()
            .expect_err("upper case")
            .to_string();
        assert!(message.contains("lower-case"), "{message}");
    }

    /// Reference-shaped strings: each part mostly well formed, sometimes wrong.
    fn references() -> impl Strategy<Value = String> {
        let re = |r: &str| proptest::string::string_regex(r).expect("a valid strategy");
        let host = prop_oneof![
            4 => re("[a-z0-9]{1,3}(\\.[a-zA-Z0-9-]{0,3}[a-z0-9]){0,2}(:[0-9]{1,4})?"),
            1 => Just("localhost".to_owned()),
            1 => re("[a-zA-Z0-9_.:-]{1,6}"),
        ];
        let component = prop_oneof![
            8 => re("[a-z0-9]{1,3}((\\.|_|__|-{1,3})[a-z0-9]{1,3})?"),
            1 => re("[a-zA-Z0-9._-]{0,4}"),
        ];
        let tag = prop_oneof![
            6 => re("[a-zA-Z0-9_][a-zA-Z0-9_.-]{0,5}"),
            1 => re("[a-zA-Z0-9_.:-]{0,4}"),
        ];
        let digest = prop_oneof![
            6 => re("sha256:[0-9a-fA-F]{64}"),
            2 => re("sha512:[0-9a-f]{128}"),
            1 => re("sha256:[0-9a-fg]{63,65}"),
            1 => re("(md5|sha384):[0-9a-f]{32}"),
        ];
        (
            proptest::option::of(host),
            proptest::collection::vec(component, 1..4),
            proptest::option::of(tag),
            proptest::option::weighted(0.3, digest),
        )
            .prop_map(|(host, path, tag, digest)| {
                let mut s = host.map(|h| format!("{h}/")).unwrap_or_default();
                s.push_str(&path.join("/"));
                if let Some(tag) = tag {
                    s.push(':');
                    s.push_str(&tag);
                }
                if let Some(digest) = digest {
                    s.push('@');
                    s.push_str(&digest);
                }
                s
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]

        /// The same verdict and the same parts as `oci-spec`'s parser (with its regular expression).
        #[test]
        fn reference_parses_as_oci_spec_does(s in references()) {
            let ours = s.parse::<ImageRef>().ok()
                .map(|r| owned(r.registry(), r.repository(), r.tag(), r.digest()));
            let theirs = s.parse::<oci_spec::distribution::Reference>().ok()
                .map(|r| owned(r.registry(), r.repository(), r.tag(), r.digest()));
            prop_assert_eq!(ours, theirs, "{}", s);
        }
    }
}
