//! The framework's example operator on the local control plane: children applied with owner
//! references, status from the children, spec changes followed, garbage collection, and a child
//! controlled by someone else left alone.

use e2e::cluster;
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube_plan::controller::CHILD_CONFLICT;
use kube_plan::testing::eventually;
use kube_plan::{Controller, Operator};
use memcached_operator::{Memcached, MemcachedReconciler, MemcachedSpec};
use std::time::Duration;

fn ready(m: &Memcached) -> bool {
    m.status
        .as_ref()
        .is_some_and(|s| kube_plan::conditions::is_true(&s.conditions, "Ready"))
}

/// The Memcached operator, watching only `ns`, optionally campaigning for a Lease as `identity`.
fn operator_in(ns: &str, client: &kube::Client, identity: Option<&str>) -> Operator {
    let op = Operator::new("memcached-e2e", client.clone())
        .install_crds(vec![kube_plan::crd::build::<Memcached>()])
        .controller(
            Controller::new("memcached", MemcachedReconciler)
                .owns::<Deployment>()
                .primary_watch(
                    watcher::Config::default().fields(&format!("metadata.namespace={ns}")),
                ),
        );
    match identity {
        Some(id) => op.leader_election(kube_plan::LeaderElection::new("memcached-e2e", ns, id)),
        None => op,
    }
}

#[tokio::test]
async fn memcached_deployment_follows_the_spec_and_is_collected() {
    let (cluster, client) = cluster().await.unwrap();
    let ns = cluster.namespace(&client, "memcached").await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let operator = operator_in(ns.name(), &client, None);
    let running = tokio::spawn(operator.run_until(async move {
        let _ = stopped.await;
    }));

    let caches: Api<Memcached> = Api::namespaced(client.clone(), ns.name());
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns.name());
    let create = || async {
        caches
            .create(
                &PostParams::default(),
                &Memcached::new("cache", MemcachedSpec { size: 2 }),
            )
            .await
    };
    // The operator installs the CRD; creating before it is established is refused, so retry.
    let m = eventually(Duration::from_secs(30), "Memcached created", || async {
        create().await.map_err(|e| e.to_string())
    })
    .await
    .unwrap();

    let d = eventually(
        Duration::from_secs(30),
        "Deployment with 2 replicas",
        || async {
            let d = deployments
                .get_opt("cache")
                .await
                .map_err(|e| e.to_string())?
                .ok_or("absent")?;
            if d.spec.replicas == Some(2) {
                Ok(d)
            } else {
                Err(format!("replicas {:?}", d.spec.replicas))
            }
        },
    )
    .await
    .unwrap();
    let owner = &d.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.controller),
        ("Memcached", Some(true))
    );
    assert_eq!(Some(&owner.uid), m.metadata.uid.as_ref());

    eventually(Duration::from_secs(60), "Memcached Ready", || async {
        let m = caches.get("cache").await.map_err(|e| e.to_string())?;
        if ready(&m) {
            Ok(())
        } else {
            Err(format!("{:?}", m.status))
        }
    })
    .await
    .unwrap();

    caches
        .patch(
            "cache",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"size": 3}})),
        )
        .await
        .unwrap();
    eventually(
        Duration::from_secs(60),
        "3 replicas available and Ready",
        || async {
            let d = deployments.get("cache").await.map_err(|e| e.to_string())?;
            let m = caches.get("cache").await.map_err(|e| e.to_string())?;
            let avail = d.status.and_then(|s| s.available_replicas);
            if avail == Some(3) && ready(&m) {
                Ok(())
            } else {
                Err(format!("available {avail:?}"))
            }
        },
    )
    .await
    .unwrap();

    caches
        .delete("cache", &DeleteParams::default())
        .await
        .unwrap();
    eventually(
        Duration::from_secs(60),
        "Deployment garbage-collected",
        || async {
            match deployments
                .get_opt("cache")
                .await
                .map_err(|e| e.to_string())?
            {
                None => Ok(()),
                Some(_) => Err("still there".to_owned()),
            }
        },
    )
    .await
    .unwrap();

    let _ = stop.send(());
    running.await.unwrap().unwrap();
}

#[tokio::test]
async fn memcached_foreign_deployment_is_left_alone_and_reported() {
    let (cluster, client) = cluster().await.unwrap();
    let ns = cluster
        .namespace(&client, "memcached-foreign")
        .await
        .unwrap();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns.name());
    // Someone else's Deployment, with the name the operator would use.
    let mut foreign =
        memcached_operator::deployment(&Memcached::new("taken", MemcachedSpec { size: 1 }));
    foreign.metadata.namespace = Some(ns.name().to_owned());
    deployments
        .create(&PostParams::default(), &foreign)
        .await
        .unwrap();

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let operator = operator_in(ns.name(), &client, None);
    let running = tokio::spawn(operator.run_until(async move {
        let _ = stopped.await;
    }));
    let caches: Api<Memcached> = Api::namespaced(client.clone(), ns.name());
    eventually(Duration::from_secs(30), "Memcached created", || async {
        caches
            .create(
                &PostParams::default(),
                &Memcached::new("taken", MemcachedSpec { size: 3 }),
            )
            .await
            .map_err(|e| e.to_string())
    })
    .await
    .unwrap();
    let message = eventually(
        Duration::from_secs(30),
        "ChildConflict reported",
        || async {
            let m = caches.get("taken").await.map_err(|e| e.to_string())?;
            let conds = m.status.map(|s| s.conditions).unwrap_or_default();
            kube_plan::conditions::get(&conds, CHILD_CONFLICT)
                .map(|c| c.message.clone())
                .ok_or("no conflict yet".to_owned())
        },
    )
    .await
    .unwrap();
    assert!(message.contains("Deployment"), "{message}");
    let d = deployments.get("taken").await.unwrap();
    assert_eq!(
        d.spec.replicas,
        Some(1),
        "the foreign Deployment keeps its size"
    );
    assert!(d.metadata.owner_references.is_none(), "and is not adopted");

    let _ = stop.send(());
    running.await.unwrap().unwrap();
}

#[tokio::test]
async fn memcached_leader_election_hands_over_on_shutdown() {
    use k8s_openapi::api::coordination::v1::Lease;
    let (cluster, client) = cluster().await.unwrap();
    let ns = cluster
        .namespace(&client, "memcached-leader")
        .await
        .unwrap();
    let mut stops = std::collections::BTreeMap::new();
    let mut runs = std::collections::BTreeMap::new();
    for id in ["replica-a", "replica-b"] {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let op = operator_in(ns.name(), &client, Some(id));
        runs.insert(
            id,
            tokio::spawn(op.run_until(async move {
                let _ = stopped.await;
            })),
        );
        stops.insert(id, stop);
    }
    let leases: Api<Lease> = Api::namespaced(client.clone(), ns.name());
    let holder = || async {
        leases
            .get_opt("memcached-e2e")
            .await
            .map_err(|e| e.to_string())?
            .and_then(|l| l.spec)
            .and_then(|s| s.holder_identity)
            .filter(|h| !h.is_empty())
            .ok_or("no holder".to_owned())
    };
    let leader = eventually(Duration::from_secs(30), "a leader", holder)
        .await
        .unwrap();
    let standby = if leader == "replica-a" {
        "replica-b"
    } else {
        "replica-a"
    };

    let caches: Api<Memcached> = Api::namespaced(client.clone(), ns.name());
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns.name());
    eventually(Duration::from_secs(30), "Memcached created", || async {
        caches
            .create(
                &PostParams::default(),
                &Memcached::new("ha", MemcachedSpec { size: 1 }),
            )
            .await
            .map_err(|e| e.to_string())
    })
    .await
    .unwrap();
    let replicas = |n: i32| {
        let deployments = deployments.clone();
        move || {
            let deployments = deployments.clone();
            async move {
                let d = deployments
                    .get_opt("ha")
                    .await
                    .map_err(|e| e.to_string())?
                    .ok_or("absent".to_owned())?;
                if d.spec.replicas == Some(n) {
                    Ok(())
                } else {
                    Err(format!("replicas {:?}", d.spec.replicas))
                }
            }
        }
    };
    eventually(
        Duration::from_secs(30),
        "Deployment by the leader",
        replicas(1),
    )
    .await
    .unwrap();

    // The leader shuts down cleanly: it releases the lease and the standby takes over.
    let started = std::time::Instant::now();
    let _ = stops.remove(leader.as_str()).unwrap().send(());
    runs.remove(leader.as_str())
        .unwrap()
        .await
        .unwrap()
        .unwrap();
    eventually(Duration::from_secs(30), "the standby leads", || async {
        let h = holder().await?;
        if h == standby {
            Ok(())
        } else {
            Err(format!("holder {h}"))
        }
    })
    .await
    .unwrap();
    println!("leadership handed over in {:?}", started.elapsed());
    caches
        .patch(
            "ha",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"size": 2}})),
        )
        .await
        .unwrap();
    eventually(
        Duration::from_secs(30),
        "the new leader reconciles",
        replicas(2),
    )
    .await
    .unwrap();

    let _ = stops.remove(standby).unwrap().send(());
    runs.remove(standby).unwrap().await.unwrap().unwrap();
}
