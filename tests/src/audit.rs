//! The kube-apiserver's audit log, reduced to what the benchmark and the fault suite read: who made
//! which request, by verb and resource, when.

use jiff::Timestamp;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;

/// The audit policy: metadata of every request these identities make, nothing else.
pub fn policy(users: &[&str]) -> String {
    let users = users
        .iter()
        .map(|u| format!("\"{u}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived, ResponseStarted]\n\
         rules:\n- level: Metadata\n  users: [{users}]\n- level: None\n"
    )
}

/// The kube-apiserver arguments that write the audit log `log` with the policy in `policy_file`
/// (for `KUBE_APISERVER_EXTRA_ARGS`), rotating only past 100 GB.
pub fn apiserver_args(policy_file: &Path, log: &Path) -> Vec<String> {
    vec![
        format!("--audit-policy-file={}", policy_file.display()),
        format!("--audit-log-path={}", log.display()),
        "--audit-log-format=json".into(),
        "--audit-log-maxsize=100000".into(),
    ]
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Line {
    verb: String,
    #[serde(default)]
    user: Option<User>,
    #[serde(default)]
    object_ref: Option<ObjectRef>,
    request_received_timestamp: Timestamp,
    #[serde(default)]
    response_status: Option<Status>,
}

#[derive(Deserialize)]
struct User {
    #[serde(default)]
    username: String,
}

#[derive(Deserialize)]
struct ObjectRef {
    #[serde(default)]
    resource: Option<String>,
    #[serde(default)]
    subresource: Option<String>,
}

#[derive(Deserialize)]
struct Status {
    #[serde(default)]
    code: Option<u16>,
}

/// One request of the operator.
#[derive(Clone, Debug)]
pub struct Request {
    /// Who made it.
    pub user: String,
    /// `create`, `patch`, `delete`, `get`, `list`, `watch`, …
    pub verb: String,
    /// `pods`, `cachedimages/status`, …
    pub resource: String,
    /// HTTP status code of the answer.
    pub code: u16,
    /// When the API server received it.
    pub at: Timestamp,
}

impl Request {
    /// Whether the request changes state.
    pub fn is_write(&self) -> bool {
        matches!(
            self.verb.as_str(),
            "create" | "update" | "patch" | "delete" | "deletecollection"
        )
    }
}

/// Reads every request in the log (lines it cannot read are skipped: the log may end mid-line).
pub fn read(path: &Path) -> Vec<Request> {
    // The API server rotates its audit log (every 100 MB unless told otherwise): read the rotated
    // files (`audit-<time>.log` beside it) too.
    let mut files: Vec<std::path::PathBuf> = path
        .parent()
        .and_then(|dir| std::fs::read_dir(dir).ok())
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("audit");
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(stem) && n.ends_with(".log"))
        })
        .collect();
    files.sort();
    let text: String = files
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .collect::<Vec<_>>()
        .join("\n");
    text.lines()
        .filter_map(|l| serde_json::from_str::<Line>(l).ok())
        .map(|l| {
            let (resource, sub) = l
                .object_ref
                .map(|o| (o.resource.unwrap_or_default(), o.subresource))
                .unwrap_or_default();
            Request {
                user: l.user.map(|u| u.username).unwrap_or_default(),
                verb: l.verb,
                resource: match sub {
                    Some(s) => format!("{resource}/{s}"),
                    None => resource,
                },
                code: l.response_status.and_then(|s| s.code).unwrap_or(0),
                at: l.request_received_timestamp,
            }
        })
        .collect()
}

/// Requests received in `[from, to)`, counted by "verb resource".
pub fn by_verb(requests: &[Request], from: Timestamp, to: Timestamp) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for r in requests.iter().filter(|r| r.at >= from && r.at < to) {
        *out.entry(format!("{} {}", r.verb, r.resource)).or_insert(0) += 1;
    }
    out
}

/// Writes received in `[from, to)`.
pub fn writes(requests: &[Request], from: Timestamp, to: Timestamp) -> u64 {
    requests
        .iter()
        .filter(|r| r.at >= from && r.at < to && r.is_write())
        .count() as u64
}

/// Deletes received in `[from, to)` that found nothing (deleted twice).
pub fn deletes_not_found(requests: &[Request], from: Timestamp, to: Timestamp) -> u64 {
    requests
        .iter()
        .filter(|r| r.at >= from && r.at < to && r.verb == "delete" && r.code == 404)
        .count() as u64
}
