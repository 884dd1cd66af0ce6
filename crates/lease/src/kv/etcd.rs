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
        Ok(EtcdKv { rt: Arc::new(rt), endpoints, prefix: prefix.trim_end_matches('/').to_string(), client })
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
        self.call(|mut client| {
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
                        let old = gets.first().filter(|_| gets.len() == 2).map_or(0, |kv| kv.lease());
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
                outcome.map(|_| written)
            }
        })
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
    }

    fn watch(&self, under: &str, from: Option<i64>) -> Result<Box<dyn KvWatch>> {
        let (tx, rx) = channel();
        let (endpoints, prefix, under) = (self.endpoints.clone(), self.prefix.clone(), under.to_string());
        std::thread::Builder::new()
            .name("etcd-watch".into())
            .spawn(move || follow(endpoints, prefix, under, tx, from))
            .map_err(store_err)?;
        Ok(Box::new(EtcdWatch { rx, pending: None }))
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

/// List, then watch from the listed revision; on compaction, cancellation or a lost
/// connection, list again (a snapshot). Ends when the receiver is gone.
fn follow(endpoints: Vec<String>, prefix: String, under: String, tx: Sender<Update>, mut resume: Option<i64>) {
    let Ok(rt) = runtime() else { return };
    rt.block_on(async move {
        loop {
            match follow_once(&endpoints, &prefix, &under, &tx, resume.take()).await {
                Ok(()) => return, // receiver gone
                Err(e) => {
                    tracing::warn!("etcd watch: {e}; listing again in 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    });
}

async fn follow_once(
    endpoints: &[String],
    prefix: &str,
    under: &str,
    tx: &Sender<Update>,
    resume: Option<i64>,
) -> Result<()> {
    let mut client = connect(endpoints).await?;
    let revision = match resume {
        Some(revision) => revision,
        None => {
            let (entries, revision) = list(&mut client, prefix, under).await?;
            if tx.send(Update::Snapshot(entries)).is_err() {
                return Ok(());
            }
            revision
        }
    };
    let options = WatchOptions::new().with_prefix().with_start_revision(revision + 1);
    let mut stream = client.watch(directory(prefix, under), Some(options)).await.map_err(store_err)?;
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
            let Some(e) = entry(prefix, kv) else { continue };
            let update = match event.event_type() {
                EventType::Put => Update::Put(e),
                EventType::Delete => Update::Delete(e.key),
            };
            if tx.send(update).is_err() {
                return Ok(());
            }
        }
    }
}

struct EtcdWatch {
    rx: Receiver<Update>,
    /// An update `wait` received before `poll` asked for it.
    pending: Option<Update>,
}

impl KvWatch for EtcdWatch {
    fn poll(&mut self) -> Result<Vec<Update>> {
        let mut updates: Vec<Update> = self.pending.take().into_iter().collect();
        updates.extend(self.rx.try_iter());
        Ok(updates)
    }

    fn wait(&mut self, timeout: Duration) {
        if self.pending.is_none() {
            self.pending = self.rx.recv_timeout(timeout).ok();
        }
    }
}
