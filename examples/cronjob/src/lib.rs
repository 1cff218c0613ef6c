//! The CronJob operator of the kubebuilder book's main tutorial, written on kube-plan: a `CronJob`
//! runs a Job from its template at each time its cron schedule names, keeps a history of finished
//! Jobs, and lists the running ones in its status.
//!
//! The reconciler only decides; the framework does the rest. Jobs it should create are planned,
//! Jobs it should leave alone are kept, and every other Job it owns (old history, a run being
//! replaced) is pruned. The next run is a requeue at that moment.

use croner::Cron;
use jiff::{SignedDuration, Timestamp, tz::TimeZone};
use k8s_openapi::api::batch::v1::{Job, JobTemplateSpec};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, Time};
use kube::{CustomResource, KubeSchema, ResourceExt};
use kube_plan::conditions::{self, Cond};
use kube_plan::{Child, Context, Plan, PrinterColumns, Reconciler, Status};
use serde::{Deserialize, Serialize};
use std::str::FromStr;

/// The annotation on each Job that records the scheduled time it runs for (RFC 3339).
pub const SCHEDULED_AT: &str = "batch.tutorial.kubebuilder.io/scheduled-at";

/// Runs a Job from `jobTemplate` at each time `schedule` names.
#[derive(
    CustomResource, KubeSchema, PrinterColumns, Serialize, Deserialize, Clone, Debug, Default,
)]
#[kube(
    group = "batch.tutorial.kubebuilder.io",
    version = "v1",
    kind = "CronJob",
    namespaced
)]
#[kube(status = "CronJobStatus", derive = "Default")]
#[serde(rename_all = "camelCase")]
pub struct CronJobSpec {
    /// When to run, in cron format: five fields (minute, hour, day of month, month, day of week),
    /// or six with seconds first. Times are UTC.
    #[column]
    pub schedule: String,
    /// A run that could not start on time may still start this many seconds late; a run later
    /// than that is skipped.
    #[schemars(range(min = 0))]
    pub starting_deadline_seconds: Option<i64>,
    /// What to do when a run is due while an earlier one is still running.
    #[serde(default)]
    pub concurrency_policy: ConcurrencyPolicy,
    /// Stops new runs; running Jobs go on.
    #[column]
    pub suspend: Option<bool>,
    /// The Job each run creates.
    pub job_template: JobTemplateSpec,
    /// How many successful Jobs to keep (all when unset).
    #[schemars(range(min = 0))]
    pub successful_jobs_history_limit: Option<i32>,
    /// How many failed Jobs to keep (all when unset).
    #[schemars(range(min = 0))]
    pub failed_jobs_history_limit: Option<i32>,
}

/// What a run that is due does to runs still going.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
pub enum ConcurrencyPolicy {
    /// Runs side by side.
    #[default]
    Allow,
    /// Skips the new run.
    Forbid,
    /// Stops the running Jobs and starts the new one.
    Replace,
}

/// The running Jobs and the latest scheduled time.
#[derive(
    Status, PrinterColumns, Serialize, Deserialize, Clone, Debug, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub struct CronJobStatus {
    /// The Jobs running now.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub active: Vec<ObjectReference>,
    /// The latest time a Job was scheduled for.
    #[column(name = "Last Schedule")]
    pub last_schedule_time: Option<Time>,
    /// `Ready`: the schedule is in force (`Scheduled`), or why not (`Suspended`,
    /// `InvalidSchedule`, `MissedSchedule`).
    #[status(conditions)]
    #[column(name = "Ready", condition = "Ready", field = "status")]
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// The reconciler: Jobs on schedule, history trimmed, the running ones in status.
pub struct CronJobReconciler;

impl Reconciler for CronJobReconciler {
    type Resource = CronJob;
    type Error = kube_plan::children::ChildError;

    async fn reconcile(&self, cj: &CronJob, ctx: &Context) -> Result<Plan<CronJob>, Self::Error> {
        let (now, spec) = (ctx.now(), &cj.spec);
        let jobs = ctx.owned::<Job>();
        let (mut active, mut succeeded, mut failed) = (Vec::new(), Vec::new(), Vec::new());
        for job in &jobs {
            match finished(job) {
                None => active.push(job),
                Some("Complete") => succeeded.push(job),
                Some(_) => failed.push(job),
            }
        }
        let last = jobs.iter().filter_map(|j| scheduled_at(j)).max();
        let mut status = CronJobStatus {
            active: active.iter().map(|j| reference(j)).collect(),
            last_schedule_time: last.map(Time),
            conditions: cj.status.clone().unwrap_or_default().conditions,
        };
        let started = |j: &Job| j.status.as_ref().and_then(|s| s.start_time.clone());
        let limit = |l: Option<i32>| l.map_or(usize::MAX, |l| usize::try_from(l).unwrap_or(0));
        let mut plan = Plan::new()
            .keep_newest(
                &succeeded,
                limit(spec.successful_jobs_history_limit),
                started,
            )
            .keep_newest(&failed, limit(spec.failed_jobs_history_limit), started);

        let ready = match (spec.suspend, Cron::from_str(&spec.schedule)) {
            (Some(true), _) => Cond::ready(false, "Suspended", "no new runs while suspended"),
            (_, Err(e)) => {
                let message = format!("schedule {:?} does not parse: {e}", spec.schedule);
                plan = plan.warning("InvalidSchedule", &message);
                Cond::ready(false, "InvalidSchedule", message)
            }
            (_, Ok(cron)) => {
                let (due, next) = (occurrence(&cron, now, false), occurrence(&cron, now, true));
                if let Some(next) = next {
                    plan = plan.requeue_at(next);
                }
                let since = last.or(cj.metadata.creation_timestamp.as_ref().map(|t| t.0));
                let deadline = spec
                    .starting_deadline_seconds
                    .map(SignedDuration::from_secs);
                match due.filter(|due| since.is_none_or(|s| *due > s)) {
                    Some(due) if deadline.is_some_and(|d| due + d < now) => {
                        let message = format!("the run due at {due} missed its starting deadline");
                        plan = plan.warning("MissedSchedule", &message);
                        Cond::ready(false, "MissedSchedule", message)
                    }
                    Some(due)
                        if spec.concurrency_policy == ConcurrencyPolicy::Forbid
                            && !active.is_empty() =>
                    {
                        Cond::ready(
                            true,
                            "Scheduled",
                            format!("run at {due} skipped: one is running"),
                        )
                    }
                    Some(due) => {
                        if spec.concurrency_policy == ConcurrencyPolicy::Replace {
                            active.clear(); // not kept: pruned
                        }
                        status.last_schedule_time = Some(Time(due));
                        plan = plan.child(Child::new(&job_for(cj, due))?.create_only());
                        Cond::ready(true, "Scheduled", format!("started the run due at {due}"))
                    }
                    None => Cond::ready(true, "Scheduled", format!("next run at {next:?}")),
                }
            }
        };
        conditions::set(&mut status.conditions, ready, cj.metadata.generation, now);
        Ok(active
            .into_iter()
            .fold(plan, |p, j| p.keep(&**j))
            .status(status))
    }
}

/// The latest time `cron` names up to `now`, or (`after`) the first one after it.
fn occurrence(cron: &Cron, now: Timestamp, after: bool) -> Option<Timestamp> {
    let now = now.to_zoned(TimeZone::UTC);
    let found = match after {
        true => cron.find_next_occurrence(&now, false),
        false => cron.find_previous_occurrence(&now, true),
    };
    found.ok().map(|z| z.timestamp())
}

/// `Complete` or `Failed` once the Job has finished.
fn finished(job: &Job) -> Option<&str> {
    let conditions = job.status.as_ref()?.conditions.as_ref()?;
    conditions
        .iter()
        .find(|c| matches!(c.type_.as_str(), "Complete" | "Failed") && c.status == "True")
        .map(|c| c.type_.as_str())
}

fn scheduled_at(job: &Job) -> Option<Timestamp> {
    job.annotations().get(SCHEDULED_AT)?.parse().ok()
}

fn reference(job: &Job) -> ObjectReference {
    ObjectReference {
        api_version: Some("batch/v1".into()),
        kind: Some("Job".into()),
        name: job.metadata.name.clone(),
        namespace: job.metadata.namespace.clone(),
        uid: job.metadata.uid.clone(),
        ..ObjectReference::default()
    }
}

/// The Job of the run due at `at`: named after the CronJob and the time, so planning it again
/// before the cache has it creates nothing new.
pub fn job_for(cj: &CronJob, at: Timestamp) -> Job {
    let template = cj.spec.job_template.metadata.clone().unwrap_or_default();
    let mut annotations = template.annotations.unwrap_or_default();
    annotations.insert(SCHEDULED_AT.into(), at.to_string());
    Job {
        metadata: ObjectMeta {
            name: Some(format!("{}-{}", cj.name_any(), at.as_second())),
            namespace: cj.namespace(),
            labels: template.labels,
            annotations: Some(annotations),
            ..ObjectMeta::default()
        },
        spec: cj.spec.job_template.spec.clone(),
        ..Job::default()
    }
}
