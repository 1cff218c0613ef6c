//! Security contexts that meet the Pod Security Standards' **restricted** profile, the one a
//! namespace labelled `pod-security.kubernetes.io/enforce: restricted` demands of every Pod.
//!
//! The profile asks, of every container: not running as root, no privilege escalation, all
//! capabilities dropped, and a seccomp profile (`RuntimeDefault` here, set on the Pod). A child
//! Pod or Pod template built with these two passes admission there.
//!
//! ```
//! use k8s_openapi::api::core::v1::{Container, PodSpec};
//! use kube_plan::security;
//!
//! let spec = PodSpec {
//!     containers: vec![Container {
//!         name: "app".into(),
//!         security_context: Some(security::restricted_container(Some(1001))),
//!         ..Container::default()
//!     }],
//!     security_context: Some(security::restricted_pod()),
//!     ..PodSpec::default()
//! };
//! let c = spec.containers[0].security_context.as_ref().unwrap();
//! assert_eq!(c.allow_privilege_escalation, Some(false));
//! ```

use k8s_openapi::api::core::v1::{
    Capabilities, PodSecurityContext, SeccompProfile, SecurityContext,
};

/// A container's part: non-root (as `run_as_user` when given; the image's user must then not be
/// root), no privilege escalation, every capability dropped.
pub fn restricted_container(run_as_user: Option<i64>) -> SecurityContext {
    SecurityContext {
        run_as_non_root: Some(true),
        run_as_user,
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: None,
        }),
        ..SecurityContext::default()
    }
}

/// The Pod's part: non-root, and the container runtime's default seccomp profile.
pub fn restricted_pod() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            localhost_profile: None,
        }),
        ..PodSecurityContext::default()
    }
}
