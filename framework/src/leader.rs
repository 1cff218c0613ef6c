//! Lease-based leader election: of several replicas, only the holder of a `coordination.k8s.io` Lease
//! reconciles.
//!
//! A candidate takes the Lease when it is free or when its holder has not renewed it for a whole lease
//! duration, measured on the candidate's own clock from when it last saw the record change (so clock
//! skew between nodes does not matter). The leader renews every `retry_period`; if it cannot renew
//! within `renew_deadline` it must stop reconciling, because another replica may take over. On a clean
//! shutdown the leader releases the Lease so a standby takes over at once.

use crate::fence::Fence;
use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};
use std::time::{Duration, Instant};

/// Settings of a leader election (defaults as controller-runtime's: 15 s / 10 s / 2 s).
#[derive(Clone, Debug)]
pub struct LeaderElection {
    /// Name of the Lease.
    pub lease_name: String,
    /// Namespace of the Lease.
    pub namespace: String,
    /// This replica's identity (the Pod name, typically).
    pub identity: String,
    /// How long a Lease stays valid without renewal.
    pub lease_duration: Duration,
    /// How long the leader keeps trying to renew before giving up leadership.
    pub renew_deadline: Duration,
    /// Interval between acquire or renew attempts.
    pub retry_period: Duration,
}

impl LeaderElection {
    /// Election for `lease_name` in `namespace`, as `identity`, with the default timings.
    pub fn new(lease_name: &str, namespace: &str, identity: &str) -> Self {
        Self {
            lease_name: lease_name.to_owned(),
            namespace: namespace.to_owned(),
            identity: identity.to_owned(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// Errors of leader election.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    /// The Lease could not be read or written.
    #[error("lease {namespace}/{name}: {source}")]
    Api {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// The leader could not renew in time.
    #[error("lost leadership of lease {0}: not renewed within the renew deadline")]
    Lost(String),
}

/// The part of a Lease that changes when its holder renews it: (holder, renewTime).
type LeaseRecord = (Option<String>, Option<Timestamp>);

/// What a candidate knows between attempts.
pub(crate) struct Candidate {
    cfg: LeaderElection,
    api: Api<Lease>,
    /// The last (holder, renewTime) seen, and when it was first seen.
    observed: Option<(LeaseRecord, Instant)>,
    /// Open while this candidate may be sure it leads.
    fence: Fence,
}

impl Candidate {
    /// A candidate that keeps `fence` open while it leads.
    pub(crate) fn new(client: Client, cfg: LeaderElection, fence: Fence) -> Self {
        let api = Api::namespaced(client, &cfg.namespace);
        Self {
            cfg,
            api,
            observed: None,
            fence,
        }
    }

    /// One attempt, extending the fence when it succeeds: to the attempt's *start* plus the renew
    /// deadline, which is before any standby can take the Lease on the renewal this attempt wrote.
    async fn attempt(&mut self) -> Result<bool, LeaderError> {
        let started = Instant::now();
        let held = self.try_acquire_or_renew().await?;
        if held {
            self.fence.extend(started + self.cfg.renew_deadline);
        }
        Ok(held)
    }

    fn err(&self, source: kube::Error) -> LeaderError {
        LeaderError::Api {
            namespace: self.cfg.namespace.clone(),
            name: self.cfg.lease_name.clone(),
            source,
        }
    }

    fn spec(&self, now: Timestamp, acquire: Option<MicroTime>, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.cfg.identity.clone()),
            lease_duration_seconds: Some(
                self.cfg.lease_duration.as_secs().try_into().unwrap_or(15),
            ),
            acquire_time: Some(acquire.unwrap_or(MicroTime(now))),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    /// One attempt to take or keep the Lease. Returns whether this candidate holds it afterwards.
    pub(crate) async fn try_acquire_or_renew(&mut self) -> Result<bool, LeaderError> {
        let now = Timestamp::now();
        let Some(mut lease) = self
            .api
            .get_opt(&self.cfg.lease_name)
            .await
            .map_err(|e| self.err(e))?
        else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.cfg.lease_name.clone()),
                    namespace: Some(self.cfg.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.spec(now, None, 0)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(self.err(e)),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let record = (holder.clone(), spec.renew_time.as_ref().map(|t| t.0));
        let seen_at = match &self.observed {
            Some((r, at)) if *r == record => *at,
            _ => {
                let at = Instant::now();
                self.observed = Some((record, at));
                at
            }
        };
        let duration = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map_or(self.cfg.lease_duration, Duration::from_secs);
        let mine = holder.as_deref() == Some(self.cfg.identity.as_str());
        let expired = holder.is_none() || seen_at.elapsed() > duration;
        if !mine && !expired {
            return Ok(false);
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!mine);
        let acquire = if mine {
            spec.acquire_time.clone()
        } else {
            None
        };
        lease.spec = Some(self.spec(now, acquire, transitions));
        // `replace` carries the resourceVersion we read: if another candidate wrote in between, ours
        // fails with 409 and we are not the leader this round.
        match self
            .api
            .replace(&self.cfg.lease_name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(self.err(e)),
        }
    }

    /// Blocks until this candidate holds the Lease; calls `standby` each time it finds another holder.
    pub(crate) async fn acquire(&mut self, standby: impl Fn()) {
        loop {
            match self.attempt().await {
                Ok(true) => return,
                Ok(false) => standby(),
                Err(e) => tracing::warn!(error = %e, "leader election attempt failed"),
            }
            tokio::time::sleep(self.cfg.retry_period).await;
        }
    }

    /// Renews until a renewal fails for longer than the renew deadline; then returns the loss. Each
    /// attempt is cut at the deadline, so a request hanging on an unresponsive API server cannot keep
    /// this replica believing it leads while another one takes the Lease.
    pub(crate) async fn keep(&mut self) -> LeaderError {
        let mut last_ok = Instant::now();
        loop {
            tokio::time::sleep(self.cfg.retry_period).await;
            let left = self.cfg.renew_deadline.saturating_sub(last_ok.elapsed());
            match tokio::time::timeout(left, self.attempt()).await {
                Ok(Ok(true)) => last_ok = Instant::now(),
                Ok(Ok(false)) => {
                    self.fence.close();
                    return LeaderError::Lost(self.cfg.lease_name.clone());
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "renewing leader lease"),
                Err(_) => {
                    tracing::warn!("renewing leader lease: no answer before the renew deadline")
                }
            }
            if last_ok.elapsed() > self.cfg.renew_deadline {
                self.fence.close();
                return LeaderError::Lost(self.cfg.lease_name.clone());
            }
        }
    }

    /// Gives the Lease up so a standby can take over without waiting for it to expire.
    pub(crate) async fn release(&mut self) {
        self.fence.close();
        let Ok(Some(mut lease)) = self.api.get_opt(&self.cfg.lease_name).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.cfg.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        if let Err(e) = self
            .api
            .replace(&self.cfg.lease_name, &PostParams::default(), &lease)
            .await
        {
            tracing::warn!(error = %e, "releasing leader lease");
        }
    }
}
