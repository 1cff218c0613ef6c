//! The kubebuilder CronJob example on the local control plane: Jobs on schedule (kube-controller-
//! manager's Job controller runs them, KWOK's simulated kubelet completes their Pods), history
//! trimmed, and `suspend`, `startingDeadlineSeconds`, `Forbid` and `Replace` honoured.
//!
//! Schedules carry a seconds field (every 2 s) so that a test sees several runs in seconds. What
//! must *not* happen is shown against a witness: a CronJob with the same schedule that runs freely,
//! so "no Job" means "no Job while the witness ran three".

use cronjob_operator::{ConcurrencyPolicy, CronJob, CronJobReconciler, CronJobSpec, SCHEDULED_AT};
use e2e::cluster;
use k8s_openapi::api::batch::v1::{Job, JobSpec, JobTemplateSpec};
use k8s_openapi::api::core::v1::{Container, PodSpec, PodTemplateSpec};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use kube_plan::conditions;
use kube_plan::testing::{TestNamespace, eventually};
use kube_plan::{Controller, Operator};
use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Duration;

const EVERY_2S: &str = "*/2 * * * * *";

/// The operator, watching only `ns`, until the returned sender drops.
fn run_operator(client: &Client, ns: &str) -> tokio::sync::oneshot::Sender<()> {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let operator = Operator::new("cronjob-e2e", client.clone())
        .install_crds(vec![kube_plan::crd::build::<CronJob>()])
        .controller(
            Controller::new("cronjob", CronJobReconciler)
                .owns::<Job>()
                .primary_watch(
                    watcher::Config::default().fields(&format!("metadata.namespace={ns}")),
                ),
        );
    tokio::spawn(operator.run_until(async move {
        let _ = stopped.await;
    }));
    stop
}

/// A CronJob whose Jobs run one container of `image` (`:instant` completes at once, `:slow-300s`
/// stays running).
fn cronjob(name: &str, image: &str, change: impl FnOnce(&mut CronJobSpec)) -> CronJob {
    let mut spec = CronJobSpec {
        schedule: EVERY_2S.into(),
        job_template: JobTemplateSpec {
            metadata: None,
            spec: Some(JobSpec {
                backoff_limit: Some(0),
                template: PodTemplateSpec {
                    metadata: None,
                    spec: Some(PodSpec {
                        restart_policy: Some("Never".into()),
                        containers: vec![Container {
                            name: "run".into(),
                            image: Some(image.into()),
                            ..Container::default()
                        }],
                        ..PodSpec::default()
                    }),
                },
                ..JobSpec::default()
            }),
        },
        ..CronJobSpec::default()
    };
    change(&mut spec);
    CronJob::new(name, spec)
}

/// Creates `cj`, retrying while its CRD is being installed by the operator.
async fn create(api: &Api<CronJob>, cj: &CronJob) -> CronJob {
    eventually(Duration::from_secs(30), "CronJob created", || async {
        api.create(&PostParams::default(), cj)
            .await
            .map_err(|e| e.to_string())
    })
    .await
    .unwrap()
}

/// The Jobs of CronJob `owner` now, by name.
async fn jobs_of(jobs: &Api<Job>, owner: &str) -> Result<Vec<Job>, String> {
    let list = jobs
        .list(&Default::default())
        .await
        .map_err(|e| e.to_string())?;
    Ok(list
        .items
        .into_iter()
        .filter(|j| {
            j.owner_references()
                .iter()
                .any(|o| o.kind == "CronJob" && o.name == owner && o.controller == Some(true))
        })
        .collect())
}

fn complete(job: &Job) -> bool {
    let conds = job.status.as_ref().and_then(|s| s.conditions.as_ref());
    conds.is_some_and(|cs| {
        cs.iter()
            .any(|c| c.type_ == "Complete" && c.status == "True")
    })
}

fn ready_reason(cj: &CronJob) -> Option<String> {
    let status = cj.status.as_ref()?;
    conditions::get(&status.conditions, conditions::READY).map(|c| c.reason.clone())
}

/// Waits until CronJob `cronjob` has had at least `n` distinct Jobs (its schedule came round `n`
/// times while the operator ran).
async fn ran(jobs: &Api<Job>, cronjob: &str, n: usize) {
    let seen = Mutex::new(BTreeSet::new());
    eventually(
        Duration::from_secs(90),
        &format!("{cronjob} ran {n} Jobs"),
        || async {
            let now = jobs_of(jobs, cronjob).await?;
            let mut seen = seen.lock().unwrap();
            seen.extend(now.iter().map(|j| j.name_any()));
            if seen.len() >= n {
                Ok(())
            } else {
                Err(format!("{} so far", seen.len()))
            }
        },
    )
    .await
    .unwrap();
}

async fn namespace(client: &Client, prefix: &str) -> TestNamespace {
    let (cluster, _) = cluster().await.unwrap();
    cluster.namespace(client, prefix).await.unwrap()
}

#[tokio::test]
async fn cronjob_runs_jobs_on_schedule_and_keeps_only_its_history() {
    let (_, client) = cluster().await.unwrap();
    let ns = namespace(&client, "cronjob-history").await;
    let _operator = run_operator(&client, ns.name());
    let api: Api<CronJob> = Api::namespaced(client.clone(), ns.name());
    let jobs: Api<Job> = Api::namespaced(client.clone(), ns.name());
    let cj = create(
        &api,
        &cronjob("tick", "docker.io/library/busybox:instant", |s| {
            s.successful_jobs_history_limit = Some(2);
        }),
    )
    .await;

    // Five distinct runs, and at the end no more than two finished Jobs kept.
    let seen = Mutex::new(BTreeSet::new());
    eventually(Duration::from_secs(90), "5 runs, history of 2", || {
        let (jobs, seen) = (&jobs, &seen);
        async move {
            let now = jobs_of(jobs, "tick").await?;
            let mut seen = seen.lock().unwrap();
            seen.extend(now.iter().map(|j| j.name_any()));
            let finished = now.iter().filter(|j| complete(j)).count();
            if seen.len() >= 5 && finished <= 2 {
                Ok(())
            } else {
                Err(format!(
                    "{} runs seen, {finished} finished kept",
                    seen.len()
                ))
            }
        }
    })
    .await
    .unwrap();

    // Each Job is named after its scheduled time, which is on the schedule (an even second) and
    // recorded in its annotation; it belongs to the CronJob.
    for job in jobs_of(&jobs, "tick").await.unwrap() {
        let at: jiff::Timestamp = job.annotations()[SCHEDULED_AT].parse().unwrap();
        assert_eq!(job.name_any(), format!("tick-{}", at.as_second()));
        assert_eq!(at.as_second() % 2, 0, "{at} is on the schedule");
        assert_eq!(job.owner_references()[0].uid, cj.uid().unwrap());
    }
    let cj = eventually(Duration::from_secs(30), "status written", || async {
        let cj = api.get("tick").await.map_err(|e| e.to_string())?;
        match ready_reason(&cj).as_deref() {
            Some("Scheduled") if cj.status.as_ref().unwrap().last_schedule_time.is_some() => Ok(cj),
            other => Err(format!("{other:?}")),
        }
    })
    .await
    .unwrap();
    let last = cj.status.unwrap().last_schedule_time.unwrap().0;
    let newest = jobs_of(&jobs, "tick")
        .await
        .unwrap()
        .iter()
        .filter_map(|j| {
            j.annotations()
                .get(SCHEDULED_AT)?
                .parse::<jiff::Timestamp>()
                .ok()
        })
        .max()
        .unwrap();
    assert!(
        last >= newest,
        "lastScheduleTime {last} covers the newest Job {newest}"
    );
}

#[tokio::test]
async fn cronjob_suspend_deadline_and_forbid_hold_runs_back_while_a_witness_runs() {
    let (_, client) = cluster().await.unwrap();
    let ns = namespace(&client, "cronjob-held").await;
    let _operator = run_operator(&client, ns.name());
    let api: Api<CronJob> = Api::namespaced(client.clone(), ns.name());
    let jobs: Api<Job> = Api::namespaced(client.clone(), ns.name());
    let quick = "docker.io/library/busybox:instant";
    create(&api, &cronjob("paused", quick, |s| s.suspend = Some(true))).await;
    // A deadline of 0 s: a run that starts any later than its exact second is skipped.
    create(
        &api,
        &cronjob("late", quick, |s| s.starting_deadline_seconds = Some(0)),
    )
    .await;
    create(
        &api,
        &cronjob(
            "one-at-a-time",
            "docker.io/library/busybox:slow-300s",
            |s| {
                s.concurrency_policy = ConcurrencyPolicy::Forbid;
            },
        ),
    )
    .await;
    // The Forbid CronJob's first run is under way before the witness starts counting.
    ran(&jobs, "one-at-a-time", 1).await;
    create(&api, &cronjob("witness", quick, |_| {})).await;
    ran(&jobs, "witness", 3).await;

    assert!(jobs_of(&jobs, "paused").await.unwrap().is_empty());
    assert!(jobs_of(&jobs, "late").await.unwrap().is_empty());
    let forbid = jobs_of(&jobs, "one-at-a-time").await.unwrap();
    assert_eq!(forbid.len(), 1, "Forbid: one run while it is running");
    for (name, reason) in [("paused", "Suspended"), ("late", "MissedSchedule")] {
        let cj = api.get(name).await.unwrap();
        assert_eq!(ready_reason(&cj).as_deref(), Some(reason), "{name}");
    }
    let active = eventually(Duration::from_secs(30), "Forbid's active list", || async {
        let cj = api.get("one-at-a-time").await.map_err(|e| e.to_string())?;
        let active = cj.status.map(|s| s.active).unwrap_or_default();
        if active.len() == 1 {
            Ok(active)
        } else {
            Err(format!("{active:?}"))
        }
    })
    .await
    .unwrap();
    assert_eq!(active[0].name, forbid[0].metadata.name);

    // Lifting the suspension lets the next run start.
    api.patch(
        "paused",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"suspend": false}})),
    )
    .await
    .unwrap();
    ran(&jobs, "paused", 1).await;
}

#[tokio::test]
async fn cronjob_replace_stops_the_running_job_for_the_new_run() {
    let (_, client) = cluster().await.unwrap();
    let ns = namespace(&client, "cronjob-replace").await;
    let _operator = run_operator(&client, ns.name());
    let api: Api<CronJob> = Api::namespaced(client.clone(), ns.name());
    let jobs: Api<Job> = Api::namespaced(client.clone(), ns.name());
    create(
        &api,
        &cronjob("latest", "docker.io/library/busybox:slow-300s", |s| {
            s.concurrency_policy = ConcurrencyPolicy::Replace;
        }),
    )
    .await;
    let first = eventually(Duration::from_secs(60), "the first run", || async {
        let mut now = jobs_of(&jobs, "latest").await?;
        now.pop().map(|j| j.name_any()).ok_or("none yet".to_owned())
    })
    .await
    .unwrap();
    // A later run replaces it: the first Job goes, and the CronJob lists only the newer one.
    eventually(
        Duration::from_secs(60),
        "the first run replaced",
        || async {
            let now: Vec<String> = jobs_of(&jobs, "latest")
                .await?
                .iter()
                .filter(|j| j.metadata.deletion_timestamp.is_none())
                .map(|j| j.name_any())
                .collect();
            let cj = api.get("latest").await.map_err(|e| e.to_string())?;
            let active: Vec<String> = cj
                .status
                .map(|s| s.active.into_iter().filter_map(|r| r.name).collect())
                .unwrap_or_default();
            if !now.contains(&first) && active.len() == 1 && !active.contains(&first) {
                Ok(())
            } else {
                Err(format!("Jobs {now:?}, active {active:?}"))
            }
        },
    )
    .await
    .unwrap();
}
