//! Discovery against real servers: Debian's Prometheus (backfilled with known samples) and
//! docker-registry (seeded through its HTTP API), both on loopback; and the DiscoveryPolicy controller
//! on the local control plane.

use drop::api::{
    DiscoveryPolicy, DiscoveryPolicySpec, DiscoverySource, PrometheusSource, RegistrySource,
    SourceType,
};
use drop::discovery::client::Credentials;
use drop::discovery::{FailureKind, prometheus, registry};
use e2e::fixtures::{Prometheus, Registry, closed_port};
use e2e::{DropUnderTest, cluster};
use jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube_plan::testing::eventually;
use std::time::Duration;

const NGINX: &str = "docker.io/library/nginx:1.27";
const REDIS: &str = "docker.io/library/redis:7";

fn prom(url: &str, query: &str, lookback: Option<Duration>) -> PrometheusSource {
    PrometheusSource {
        endpoint: url.into(),
        query: query.into(),
        lookback: lookback.map(Into::into),
        ..PrometheusSource::default()
    }
}

fn reg(url: &str, repos: &[&str]) -> RegistrySource {
    RegistrySource {
        url: url.into(),
        repositories: repos.iter().map(|r| r.to_string()).collect(),
        ..RegistrySource::default()
    }
}

#[tokio::test]
async fn discovery_prometheus_instant_and_range_scores_are_exact() {
    kube_plan::install_crypto_provider();
    let now = Timestamp::now().as_second() / 60 * 60;
    let p = Prometheus::start(&[(NGINX, 3.0), (REDIS, 5.0)], now).await;
    let at = Timestamp::from_second(now).unwrap();
    let none = Credentials::default();

    // Instant query: the value is the score. The endpoint's /prom base path is kept.
    let instant = prometheus::query(&prom(&p.url, "drop_test_image_runs", None), &none, at)
        .await
        .unwrap();
    assert_eq!(instant.get(NGINX), Some(&3));
    assert_eq!(instant.get(REDIS), Some(&5));

    // Range query over 1 h at the default 5 m step: 13 points, summed.
    let range = prometheus::query(
        &prom(
            &p.url,
            "drop_test_image_runs",
            Some(Duration::from_secs(3600)),
        ),
        &none,
        at,
    )
    .await
    .unwrap();
    assert_eq!(range.get(NGINX), Some(&39));
    assert_eq!(range.get(REDIS), Some(&65));

    // Aggregations keep the label; results without an image label are skipped.
    let summed = prometheus::query(
        &prom(&p.url, "sum by (image) (drop_test_image_runs) * 2", None),
        &none,
        at,
    )
    .await
    .unwrap();
    assert_eq!(summed.get(NGINX), Some(&6));
    let unlabelled = prometheus::query(&prom(&p.url, "sum(drop_test_image_runs)", None), &none, at)
        .await
        .unwrap();
    assert!(unlabelled.is_empty());

    // A query error is reported as such.
    let err = prometheus::query(&prom(&p.url, "sum(", None), &none, at)
        .await
        .unwrap_err();
    assert!(
        err.message.contains("query failed") || err.message.contains("HTTP 400"),
        "{err}"
    );
    // The wrong base path is a clear not-found.
    let err = prometheus::query(
        &prom(&p.url.replace("/prom", "/other"), "up", None),
        &none,
        at,
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind, FailureKind::RepositoryNotFound, "{err}");
}

#[tokio::test]
async fn discovery_registry_lists_tags_with_filter_topx_and_template() {
    kube_plan::install_crypto_provider();
    let r = Registry::start().await;
    for tag in ["v1.0.0", "v1.1.0", "v2.0.0", "edge"] {
        r.push("test/myapp", tag).await;
    }
    r.push("test/other", "latest").await;
    let none = Credentials::default();

    let all = registry::list(&reg(&r.url, &["test/myapp", "test/other"]), &none)
        .await
        .unwrap();
    let mut images: Vec<&String> = all.keys().collect();
    images.sort();
    let h = r.host();
    assert_eq!(
        images,
        vec![
            &format!("{h}/test/myapp:edge"),
            &format!("{h}/test/myapp:v1.0.0"),
            &format!("{h}/test/myapp:v1.1.0"),
            &format!("{h}/test/myapp:v2.0.0"),
            &format!("{h}/test/other:latest"),
        ]
    );

    let mut src = reg(&r.url, &["test/myapp"]);
    src.tag_filter = Some("^v".into());
    src.top_x = Some(2);
    src.image_template = Some("mirror.local/{{.Repository}}:{{.Tag}}".into());
    let some = registry::list(&src, &none).await.unwrap();
    assert_eq!(some.len(), 2, "the last 2 matching tags: {some:?}");
    assert!(
        some.keys()
            .all(|i| i.starts_with("mirror.local/test/myapp:v")),
        "{some:?}"
    );
    assert_eq!(
        some.values()
            .copied()
            .collect::<std::collections::BTreeSet<_>>(),
        [1, 2].into_iter().collect()
    );

    // A repository that does not exist.
    let err = registry::list(&reg(&r.url, &["this/does-not-exist"]), &none)
        .await
        .unwrap_err();
    assert_eq!(err.kind, FailureKind::RepositoryNotFound);
    assert!(
        err.message.contains("\"this/does-not-exist\" not found"),
        "{err}"
    );
}

#[tokio::test]
async fn discovery_failures_are_classified_against_real_conditions() {
    kube_plan::install_crypto_provider();
    let none = Credentials::default();
    let dns = registry::list(
        &reg("http://nonexistent-registry.invalid:5000", &["a"]),
        &none,
    )
    .await
    .unwrap_err();
    assert_eq!(dns.kind, FailureKind::DnsError, "{dns}");
    let refused = registry::list(
        &reg(&format!("http://127.0.0.1:{}", closed_port()), &["a"]),
        &none,
    )
    .await
    .unwrap_err();
    assert_eq!(refused.kind, FailureKind::ConnectionRefused, "{refused}");
    let at = Timestamp::now();
    let refused = prometheus::query(
        &prom(&format!("http://127.0.0.1:{}", closed_port()), "up", None),
        &none,
        at,
    )
    .await
    .unwrap_err();
    assert_eq!(refused.kind, FailureKind::ConnectionRefused, "{refused}");
    // A server that answers with something that is not the API.
    let r = Registry::start().await;
    let wrong = prometheus::query(&prom(&format!("{}/v2", r.url), "up", None), &none, at)
        .await
        .unwrap_err();
    assert!(
        matches!(
            wrong.kind,
            FailureKind::InvalidResponse | FailureKind::RepositoryNotFound
        ),
        "{wrong}"
    );
}

fn source_prom(url: &str) -> DiscoverySource {
    DiscoverySource {
        type_: SourceType::Prometheus,
        prometheus: Some(prom(url, "drop_test_image_runs", None)),
        registry: None,
        secret_ref: None,
    }
}

fn source_reg(url: &str, repo: &str) -> DiscoverySource {
    DiscoverySource {
        type_: SourceType::Registry,
        prometheus: None,
        registry: Some(reg(url, &[repo])),
        secret_ref: None,
    }
}

fn ready(dp: &DiscoveryPolicy) -> (String, String) {
    dp.status
        .as_ref()
        .and_then(|s| kube_plan::conditions::get(&s.conditions, "Ready"))
        .map(|c| (c.reason.clone(), c.message.clone()))
        .unwrap_or_default()
}

/// Waits until the policy's Ready condition has `reason`, and returns the policy.
async fn wait_reason(policies: &Api<DiscoveryPolicy>, name: &str, reason: &str) -> DiscoveryPolicy {
    eventually(Duration::from_secs(30), reason, || async {
        let dp = policies.get(name).await.map_err(|e| e.to_string())?;
        if ready(&dp).0 == reason {
            Ok(dp)
        } else {
            Err(format!("{:?}", dp.status))
        }
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn discovery_policy_controller_publishes_refreshes_and_reports_failures() {
    let (cluster, client) = cluster().await.unwrap();
    let ns = cluster.namespace(&client, "discovery").await.unwrap();
    let p = Prometheus::start(&[(NGINX, 3.0), (REDIS, 5.0)], Timestamp::now().as_second()).await;
    let r = Registry::start().await;
    r.push("test/myapp", "v1").await;
    let drop = DropUnderTest::start(&client, ns.name(), ns.name()).await;
    let policies: Api<DiscoveryPolicy> = Api::all(client.clone());
    let create = |name: String, sources: Vec<DiscoverySource>, max: i32| {
        let mut dp = DiscoveryPolicy::new(
            &name,
            DiscoveryPolicySpec {
                sources,
                sync_interval: Some(Duration::from_secs(10).into()),
                max_images: max,
                ..DiscoveryPolicySpec::default()
            },
        );
        dp.metadata.labels = Some(drop.labels());
        dp
    };
    let good = format!("{}-good", ns.name());
    let dp = create(
        good.clone(),
        vec![source_prom(&p.url), source_reg(&r.url, "test/myapp")],
        10,
    );
    eventually(Duration::from_secs(30), "policy created", || async {
        policies
            .create(&PostParams::default(), &dp)
            .await
            .map_err(|e| e.to_string())
    })
    .await
    .unwrap();
    let dp = wait_reason(&policies, &good, "Synced").await;
    let st = dp.status.unwrap();
    let images: Vec<(String, i64)> = st
        .discovered_images
        .iter()
        .map(|d| (d.image.clone(), d.score))
        .collect();
    assert_eq!(
        images,
        vec![
            (REDIS.into(), 5),
            (NGINX.into(), 3),
            (format!("{}/test/myapp:v1", r.host()), 1)
        ]
    );
    assert_eq!((st.image_count, st.source_count), (3, 2));
    assert!(st.last_sync_time.is_some());
    assert_eq!(
        ready(&policies.get(&good).await.unwrap()).1,
        "Discovered 3 images"
    );

    // A new tag appears in the registry: the next sync (10 s, the least allowed) publishes it.
    r.push("test/myapp", "v2").await;
    eventually(
        Duration::from_secs(30),
        "refreshed on syncInterval",
        || async {
            let dp = policies.get(&good).await.map_err(|e| e.to_string())?;
            let n = dp.status.map(|s| s.image_count).unwrap_or(0);
            if n == 4 {
                Ok(())
            } else {
                Err(format!("{n} images"))
            }
        },
    )
    .await
    .unwrap();

    // One of two sources down: partial failure, the healthy source's images kept.
    let partial = format!("{}-partial", ns.name());
    let dead = format!("http://127.0.0.1:{}", closed_port());
    policies
        .create(
            &PostParams::default(),
            &create(
                partial.clone(),
                vec![source_prom(&p.url), source_reg(&dead, "x")],
                10,
            ),
        )
        .await
        .unwrap();
    let dp = wait_reason(&policies, &partial, "PartiallyFailed").await;
    assert_eq!(dp.status.as_ref().unwrap().image_count, 2);
    assert_eq!(
        ready(&dp).1,
        "Discovered 2 images, but some sources failed: 1"
    );
    let health =
        kube_plan::conditions::get(&dp.status.as_ref().unwrap().conditions, "SourcesHealthy")
            .unwrap();
    assert_eq!(health.reason, "ConnectionRefused");

    // A policy whose only source does not resolve: Ready says DNSError (the failure class, as the
    // seed's broken sample), the message names the source and says nothing was discovered yet.
    let broken = format!("{}-broken", ns.name());
    policies
        .create(
            &PostParams::default(),
            &create(
                broken.clone(),
                vec![source_reg(
                    "http://nonexistent-registry.invalid:5000",
                    "test/nope",
                )],
                10,
            ),
        )
        .await
        .unwrap();
    let dp = wait_reason(&policies, &broken, "DNSError").await;
    let message = ready(&dp).1;
    assert!(
        message.starts_with("registry http://nonexistent-registry.invalid:5000: ")
            && message.ends_with("(no images discovered yet)"),
        "{message}"
    );
    let health =
        kube_plan::conditions::get(&dp.status.as_ref().unwrap().conditions, "SourcesHealthy")
            .unwrap();
    assert_eq!(health.reason, "DNSError");

    // maxImages caps the list, lowest scores dropped.
    let capped = format!("{}-capped", ns.name());
    policies
        .create(
            &PostParams::default(),
            &create(capped.clone(), vec![source_prom(&p.url)], 1),
        )
        .await
        .unwrap();
    let dp = wait_reason(&policies, &capped, "Synced").await;
    let only: Vec<String> = dp
        .status
        .unwrap()
        .discovered_images
        .into_iter()
        .map(|d| d.image)
        .collect();
    assert_eq!(only, vec![REDIS.to_owned()]);

    // imageFilter keeps only matching references, across sources.
    let filtered = format!("{}-filtered", ns.name());
    let mut f = create(
        filtered.clone(),
        vec![source_prom(&p.url), source_reg(&r.url, "test/myapp")],
        10,
    );
    f.spec.image_filter = Some("(nginx|myapp:v2)".into());
    policies.create(&PostParams::default(), &f).await.unwrap();
    let dp = wait_reason(&policies, &filtered, "Synced").await;
    let kept: Vec<String> = dp
        .status
        .unwrap()
        .discovered_images
        .into_iter()
        .map(|d| d.image)
        .collect();
    assert_eq!(
        kept,
        vec![NGINX.to_owned(), format!("{}/test/myapp:v2", r.host())]
    );
    drop.stop().await;
    for name in [good, partial, broken, capped, filtered] {
        let _ = policies.delete(&name, &Default::default()).await;
    }
}

fn secret(pairs: &[(&str, Vec<u8>)]) -> Credentials {
    let data = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), k8s_openapi::ByteString(v.clone())))
        .collect();
    Credentials::from_secret("registry-creds", &data).unwrap()
}

#[tokio::test]
async fn discovery_registry_with_custom_ca_client_certificate_and_basic_auth() {
    kube_plan::install_crypto_provider();
    let pki = e2e::fixtures::Pki::generate();
    let r = Registry::start_secured(&pki, "drop", "s3cret").await;
    r.push("team/app", "v1").await;
    let src = reg(&r.url, &["team/app"]);
    let ca = ("ca.crt", pki.read("ca.crt"));
    let cert = ("tls.crt", pki.read("client.crt"));
    let key = ("tls.key", pki.read("client.key"));
    let user = ("username", b"drop".to_vec());

    // Everything right: CA trusted, client certificate presented, password accepted.
    let ok = registry::list(
        &src,
        &secret(&[
            ca.clone(),
            cert.clone(),
            key.clone(),
            user.clone(),
            ("password", b"s3cret".to_vec()),
        ]),
    )
    .await
    .unwrap();
    assert_eq!(
        ok.keys().collect::<Vec<_>>(),
        vec![&format!("{}/team/app:v1", r.host())]
    );

    // The registry's CA is not trusted: a TLS failure.
    let e = registry::list(&src, &Credentials::default())
        .await
        .unwrap_err();
    assert_eq!(e.kind, FailureKind::TlsError, "{e}");
    // Trusted, but no client certificate: the server refuses the handshake.
    let e = registry::list(&src, &secret(std::slice::from_ref(&ca)))
        .await
        .unwrap_err();
    assert!(
        matches!(e.kind, FailureKind::TlsError | FailureKind::SourceError),
        "{e:?}"
    );
    // TLS right, wrong password: 401, an auth failure.
    let e = registry::list(
        &src,
        &secret(&[ca, cert, key, user, ("password", b"wrong".to_vec())]),
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind, FailureKind::Unauthorized, "{e}");
}

fn tags(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("t{i:02}")).collect()
}

#[tokio::test]
async fn discovery_registry_follows_pagination_and_keeps_the_last_tags() {
    kube_plan::install_crypto_provider();
    use e2e::fixtures::{FakeRegistry, FakeRegistryConfig};
    let f = FakeRegistry::start(FakeRegistryConfig {
        tags: tags(8),
        page_size: 3,
        ..Default::default()
    })
    .await;
    let host = f.url.trim_start_matches("http://").to_owned();
    let all = registry::list(&reg(&f.url, &["team/app"]), &Credentials::default())
        .await
        .unwrap();
    assert_eq!(all.len(), 8, "three pages followed: {all:?}");
    let mut src = reg(&f.url, &["team/app"]);
    src.top_x = Some(2);
    let last: Vec<(String, i64)> = registry::list(&src, &Credentials::default())
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(
        last,
        vec![
            (format!("{host}/team/app:t06"), 1),
            (format!("{host}/team/app:t07"), 2)
        ],
        "the last 2 as returned, across pages"
    );
}

#[tokio::test]
async fn discovery_registry_bearer_token_flow_and_extra_headers() {
    kube_plan::install_crypto_provider();
    use e2e::fixtures::{FakeRegistry, FakeRegistryConfig};
    let f = FakeRegistry::start(FakeRegistryConfig {
        tags: tags(2),
        token_for: Some(("robot".into(), "pw".into())),
        required_header: Some(("x-org".into(), "drop".into())),
        ..Default::default()
    })
    .await;
    let src = reg(&f.url, &["team/app"]);
    let good = secret(&[
        ("username", b"robot".to_vec()),
        ("password", b"pw".to_vec()),
        ("headers.X-Org", b"drop".to_vec()),
    ]);
    assert_eq!(
        registry::list(&src, &good).await.unwrap().len(),
        2,
        "challenge, token, retry"
    );
    let bad_pw = secret(&[
        ("username", b"robot".to_vec()),
        ("password", b"no".to_vec()),
        ("headers.X-Org", b"drop".to_vec()),
    ]);
    let e = registry::list(&src, &bad_pw).await.unwrap_err();
    assert_eq!(e.kind, FailureKind::Unauthorized, "{e}");
    assert!(
        e.message.contains("/token"),
        "the token endpoint refused: {e}"
    );
    let no_header = secret(&[
        ("username", b"robot".to_vec()),
        ("password", b"pw".to_vec()),
    ]);
    let e = registry::list(&src, &no_header).await.unwrap_err();
    assert_eq!(
        e.kind,
        FailureKind::Unauthorized,
        "403 without the required header: {e}"
    );
}

#[tokio::test]
async fn discovery_huge_answers_are_cut_off() {
    kube_plan::install_crypto_provider();
    use e2e::fixtures::{FakeRegistry, FakeRegistryConfig};
    let f = FakeRegistry::start(FakeRegistryConfig::default()).await;
    let e = registry::list(&reg(&f.url, &["huge"]), &Credentials::default())
        .await
        .unwrap_err();
    assert_eq!(e.kind, FailureKind::ResponseTooLarge, "{e}");
}

#[tokio::test]
async fn discovery_slow_answers_time_out() {
    kube_plan::install_crypto_provider();
    use e2e::fixtures::{FakeRegistry, FakeRegistryConfig};
    let f = FakeRegistry::start(FakeRegistryConfig {
        tags: tags(1),
        ..Default::default()
    })
    .await;
    let started = std::time::Instant::now();
    let e = registry::list(&reg(&f.url, &["slow"]), &Credentials::default())
        .await
        .unwrap_err();
    assert_eq!(e.kind, FailureKind::Timeout, "{e}");
    println!("timed out after {:.1}s", started.elapsed().as_secs_f64());
}

#[tokio::test]
async fn discovery_prometheus_with_custom_ca_client_certificate_and_basic_auth() {
    kube_plan::install_crypto_provider();
    let pki = e2e::fixtures::Pki::generate();
    let now = Timestamp::now().as_second() / 60 * 60;
    let p = Prometheus::start_secured(&[(NGINX, 4.0)], now, &pki, "drop", "s3cret").await;
    let src = prom(&p.url, "drop_test_image_runs", None);
    let at = Timestamp::from_second(now).unwrap();
    let (ca, cert, key) = (
        ("ca.crt", pki.read("ca.crt")),
        ("tls.crt", pki.read("client.crt")),
        ("tls.key", pki.read("client.key")),
    );
    let user = ("username", b"drop".to_vec());

    let ok = prometheus::query(
        &src,
        &secret(&[
            ca.clone(),
            cert.clone(),
            key.clone(),
            user.clone(),
            ("password", b"s3cret".to_vec()),
        ]),
        at,
    )
    .await
    .unwrap();
    assert_eq!(ok.get(NGINX), Some(&4));
    let e = prometheus::query(&src, &Credentials::default(), at)
        .await
        .unwrap_err();
    assert_eq!(e.kind, FailureKind::TlsError, "untrusted CA: {e}");
    let e = prometheus::query(
        &src,
        &secret(&[ca, cert, key, user, ("password", b"wrong".to_vec())]),
        at,
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind, FailureKind::Unauthorized, "{e}");
}

/// The source's secret values, to look for in what reached another origin.
fn credentials_with_secrets() -> Credentials {
    secret(&[
        ("username", b"robot".to_vec()),
        ("password", b"s3cret-pw".to_vec()),
        ("headers.X-Api-Key", b"s3cret-header".to_vec()),
    ])
}

/// Fails if `spy` received any request, or any request carrying a secret value.
fn assert_nothing_reached(spy: &e2e::fixtures::FakeRegistry) {
    let seen = spy.seen.lock().unwrap().clone();
    let leaked: Vec<_> = seen
        .iter()
        .filter(|(_, headers)| {
            headers.iter().any(|h| {
                let h = h.to_lowercase();
                h.starts_with("authorization") || h.contains("s3cret")
            })
        })
        .collect();
    assert!(
        leaked.is_empty(),
        "credentials reached another origin: {leaked:?}"
    );
    assert!(
        seen.is_empty(),
        "a request reached another origin: {seen:?}"
    );
}

#[tokio::test]
async fn discovery_credentials_pagination_to_another_origin_is_not_followed() {
    kube_plan::install_crypto_provider();
    use e2e::fixtures::{FakeRegistry, FakeRegistryConfig};
    let spy = FakeRegistry::start(FakeRegistryConfig::default()).await;
    let f = FakeRegistry::start(FakeRegistryConfig {
        tags: tags(4),
        page_size: 2,
        link_origin: Some(spy.url.clone()),
        ..Default::default()
    })
    .await;
    let e = registry::list(&reg(&f.url, &["team/app"]), &credentials_with_secrets())
        .await
        .unwrap_err();
    assert!(e.message.contains("another origin"), "{e}");
    assert_nothing_reached(&spy);
}

#[tokio::test]
async fn discovery_credentials_basic_are_not_sent_to_a_plain_http_realm_elsewhere() {
    kube_plan::install_crypto_provider();
    use e2e::fixtures::{FakeRegistry, FakeRegistryConfig};
    let spy = FakeRegistry::start(FakeRegistryConfig::default()).await;
    let f = FakeRegistry::start(FakeRegistryConfig {
        tags: tags(2),
        token_for: Some(("robot".into(), "s3cret-pw".into())),
        realm: Some(format!("{}/token", spy.url)),
        ..Default::default()
    })
    .await;
    let e = registry::list(&reg(&f.url, &["team/app"]), &credentials_with_secrets())
        .await
        .unwrap_err();
    assert!(
        e.message.contains("neither HTTPS nor the registry itself"),
        "{e}"
    );
    assert_nothing_reached(&spy);
}

#[tokio::test]
async fn discovery_credentials_and_headers_do_not_follow_a_redirect_to_another_origin() {
    kube_plan::install_crypto_provider();
    use e2e::fixtures::{FakeRegistry, FakeRegistryConfig};
    let spy = FakeRegistry::start(FakeRegistryConfig {
        tags: tags(2),
        ..Default::default()
    })
    .await;
    let f = FakeRegistry::start(FakeRegistryConfig {
        redirect_to: Some(spy.url.clone()),
        ..Default::default()
    })
    .await;
    let e = registry::list(&reg(&f.url, &["team/app"]), &credentials_with_secrets())
        .await
        .unwrap_err();
    assert!(e.message.contains("redirect to another origin"), "{e}");
    assert_nothing_reached(&spy);
}

#[tokio::test]
async fn discovery_secrets_never_appear_in_logs_events_status_or_metrics() {
    use e2e::fixtures::{FakeRegistry, FakeRegistryConfig};
    use k8s_openapi::api::core::v1::{Event, Secret};
    kube_plan::install_crypto_provider();
    let (cluster, client) = cluster().await.unwrap();
    let ns = cluster
        .namespace(&client, "discovery-secrets")
        .await
        .unwrap();
    // Known secret values: a password, a header value, a token of the Secret, and the token the
    // registry issues.
    const PASSWORD: &str = "pw-7f3a9c-secret";
    const HEADER: &str = "hdr-51be0d-secret";
    const TOKEN: &str = "tok-c28e44-secret";
    const ISSUED: &str = "fake-token-123";
    let f = FakeRegistry::start(FakeRegistryConfig {
        tags: tags(2),
        token_for: Some(("robot".into(), PASSWORD.into())),
        required_header: Some(("x-api-key".into(), HEADER.into())),
        ..Default::default()
    })
    .await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns.name());
    let make_secret = |name: &str, password: &str| {
        let mut s = Secret::default();
        s.metadata.name = Some(name.into());
        s.string_data = Some(
            [
                ("username", "robot"),
                ("password", password),
                ("headers.X-Api-Key", HEADER),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        );
        s
    };
    secrets
        .create(&PostParams::default(), &make_secret("good", PASSWORD))
        .await
        .unwrap();
    // The same secrets, refused: the error path must not print them either.
    secrets
        .create(
            &PostParams::default(),
            &make_secret("wrong", &format!("{TOKEN}-wrong")),
        )
        .await
        .unwrap();

    e2e::install_drop_crds(&client).await.unwrap();
    let command = e2e::chaos::DropCommand {
        program: std::path::PathBuf::from(env!("CARGO_BIN_EXE_drop-process")),
        kubeconfig: cluster.kubeconfig().to_owned(),
        namespace: ns.name().to_owned(),
        id: ns.name().to_owned(),
        dir: e2e::chaos::log_dir("discovery-secrets"),
        extra: Vec::new(),
        log_filter: "debug".into(),
    };
    let process = command.spawn(0);
    let policies: Api<DiscoveryPolicy> = Api::all(client.clone());
    let labels =
        std::collections::BTreeMap::from([(e2e::TEST_LABEL.to_owned(), ns.name().to_owned())]);
    for (name, secret) in [("good", "good"), ("wrong", "wrong")] {
        let mut source = source_reg(&f.url, "team/app");
        source.secret_ref = Some(k8s_openapi::api::core::v1::LocalObjectReference {
            name: secret.into(),
        });
        let mut dp = DiscoveryPolicy::new(
            &format!("{}-{name}", ns.name()),
            DiscoveryPolicySpec {
                sources: vec![source],
                ..DiscoveryPolicySpec::default()
            },
        );
        dp.metadata.labels = Some(labels.clone());
        policies.create(&PostParams::default(), &dp).await.unwrap();
    }
    let good = wait_reason(&policies, &format!("{}-good", ns.name()), "Synced").await;
    assert_eq!(good.status.as_ref().unwrap().image_count, 2);
    let wrong = wait_reason(&policies, &format!("{}-wrong", ns.name()), "Unauthorized").await;

    // Everything a user or a log collector can read.
    let mut searched: Vec<(String, String)> = Vec::new();
    searched.push((
        "operator log (debug)".into(),
        std::fs::read_to_string(&process.log).unwrap(),
    ));
    for dp in [&good, &wrong] {
        searched.push((
            format!(
                "status of {}",
                dp.metadata.name.as_deref().unwrap_or_default()
            ),
            serde_json::to_string(&dp.status).unwrap(),
        ));
    }
    let events: Api<Event> = Api::all(client.clone());
    searched.push((
        "every Event".into(),
        serde_json::to_string(&events.list(&Default::default()).await.unwrap().items).unwrap(),
    ));
    searched.push((
        "/metrics".into(),
        reqwest::get(format!("http://{}/metrics", process.http))
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    ));
    for (place, text) in &searched {
        for secret in [PASSWORD, HEADER, TOKEN, ISSUED] {
            assert!(!text.contains(secret), "{secret:?} appears in {place}");
        }
    }
    println!(
        "searched for 4 secret values in: {}",
        searched
            .iter()
            .map(|(p, t)| format!("{p} ({} bytes)", t.len()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    process.kill();
}
