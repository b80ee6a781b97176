//! Leader election, so that one controller replica at a time collects garbage: an etcd lease in
//! etcd mode, a coordination.k8s.io/v1 Lease in Kubernetes mode.

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn, TxnOp,
};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use std::time::Duration;
use tracing::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("leader election via etcd at {key}: {source}")]
    Etcd {
        key: String,
        #[source]
        source: etcd_client::Error,
    },
    #[error("leader election via Lease {namespace}/{name}: {source}")]
    Kube {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// One way of electing a leader.
#[async_trait]
pub trait LeaderElector: Send {
    /// One attempt to lead: `true` when this replica now holds leadership, `false` when
    /// another replica does.
    async fn try_acquire(&mut self) -> Result<bool, LeaderError>;
    /// How long to wait between attempts while another replica leads.
    fn retry_interval(&self) -> Duration;
    /// Waits until this replica is the leader.
    async fn acquire(&mut self) -> Result<(), LeaderError> {
        while !self.try_acquire().await? {
            tokio::time::sleep(self.retry_interval()).await;
        }
        Ok(())
    }
    /// Extends the leadership; `false` when it was lost (another replica may lead now).
    async fn renew(&mut self) -> Result<bool, LeaderError>;
    /// Gives leadership up, so another replica takes over without waiting for expiry.
    async fn release(&mut self);
    /// How often `renew` must be called.
    fn renew_interval(&self) -> Duration;
}

// ===== etcd =====

/// Leadership is the key `<prefix>leader/ipam-controller` attached to a lease of this replica;
/// it disappears when the lease expires.
pub struct EtcdLeaderElector {
    client: Client,
    key: String,
    identity: String,
    ttl: i64,
    lease: Option<i64>,
    keeper: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
}

impl EtcdLeaderElector {
    pub fn new(client: Client, prefix: &str, identity: impl Into<String>, ttl: Duration) -> Self {
        EtcdLeaderElector {
            client,
            key: format!("{prefix}leader/ipam-controller"),
            identity: identity.into(),
            ttl: ttl.as_secs().max(2) as i64,
            lease: None,
            keeper: None,
        }
    }

    fn err(&self) -> impl Fn(etcd_client::Error) -> LeaderError + '_ {
        |source| LeaderError::Etcd {
            key: self.key.clone(),
            source,
        }
    }

    /// The current leader's identity, if any.
    pub async fn leader(&mut self) -> Result<Option<String>, LeaderError> {
        let resp = self
            .client
            .get(self.key.clone(), None)
            .await
            .map_err(self.err())?;
        Ok(resp
            .kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
    }
}

#[async_trait]
impl LeaderElector for EtcdLeaderElector {
    async fn try_acquire(&mut self) -> Result<bool, LeaderError> {
        let lease = self
            .client
            .lease_grant(self.ttl, None)
            .await
            .map_err(self.err())?
            .id();
        let txn = Txn::new()
            .when(vec![Compare::create_revision(
                self.key.clone(),
                CompareOp::Equal,
                0,
            )])
            .and_then(vec![TxnOp::put(
                self.key.clone(),
                self.identity.clone(),
                Some(PutOptions::new().with_lease(lease)),
            )]);
        let won = self.client.txn(txn).await.map_err(self.err())?.succeeded();
        if won {
            let keeper = self
                .client
                .lease_keep_alive(lease)
                .await
                .map_err(self.err())?;
            self.lease = Some(lease);
            self.keeper = Some(keeper);
            info!(identity = %self.identity, key = %self.key, "became leader (etcd lease)");
            return Ok(true);
        }
        // The unused lease would expire by itself after its TTL; revoking it keeps etcd tidy.
        if let Err(e) = self.client.lease_revoke(lease).await {
            warn!(error = %e, lease, "could not revoke an unused etcd lease; it expires after its TTL");
        }
        Ok(false)
    }

    fn retry_interval(&self) -> Duration {
        Duration::from_secs((self.ttl as u64 / 3).max(1))
    }

    async fn renew(&mut self) -> Result<bool, LeaderError> {
        let Some((keeper, stream)) = self.keeper.as_mut() else {
            return Ok(false);
        };
        let key = self.key.clone();
        let e = |source| LeaderError::Etcd {
            key: key.clone(),
            source,
        };
        keeper.keep_alive().await.map_err(e)?;
        let alive = matches!(stream.message().await.map_err(e)?, Some(r) if r.ttl() > 0);
        if !alive {
            warn!(identity = %self.identity, "lost leadership: the etcd lease expired");
            self.keeper = None;
            self.lease = None;
        }
        Ok(alive)
    }

    async fn release(&mut self) {
        self.keeper = None;
        if let Some(lease) = self.lease.take() {
            if let Err(e) = self.client.lease_revoke(lease).await {
                warn!(error = %e, lease, "could not revoke the leader lease; a standby takes over when it expires");
            }
        }
    }

    fn renew_interval(&self) -> Duration {
        Duration::from_secs((self.ttl as u64 / 3).max(1))
    }
}

// ===== Kubernetes =====

/// A coordination.k8s.io/v1 Lease, taken over only once its holder stopped renewing it; every
/// write is a replace on the resourceVersion read.
pub struct KubeLeaderElector {
    api: Api<Lease>,
    namespace: String,
    name: String,
    identity: String,
    duration: Duration,
}

impl KubeLeaderElector {
    pub fn new(
        client: kube::Client,
        namespace: &str,
        name: &str,
        identity: impl Into<String>,
        duration: Duration,
    ) -> Self {
        KubeLeaderElector {
            api: Api::namespaced(client, namespace),
            namespace: namespace.into(),
            name: name.into(),
            identity: identity.into(),
            duration,
        }
    }

    fn err(&self, source: kube::Error) -> LeaderError {
        LeaderError::Kube {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            source,
        }
    }

    fn spec(&self, transitions: i32, acquired: Option<MicroTime>) -> LeaseSpec {
        let now = MicroTime(Timestamp::now());
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.duration.as_secs() as i32),
            acquire_time: Some(acquired.unwrap_or_else(|| now.clone())),
            renew_time: Some(now),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    /// One attempt: `true` if we hold the lease afterwards.
    async fn try_take(&mut self, renewing: bool) -> Result<bool, LeaderError> {
        let current = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(|e| self.err(e))?;
        let Some(mut lease) = current else {
            if renewing {
                return Ok(false);
            }
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    namespace: Some(self.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.spec(0, None)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(self.err(e)),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let mine = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        if renewing && !mine {
            return Ok(false);
        }
        let expired = spec.renew_time.as_ref().is_none_or(|t| {
            let secs = i64::from(spec.lease_duration_seconds.unwrap_or(15));
            t.0.as_second() + secs < Timestamp::now().as_second()
        }) || spec.holder_identity.as_deref().unwrap_or("").is_empty();
        if !mine && !expired {
            return Ok(false);
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!mine);
        let acquired = if mine {
            spec.acquire_time.clone()
        } else {
            None
        };
        lease.spec = Some(self.spec(transitions, acquired));
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(self.err(e)),
        }
    }
}

#[async_trait]
impl LeaderElector for KubeLeaderElector {
    async fn try_acquire(&mut self) -> Result<bool, LeaderError> {
        let won = self.try_take(false).await?;
        if won {
            info!(identity = %self.identity, lease = %format!("{}/{}", self.namespace, self.name), "became leader (Lease)");
        }
        Ok(won)
    }

    fn retry_interval(&self) -> Duration {
        self.renew_interval()
    }

    async fn renew(&mut self) -> Result<bool, LeaderError> {
        let held = self.try_take(true).await?;
        if !held {
            warn!(identity = %self.identity, "lost leadership: the Lease is held by another replica");
        }
        Ok(held)
    }

    async fn release(&mut self) {
        // Best effort: if it fails, the Lease expires after its duration and a standby takes
        // over then.
        let mut lease = match self.api.get_opt(&self.name).await {
            Ok(Some(lease)) => lease,
            Ok(None) => return,
            Err(e) => {
                warn!(error = %e, "could not read the Lease to release it; a standby takes over when it expires");
                return;
            }
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        if let Err(e) = self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            warn!(error = %e, "could not release the Lease; a standby takes over when it expires");
        }
    }

    fn renew_interval(&self) -> Duration {
        (self.duration / 3).max(Duration::from_secs(1))
    }
}
