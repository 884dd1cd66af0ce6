//! The store in etcd v3: keys under a prefix (flannel's `/coreos.com/network`), revisions are
//! etcd's. Create-if-absent and compare-and-swap are transactions on the key's version and mod
//! revision. A TTL is an etcd lease granted for the write; the grant a key held before is given
//! back once a write replaces it, and a grant no key took is given back at once, on every way a
//! write can fail (left alone, one would pile up per failed try until its TTL ran out).
//!
//! The watch lists, then follows the prefix from the listed revision on a thread of its own;
//! when etcd has compacted past it, cancelled it or the connection was lost, it lists again.
//! Synchronous for its callers: a small single-threaded runtime runs inside.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, KeyValue, PutOptions, Txn, TxnOp,
    TxnOpResponse, WatchOptions,
};
use tokio::runtime::Runtime;

use super::{check_key, Entry, Kv, KvWatch, Ttl, Update};
use crate::{LeaseError, Result};

const RPC_TIMEOUT: Duration = Duration::from_secs(5);

fn store_err(e: impl std::fmt::Display) -> LeaseError {
    LeaseError::Store(e.to_string())
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

/// A store in etcd under a prefix.
pub struct EtcdKv {
    rt: Arc<Runtime>,
    endpoints: Vec<String>,
    prefix: String,
    /// The grant this store attached to each key it wrote last: given back when the key is
    /// written or deleted again, even when someone else deleted or overwrote the key meanwhile
    /// (the key no longer names it then, and it would live out its TTL — a day by default).
    grants: std::sync::Mutex<std::collections::HashMap<String, i64>>,
    client: Client,
}

fn entry(prefix: &str, kv: &KeyValue) -> Option<Entry> {
    let key = kv.key_str().ok()?.strip_prefix(prefix)?.strip_prefix('/')?.to_string();
    Some(Entry {
        key,
        value: kv.value().to_vec(),
        created: kv.create_revision(),
        modified: kv.mod_revision(),
        expires: None,
        damaged: None,
    })
}

/// The etcd key prefix of the directory `under` (`things` holds `things/a`, not `things2/a`).
fn directory(prefix: &str, under: &str) -> String {
    format!("{prefix}/{}/", under.trim_end_matches('/'))
}

async fn list(client: &mut Client, prefix: &str, under: &str) -> Result<(Vec<Entry>, i64)> {
    let resp = client
        .get(directory(prefix, under), Some(GetOptions::new().with_prefix()))
        .await
        .map_err(|e| store_err(format!("listing {under}: {e}")))?;
    let revision = resp.header().map_or(0, |h| h.revision());
    Ok((resp.kvs().iter().filter_map(|kv| entry(prefix, kv)).collect(), revision))
}

impl EtcdKv {
    pub fn connect(endpoints: &[String], prefix: &str) -> Result<EtcdKv> {
        let rt = runtime()?;
        let endpoints = endpoints.to_vec();
        let client = rt.block_on(connect(&endpoints))?;
        Ok(EtcdKv {
            rt: Arc::new(rt),
            endpoints,
            prefix: prefix.trim_end_matches('/').to_string(),
            client,
            grants: Default::default(),
        })
    }

    fn full(&self, key: &str) -> Result<String> {
        check_key(key)?;
        Ok(format!("{}/{key}", self.prefix))
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

    /// A write as a transaction: `compare` must hold; the put takes a fresh grant for `ttl`,
    /// and the key's previous grant is given back. `None` when the comparison failed.
    fn write(&self, key: &str, value: &[u8], ttl: Option<Ttl>, compare: Option<Compare>) -> Result<Option<Entry>> {
        let full = self.full(key)?;
        let prefix = self.prefix.clone();
        let (written, granted, revoked) = self.call(|mut client| {
            let (full, value, compare, prefix) = (full.clone(), value.to_vec(), compare.clone(), prefix.clone());
            async move {
                let mut options = PutOptions::new();
                let mut granted = None;
                if let Some(ttl) = ttl {
                    // etcd counts from now; the caller's clock says when it expires.
                    let left = ttl.expires().and_then(|e| e.duration_since(SystemTime::now()).ok()).unwrap_or(ttl.ttl);
                    let whole = left.as_secs() + u64::from(left.subsec_nanos() > 0);
                    let seconds = i64::try_from(whole).unwrap_or(i64::MAX).max(1);
                    let grant = client
                        .lease_grant(seconds, None)
                        .await
                        .map_err(|e| store_err(format!("granting a lease: {e}")))?;
                    options = options.with_lease(grant.id());
                    granted = Some(grant.id());
                }
                let mut txn = Txn::new();
                if let Some(compare) = compare {
                    txn = txn.when([compare]);
                }
                let ops = [
                    TxnOp::get(full.clone(), None),
                    TxnOp::put(full.clone(), value, Some(options)),
                    TxnOp::get(full, None),
                ];
                let outcome = client.txn(txn.and_then(ops)).await.map_err(|e| store_err(format!("writing {e}")));
                let mut old = 0;
                let written = match &outcome {
                    Ok(resp) if resp.succeeded() => {
                        let responses = resp.op_responses();
                        let gets: Vec<&KeyValue> = responses
                            .iter()
                            .filter_map(|r| match r {
                                TxnOpResponse::Get(g) => g.kvs().first(),
                                _ => None,
                            })
                            .collect();
                        // The grant the key held before, now unused.
                        old = gets.first().filter(|_| gets.len() == 2).map_or(0, |kv| kv.lease());
                        if old != 0 && Some(old) != granted {
                            let _ = client.lease_revoke(old).await;
                        }
                        gets.last().and_then(|kv| entry(&prefix, kv))
                    }
                    _ => None,
                };
                if written.is_none() {
                    if let Some(id) = granted {
                        let _ = client.lease_revoke(id).await;
                    }
                }
                let revoked = written.as_ref().map(|_| old);
                outcome.map(|_| (written, granted, revoked))
            }
        })?;
        if let Some(already) = revoked {
            let before = self.remember(key, granted);
            if let Some(id) = before.filter(|id| *id != already && Some(*id) != granted) {
                self.revoke(id);
            }
        }
        Ok(written)
    }

    /// Records `grant` as the one this store attached to `key`; returns the one before.
    fn remember(&self, key: &str, grant: Option<i64>) -> Option<i64> {
        let mut grants = self.grants.lock().unwrap_or_else(|e| e.into_inner());
        match grant {
            Some(id) => grants.insert(key.to_string(), id),
            None => grants.remove(key),
        }
    }

    /// Gives back grant `id` (best effort: an unused grant also ends with its TTL).
    fn revoke(&self, id: i64) {
        let _ = self.call(|mut client| async move { client.lease_revoke(id).await.map(drop).map_err(store_err) });
    }
}

impl Kv for EtcdKv {
    fn describe(&self) -> String {
        format!("etcd {} prefix {}", self.endpoints.join(","), self.prefix)
    }

    fn revision(&self) -> Result<i64> {
        self.call(|mut client| {
            let key = format!("{}/", self.prefix);
            async move {
                let resp = client
                    .get(key, Some(GetOptions::new().with_count_only()))
                    .await
                    .map_err(|e| store_err(format!("reading the revision: {e}")))?;
                Ok(resp.header().map_or(0, |h| h.revision()))
            }
        })
    }

    fn get(&self, key: &str) -> Result<Option<Entry>> {
        let full = self.full(key)?;
        let prefix = self.prefix.clone();
        self.call(|mut client| {
            let (full, prefix) = (full.clone(), prefix.clone());
            async move {
                let resp = client.get(full, None).await.map_err(|e| store_err(format!("reading a key: {e}")))?;
                Ok(resp.kvs().first().and_then(|kv| entry(&prefix, kv)))
            }
        })
    }

    fn list(&self, under: &str) -> Result<(Vec<Entry>, i64)> {
        self.call(|mut client| {
            let (prefix, under) = (self.prefix.clone(), under.to_string());
            async move { list(&mut client, &prefix, &under).await }
        })
    }

    fn create(&self, key: &str, value: &[u8], ttl: Option<Ttl>) -> Result<Option<Entry>> {
        let full = self.full(key)?;
        self.write(key, value, ttl, Some(Compare::version(full, CompareOp::Equal, 0)))
    }

    fn put(&self, key: &str, value: &[u8], ttl: Option<Ttl>, expected: Option<i64>) -> Result<Option<Entry>> {
        let full = self.full(key)?;
        let compare = expected.map(|e| Compare::mod_revision(full, CompareOp::Equal, e));
        self.write(key, value, ttl, compare)
    }

    fn delete(&self, key: &str, expected: Option<i64>) -> Result<bool> {
        let full = self.full(key)?;
        self.call(|mut client| {
            let full = full.clone();
            async move {
                let mut txn = Txn::new();
                if let Some(e) = expected {
                    txn = txn.when([Compare::mod_revision(full.clone(), CompareOp::Equal, e)]);
                }
                let options = DeleteOptions::new().with_prev_key();
                let resp = client
                    .txn(txn.and_then([TxnOp::delete(full, Some(options))]))
                    .await
                    .map_err(|e| store_err(format!("removing a key: {e}")))?;
                let mut removed = false;
                for r in resp.op_responses() {
                    if let TxnOpResponse::Delete(d) = r {
                        removed |= d.deleted() > 0;
                        // Its grant has nothing left to keep.
                        for id in d.prev_kvs().iter().map(|kv| kv.lease()).filter(|id| *id != 0) {
                            let _ = client.lease_revoke(id).await;
                        }
                    }
                }
                Ok(resp.succeeded() && removed)
            }
        })
        .inspect(|removed| {
            // The grant this store gave the key is free now too.
            if *removed {
                if let Some(id) = self.remember(key, None) {
                    self.revoke(id);
                }
            }
        })
    }

    fn watch(&self, under: &str, from: Option<i64>) -> Result<Box<dyn KvWatch>> {
        let (tx, rx) = channel();
        let (endpoints, prefix, under) = (self.endpoints.clone(), self.prefix.clone(), under.to_string());
        std::thread::Builder::new()
            .name("etcd-watch".into())
            .spawn(move || follow(endpoints, prefix, under, tx, from))
            .map_err(store_err)?;
        Ok(Box::new(EtcdWatch { rx, pending: Vec::new(), failing: None }))
    }

    fn read_document(&self, key: &str) -> Result<Option<String>> {
        Ok(self.get(key)?.map(|e| String::from_utf8_lossy(&e.value).to_string()))
    }

    fn write_document(&self, key: &str, text: &str) -> Result<()> {
        let full = self.full(key)?;
        self.call(|mut client| {
            let (full, text) = (full.clone(), text.to_string());
            async move { client.put(full, text, None).await.map(drop).map_err(store_err) }
        })
    }
}

/// What the watch thread tells its watch: updates, and whether etcd answers.
enum Signal {
    Update(Update),
    /// etcd does not answer (or the watch broke): the thread keeps trying.
    Failing(String),
    /// etcd answers again.
    Healthy,
}

/// How often a quiet watch asks etcd whether it is still there (a paused etcd keeps its
/// connections open and says nothing), and how long it waits for the answer.
const PROBE_EVERY: Duration = Duration::from_secs(5);
const PROBE_WAIT: Duration = Duration::from_secs(3);

/// List, then watch from the listed revision; on compaction, cancellation, a lost connection
/// or an unanswered probe, list again (a snapshot). A failure is logged once per change of
/// state, not on every retry. Ends when the receiver is gone.
fn follow(endpoints: Vec<String>, prefix: String, under: String, tx: Sender<Signal>, mut resume: Option<i64>) {
    let Ok(rt) = runtime() else { return };
    rt.block_on(async move {
        let mut failing = false;
        loop {
            match follow_once(&endpoints, &prefix, &under, &tx, resume.take(), &mut failing).await {
                Ok(()) => return, // receiver gone
                // etcd answers; it no longer has the history the watch needs: list again.
                Err(Broken::Compacted(revision)) => {
                    tracing::info!("etcd watch: compacted at revision {revision}; listing again");
                }
                Err(Broken::Failed(e)) => {
                    if !failing {
                        tracing::warn!("etcd watch: {e}; listing again every second until it answers");
                        failing = true;
                    }
                    let message = match e {
                        LeaseError::Store(m) => m,
                        other => other.to_string(),
                    };
                    if tx.send(Signal::Failing(message)).is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    });
}

/// Why a watch stopped.
enum Broken {
    Compacted(i64),
    Failed(LeaseError),
}

impl From<LeaseError> for Broken {
    fn from(e: LeaseError) -> Broken {
        Broken::Failed(e)
    }
}

async fn follow_once(
    endpoints: &[String],
    prefix: &str,
    under: &str,
    tx: &Sender<Signal>,
    resume: Option<i64>,
    failing: &mut bool,
) -> std::result::Result<(), Broken> {
    let mut client = connect(endpoints).await?;
    let revision = match resume {
        Some(revision) => revision,
        None => {
            let (entries, revision) = tokio::time::timeout(RPC_TIMEOUT, list(&mut client, prefix, under))
                .await
                .map_err(|_| store_err("etcd did not answer within 5 s"))??;
            if tx.send(Signal::Update(Update::Snapshot(entries))).is_err() {
                return Ok(());
            }
            revision
        }
    };
    let options = WatchOptions::new().with_prefix().with_start_revision(revision + 1);
    let mut stream = tokio::time::timeout(RPC_TIMEOUT, client.watch(directory(prefix, under), Some(options)))
        .await
        .map_err(|_| store_err("etcd did not answer within 5 s"))?
        .map_err(store_err)?;
    if std::mem::take(failing) {
        tracing::info!("etcd watch: etcd answers again");
    }
    if tx.send(Signal::Healthy).is_err() {
        return Ok(());
    }
    loop {
        let message = tokio::select! {
            message = stream.message() => message.map_err(store_err)?,
            _ = tokio::time::sleep(PROBE_EVERY) => {
                let probe = client.get(format!("{prefix}/"), Some(GetOptions::new().with_count_only()));
                match tokio::time::timeout(PROBE_WAIT, probe).await {
                    Ok(Ok(_)) => continue,
                    Ok(Err(e)) => return Err(store_err(e).into()),
                    Err(_) => return Err(store_err("etcd did not answer within 3 s").into()),
                }
            }
        };
        let Some(resp) = message else { return Err(store_err("the watch stream ended").into()) };
        if resp.compact_revision() > 0 {
            return Err(Broken::Compacted(resp.compact_revision()));
        }
        if resp.canceled() {
            return Err(store_err(format!("the watch was canceled: {}", resp.cancel_reason())).into());
        }
        for event in resp.events() {
            let Some(kv) = event.kv() else { continue };
            let Some(e) = entry(prefix, kv) else { continue };
            let update = match event.event_type() {
                EventType::Put => Update::Put(e),
                EventType::Delete => Update::Delete(e.key),
            };
            if tx.send(Signal::Update(update)).is_err() {
                return Ok(());
            }
        }
    }
}

struct EtcdWatch {
    rx: Receiver<Signal>,
    /// What `wait` received before `poll` asked for it.
    pending: Vec<Update>,
    /// Why etcd does not answer, while it does not.
    failing: Option<String>,
}

impl EtcdWatch {
    fn take(&mut self, signal: Signal) {
        match signal {
            Signal::Update(u) => self.pending.push(u),
            Signal::Failing(e) => self.failing = Some(e),
            Signal::Healthy => self.failing = None,
        }
    }
}

impl KvWatch for EtcdWatch {
    /// The updates so far; an error while etcd does not answer (the updates received are kept
    /// for the next poll).
    fn poll(&mut self) -> Result<Vec<Update>> {
        while let Ok(signal) = self.rx.try_recv() {
            self.take(signal);
        }
        match &self.failing {
            Some(e) => Err(store_err(e)),
            None => Ok(std::mem::take(&mut self.pending)),
        }
    }

    fn wait(&mut self, timeout: Duration) {
        if self.pending.is_empty() {
            if let Ok(signal) = self.rx.recv_timeout(timeout) {
                self.take(signal);
            }
        }
    }
}
