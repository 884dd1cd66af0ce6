//! The etcd v3 store, in flannel's layout so weft and flannel nodes can share a cluster:
//! `<prefix>/config` holds net-conf.json, `<prefix>/subnets/<a.b.c.d>-<len>` one lease per node
//! (value: flannel's lease JSON), its TTL an etcd lease. A new lease is created with a
//! transaction `If(Version(key) == 0)`, so two nodes never get the same subnet; renewal attaches
//! a fresh etcd lease, as flannel does. The watch follows the prefix from the listed revision and
//! re-lists and diffs when etcd has compacted past it or the connection was lost.
//!
//! The store is synchronous for its callers: it runs a small single-threaded runtime inside.

use std::collections::{HashMap, HashSet};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp, WatchOptions,
};
use ipnet::Ipv4Net;
use tokio::runtime::Runtime;
use weft_netconf::NetworkConfig;

use crate::model::{parse_key, subnet_key};
use crate::{choose_subnet, Lease, LeaseAttrs, LeaseError, LeaseEvent, LeaseStore, LeaseWatcher, Result};

/// flannel's default prefix.
pub const DEFAULT_PREFIX: &str = "/coreos.com/network";
const RPC_TIMEOUT: Duration = Duration::from_secs(5);

fn store_err(e: impl std::fmt::Display) -> LeaseError {
    LeaseError::Store(e.to_string())
}

/// A lease store in etcd.
pub struct EtcdStore {
    rt: Arc<Runtime>,
    endpoints: Vec<String>,
    prefix: String,
    client: Client,
}

fn runtime() -> Result<Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(store_err)
}

async fn connect(endpoints: &[String]) -> Result<Client> {
    let options = ConnectOptions::new().with_connect_timeout(Duration::from_secs(3)).with_timeout(RPC_TIMEOUT);
    Client::connect(endpoints, Some(options))
        .await
        .map_err(|e| store_err(format!("connecting to etcd {endpoints:?}: {e}")))
}

fn decode(key: &str, prefix: &str, value: &[u8], created: i64) -> Result<Option<Lease>> {
    let Some(name) = key.strip_prefix(&format!("{prefix}/subnets/")) else { return Ok(None) };
    let subnet = parse_key(name)?;
    let attrs: LeaseAttrs =
        serde_json::from_slice(value).map_err(|e| LeaseError::Corrupt { key: key.into(), reason: e.to_string() })?;
    Ok(Some(Lease { subnet, attrs, expires: None, created: Some(created) }))
}

async fn list_with_revision(client: &mut Client, prefix: &str) -> Result<(Vec<Lease>, i64)> {
    let (keyed, _, revision) = list_keyed(client, prefix).await?;
    Ok((keyed.into_iter().map(|(_, l)| l).collect(), revision))
}

/// Every lease with its key, and the subnets of keys whose value is damaged. Of two keys naming
/// one subnet, the older claim counts.
async fn list_keyed(client: &mut Client, prefix: &str) -> Result<(Vec<(String, Lease)>, Vec<Ipv4Net>, i64)> {
    let resp = client
        .get(format!("{prefix}/subnets/"), Some(GetOptions::new().with_prefix()))
        .await
        .map_err(|e| store_err(format!("listing leases: {e}")))?;
    let revision = resp.header().map_or(0, |h| h.revision());
    let mut leases: Vec<(String, Lease)> = Vec::new();
    let mut damaged = Vec::new();
    for kv in resp.kvs() {
        let key = kv.key_str().map_err(store_err)?;
        match decode(key, prefix, kv.value(), kv.create_revision()) {
            Ok(Some(lease)) => match leases.iter_mut().find(|(_, l)| l.subnet == lease.subnet) {
                Some(slot) if lease.outranks(&slot.1) => *slot = (key.to_string(), lease),
                Some(_) => {}
                None => leases.push((key.to_string(), lease)),
            },
            Ok(None) => {}
            Err(e) => {
                tracing::warn!("lease store: skipping {key:?}: {e}");
                let name = key.strip_prefix(&format!("{prefix}/subnets/")).unwrap_or(key);
                damaged.extend(parse_key(name).ok());
            }
        }
    }
    leases.sort_by_key(|(_, l)| l.subnet);
    Ok((leases, damaged, revision))
}

impl EtcdStore {
    pub fn connect(endpoints: &[String], prefix: &str) -> Result<EtcdStore> {
        let rt = runtime()?;
        let endpoints = endpoints.to_vec();
        let client = rt.block_on(connect(&endpoints))?;
        Ok(EtcdStore { rt: Arc::new(rt), endpoints, prefix: prefix.trim_end_matches('/').to_string(), client })
    }

    fn key(&self, subnet: &Ipv4Net) -> String {
        format!("{}/subnets/{}", self.prefix, subnet_key(subnet))
    }

    /// Runs one operation on a clone of the client; a failure is tried once more (a connection
    /// broken by an etcd restart fails its first request and reconnects for the next).
    fn call<T, F, Fut>(&self, op: F) -> Result<T>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let attempt = || {
            self.rt.block_on(async {
                tokio::time::timeout(RPC_TIMEOUT, op(self.client.clone()))
                    .await
                    .map_err(|_| store_err("etcd did not answer within 5 s"))?
            })
        };
        attempt().or_else(|_| {
            std::thread::sleep(Duration::from_millis(200));
            attempt()
        })
    }

    /// Puts `attrs` on `subnet` with a fresh etcd lease of `ttl`; with `only_if_new`, only if
    /// the key does not exist (`None` when someone was first). Returns the revision written at.
    fn put_lease(
        &self,
        subnet: &Ipv4Net,
        attrs: &LeaseAttrs,
        ttl: Option<Duration>,
        only_if_new: bool,
    ) -> Result<Option<i64>> {
        let key = self.key(subnet);
        let value = serde_json::to_vec(attrs).map_err(store_err)?;
        self.call(|mut client| {
            let (key, value) = (key.clone(), value.clone());
            async move {
                let mut options = PutOptions::new();
                let mut granted = None;
                if let Some(ttl) = ttl {
                    let grant = client
                        .lease_grant(ttl.as_secs().max(1) as i64, None)
                        .await
                        .map_err(|e| store_err(format!("granting a lease: {e}")))?;
                    options = options.with_lease(grant.id());
                    granted = Some(grant.id());
                }
                let mut txn = Txn::new();
                if only_if_new {
                    txn = txn.when([Compare::version(key.clone(), CompareOp::Equal, 0)]);
                }
                let outcome = client
                    .txn(txn.and_then([TxnOp::put(key, value, Some(options))]))
                    .await
                    .map_err(|e| store_err(format!("writing a lease: {e}")))
                    .map(|resp| resp.succeeded().then(|| resp.header().map_or(0, |h| h.revision())));
                // A grant no key uses is given back at once, on every way this can fail: left
                // alone, one would pile up per failed try until its TTL ran out.
                if let (Some(id), false) = (granted, matches!(outcome, Ok(Some(_)))) {
                    let _ = client.lease_revoke(id).await;
                }
                outcome
            }
        })
    }

    /// The etcd lease (grant) the key of `subnet` is attached to (0: none).
    fn lease_id(&self, subnet: &Ipv4Net) -> Result<i64> {
        let key = self.key(subnet);
        self.call(|mut client| {
            let key = key.clone();
            async move {
                let resp = client.get(key, None).await.map_err(|e| store_err(format!("reading a lease: {e}")))?;
                Ok(resp.kvs().first().map_or(0, |kv| kv.lease()))
            }
        })
    }

    /// Gives back grant `id` (best effort: an unused grant also ends with its TTL).
    fn revoke(&self, id: i64) {
        if id != 0 {
            let _ = self.call(|mut client| async move { client.lease_revoke(id).await.map(drop).map_err(store_err) });
        }
    }

    /// A watch that resumes from `revision`, knowing `leases` as of then (what a caller that
    /// listed before has); with `None`, it lists first. When etcd has compacted past the
    /// revision, the watch lists again and reports the difference.
    pub fn watch_from(&self, leases: Vec<Lease>, revision: Option<i64>) -> Result<Box<dyn LeaseWatcher>> {
        let (tx, rx) = channel();
        let endpoints = self.endpoints.clone();
        let prefix = self.prefix.clone();
        std::thread::Builder::new()
            .name("etcd-watch".into())
            .spawn(move || follow(endpoints, prefix, tx, revision))
            .map_err(store_err)?;
        let known = leases.into_iter().map(|l| (l.subnet, l)).collect();
        // Resuming from a revision with what the caller listed then: already complete.
        let synced = revision.is_some();
        Ok(Box::new(EtcdWatcher { rx, known, keys: HashMap::new(), synced, pending: None }))
    }

    /// The store's current revision.
    pub fn revision(&self) -> Result<i64> {
        self.call(|mut client| {
            let prefix = self.prefix.clone();
            async move { list_with_revision(&mut client, &prefix).await.map(|(_, r)| r) }
        })
    }

    /// Writes `<prefix>/config`.
    pub fn set_network_config(&self, text: &str) -> Result<()> {
        let key = format!("{}/config", self.prefix);
        self.call(|mut client| {
            let (key, text) = (key.clone(), text.to_string());
            async move { client.put(key, text, None).await.map(drop).map_err(store_err) }
        })
    }
}

impl LeaseStore for EtcdStore {
    fn network_config(&self) -> Result<Option<String>> {
        let key = format!("{}/config", self.prefix);
        self.call(|mut client| {
            let key = key.clone();
            async move {
                let resp =
                    client.get(key, None).await.map_err(|e| store_err(format!("reading the network config: {e}")))?;
                Ok(resp.kvs().first().map(|kv| String::from_utf8_lossy(kv.value()).to_string()))
            }
        })
    }

    fn list(&self, _now: SystemTime) -> Result<Vec<Lease>> {
        self.call(|mut client| {
            let prefix = self.prefix.clone();
            async move { list_with_revision(&mut client, &prefix).await.map(|(l, _)| l) }
        })
    }

    fn acquire(
        &self,
        config: &NetworkConfig,
        attrs: &LeaseAttrs,
        previous: Option<Ipv4Net>,
        ttl: Option<Duration>,
        now: SystemTime,
        random: &mut dyn FnMut(usize) -> usize,
    ) -> Result<Lease> {
        for _ in 0..10 {
            let (leases, damaged) = self.call(|mut client| {
                let prefix = self.prefix.clone();
                async move { list_keyed(&mut client, &prefix).await.map(|(l, d, _)| (l, d)) }
            })?;
            let leases: Vec<Lease> = leases.into_iter().map(|(_, l)| l).collect();
            // This node's own subnet (from its subnet file) under a damaged value: it is this
            // node's key, taken back.
            if let Some(prev) = previous.filter(|p| damaged.contains(p) && config.is_leasable(p)) {
                tracing::warn!("lease store: taking back {} (its value was damaged)", subnet_key(&prev));
                self.put_lease(&prev, attrs, ttl, false)?;
                return Ok(Lease { subnet: prev, attrs: attrs.clone(), expires: ttl.map(|t| now + t), created: None });
            }
            if let Some(own) =
                leases.iter().find(|l| l.attrs.public_ip == attrs.public_ip && config.is_leasable(&l.subnet))
            {
                // Rewritten with a fresh grant: the one the key had is given back (each restart
                // left one behind until its TTL ran out).
                let old = self.lease_id(&own.subnet)?;
                self.put_lease(&own.subnet, attrs, ttl, false)?;
                self.revoke(old);
                return Ok(Lease {
                    subnet: own.subnet,
                    attrs: attrs.clone(),
                    expires: ttl.map(|t| now + t),
                    created: own.created,
                });
            }
            // A damaged value may be another node's lease: its subnet is not handed out.
            let taken: HashSet<Ipv4Net> = leases.iter().map(|l| l.subnet).chain(damaged.iter().copied()).collect();
            let subnet = choose_subnet(config, &taken, previous, random)
                .ok_or_else(|| LeaseError::Exhausted(config.network.to_string()))?;
            if let Some(revision) = self.put_lease(&subnet, attrs, ttl, true)? {
                // A key created by this write was created at its revision.
                return Ok(Lease {
                    subnet,
                    attrs: attrs.clone(),
                    expires: ttl.map(|t| now + t),
                    created: Some(revision),
                });
            }
            // Another node was first: list again and pick another.
        }
        Err(LeaseError::Store("no subnet could be created after 10 tries (too much contention)".into()))
    }

    fn renew(&self, lease: &Lease, ttl: Option<Duration>, now: SystemTime) -> Result<Lease> {
        let key = self.key(&lease.subnet);
        let prefix = self.prefix.clone();
        let current = self.call(|mut client| {
            let (key, prefix) = (key.clone(), prefix.clone());
            async move {
                let resp =
                    client.get(key.clone(), None).await.map_err(|e| store_err(format!("reading a lease: {e}")))?;
                match resp.kvs().first() {
                    // A damaged value is not this node's lease any more: acquired again.
                    Some(kv) => Ok(decode(&key, &prefix, kv.value(), kv.create_revision())
                        .ok()
                        .flatten()
                        .map(|l| (l, kv.lease()))),
                    None => Ok(None),
                }
            }
        })?;
        match current {
            Some((c, old)) if c.attrs.public_ip == lease.attrs.public_ip => {
                self.put_lease(&lease.subnet, &lease.attrs, ttl, false)?;
                // The key now holds a fresh etcd lease: the old one has nothing left to keep.
                self.revoke(old);
                Ok(Lease { expires: ttl.map(|t| now + t), created: c.created, ..lease.clone() })
            }
            _ => Err(LeaseError::NotFound(lease.key())),
        }
    }

    fn delete(&self, subnet: &Ipv4Net) -> Result<()> {
        let key = self.key(subnet);
        self.call(|mut client| {
            let key = key.clone();
            async move { client.delete(key, None).await.map(drop).map_err(store_err) }
        })
    }

    fn watch(&self) -> Result<Box<dyn LeaseWatcher>> {
        self.watch_from(Vec::new(), None)
    }

    fn describe(&self) -> String {
        format!("etcd {} prefix {}", self.endpoints.join(","), self.prefix)
    }
}

/// What the background watch sends (with the key a lease came from: a dual-stack flannel node's
/// `<v4>&<v6>` key and an IPv4-only key can both name one IPv4 subnet).
enum Update {
    Snapshot(Vec<(String, Lease)>),
    Put(String, Lease),
    Delete(String, Ipv4Net),
}

/// List, then watch from the listed revision; on compaction, cancellation or a lost
/// connection, list again (the receiver diffs). Ends when the receiver is gone.
fn follow(endpoints: Vec<String>, prefix: String, tx: Sender<Update>, mut resume: Option<i64>) {
    let Ok(rt) = runtime() else { return };
    rt.block_on(async move {
        loop {
            match follow_once(&endpoints, &prefix, &tx, resume.take()).await {
                Ok(()) => return, // receiver gone
                Err(e) => {
                    tracing::warn!("etcd watch: {e}; listing again in 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    });
}

async fn follow_once(endpoints: &[String], prefix: &str, tx: &Sender<Update>, resume: Option<i64>) -> Result<()> {
    let mut client = connect(endpoints).await?;
    let revision = match resume {
        Some(revision) => revision,
        None => {
            let (leases, _, revision) = list_keyed(&mut client, prefix).await?;
            if tx.send(Update::Snapshot(leases)).is_err() {
                return Ok(());
            }
            revision
        }
    };
    let options = WatchOptions::new().with_prefix().with_start_revision(revision + 1);
    let mut stream = client.watch(format!("{prefix}/subnets/"), Some(options)).await.map_err(store_err)?;
    loop {
        let resp = match stream.message().await.map_err(store_err)? {
            Some(resp) => resp,
            None => return Err(store_err("the watch stream ended")),
        };
        if resp.canceled() || resp.compact_revision() > 0 {
            return Err(store_err(format!("watch canceled (compacted at revision {})", resp.compact_revision())));
        }
        for event in resp.events() {
            let Some(kv) = event.kv() else { continue };
            let key = kv.key_str().map_err(store_err)?;
            let update = match event.event_type() {
                EventType::Put => match decode(key, prefix, kv.value(), kv.create_revision()) {
                    Ok(Some(lease)) => Update::Put(key.to_string(), lease),
                    Ok(None) => continue,
                    // The key no longer holds a lease: whatever it held is gone (its owner, if
                    // alive, takes it back).
                    Err(e) => {
                        tracing::warn!("lease store: skipping {key:?}: {e}");
                        match key.strip_prefix(&format!("{prefix}/subnets/")).map(parse_key) {
                            Some(Ok(subnet)) => Update::Delete(key.to_string(), subnet),
                            _ => continue,
                        }
                    }
                },
                EventType::Delete => match key.strip_prefix(&format!("{prefix}/subnets/")).map(parse_key) {
                    Some(Ok(subnet)) => Update::Delete(key.to_string(), subnet),
                    _ => continue,
                },
            };
            if tx.send(update).is_err() {
                return Ok(());
            }
        }
    }
}

struct EtcdWatcher {
    rx: Receiver<Update>,
    known: HashMap<Ipv4Net, Lease>,
    /// The key each known lease came from.
    keys: HashMap<Ipv4Net, String>,
    /// A complete listing has been received.
    synced: bool,
    /// An update `wait` received before `poll` asked for it.
    pending: Option<Update>,
}

impl LeaseWatcher for EtcdWatcher {
    fn poll(&mut self, _now: SystemTime) -> Result<Vec<LeaseEvent>> {
        let mut events = Vec::new();
        while let Some(update) = self.pending.take().or_else(|| self.rx.try_recv().ok()) {
            match update {
                Update::Snapshot(leases) => {
                    self.synced = true;
                    self.keys = leases.iter().map(|(k, l)| (l.subnet, k.clone())).collect();
                    let current: HashMap<Ipv4Net, Lease> = leases.into_iter().map(|(_, l)| (l.subnet, l)).collect();
                    for (subnet, old) in &self.known {
                        if !current.contains_key(subnet) {
                            events.push(LeaseEvent::Removed(old.clone()));
                        }
                    }
                    for (subnet, lease) in &current {
                        if self.known.get(subnet).is_none_or(|old| old.attrs != lease.attrs) {
                            events.push(LeaseEvent::Added(lease.clone()));
                        }
                    }
                    self.known = current;
                }
                Update::Put(key, lease) => {
                    // Another key's older claim on the subnet keeps it.
                    let other_key = self.keys.get(&lease.subnet).is_some_and(|k| *k != key);
                    if other_key && self.known.get(&lease.subnet).is_some_and(|old| old.outranks(&lease)) {
                        continue;
                    }
                    if self.known.get(&lease.subnet).is_none_or(|old| old.attrs != lease.attrs) {
                        events.push(LeaseEvent::Added(lease.clone()));
                    }
                    self.keys.insert(lease.subnet, key);
                    self.known.insert(lease.subnet, lease);
                }
                Update::Delete(key, subnet) => {
                    // Only the key the known lease came from removes it.
                    if self.keys.get(&subnet).is_some_and(|k| *k == key) {
                        self.keys.remove(&subnet);
                        if let Some(old) = self.known.remove(&subnet) {
                            events.push(LeaseEvent::Removed(old));
                        }
                    }
                }
            }
        }
        Ok(events)
    }

    fn known(&self) -> &HashMap<Ipv4Net, Lease> {
        &self.known
    }

    fn synced(&self) -> bool {
        self.synced
    }

    fn wait(&mut self, timeout: Duration) {
        if self.pending.is_none() {
            self.pending = self.rx.recv_timeout(timeout).ok();
        }
    }
}
