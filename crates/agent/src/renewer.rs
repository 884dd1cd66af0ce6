//! Keeping the node's own lease, on a thread of its own: every call to the store can take
//! seconds while the store is down, and none of them may hold up the agent's loop (peer events,
//! link repair, resync). The loop tells the renewer when the watch shows the lease missing or
//! someone else's; the renewer renews when the lease is due, acquires it again (the same subnet
//! first) when it is lost, and reports each outcome. A failure is retried with a backoff of up to
//! [`MAX_BACKOFF`].

use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, SystemTime};

use weft_lease::{Lease, LeaseAttrs, LeaseError, LeaseStore};
use weft_netconf::NetworkConfig;

/// The longest wait between two tries while the store fails.
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// What the renewer reports to the loop.
#[derive(Debug)]
pub enum Report {
    /// The lease was renewed (same subnet) or acquired again (`reacquired`; the subnet may be
    /// another one).
    Held { lease: Lease, reacquired: bool },
    /// A call to the store failed; it is tried again.
    Failed(String),
}

/// What the loop tells the renewer.
enum Request {
    /// The watch shows the lease missing or someone else's.
    Lost,
    /// Publish these attributes from now on.
    Publish(LeaseAttrs),
}

/// The loop's handle on the renewer thread.
pub struct Renewer {
    tx: Sender<Request>,
    rx: Receiver<Report>,
}

/// When a lease is due for renewal: an hour, or half its TTL, before it expires.
pub fn due(lease: &Lease, ttl: Duration, now: SystemTime) -> bool {
    let margin = Duration::from_secs(3600).min(ttl / 2);
    lease.expires.is_some_and(|e| e.duration_since(now).unwrap_or_default() <= margin)
}

impl Renewer {
    /// Starts the thread with the lease the agent holds.
    pub fn start(
        store: Box<dyn LeaseStore>,
        network: NetworkConfig,
        attrs: LeaseAttrs,
        lease: Lease,
        ttl: Duration,
        random: fn(usize) -> usize,
    ) -> std::io::Result<Renewer> {
        let (tx, requests) = channel();
        let (reports, rx) = channel();
        std::thread::Builder::new().name("weft-renewer".into()).spawn(move || {
            let mut lease = lease;
            let mut attrs = attrs;
            let mut lost = false;
            // New attributes to write over the lease (not a loss).
            let mut publish = false;
            let mut backoff = Duration::from_secs(1);
            let mut wait = Duration::from_secs(1);
            loop {
                // A lost lease reported meanwhile cuts any wait short.
                match requests.recv_timeout(wait) {
                    Ok(Request::Lost) => lost = true,
                    Ok(Request::Publish(new)) => {
                        attrs = new;
                        publish = true;
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => return,
                }
                let now = SystemTime::now();
                if !lost && !publish && !due(&lease, ttl, now) {
                    continue;
                }
                let outcome = if publish {
                    acquire(store.as_ref(), &network, &attrs, &lease, ttl, now, random).map(|(l, _)| {
                        let moved = l.subnet != lease.subnet;
                        (l, lost || moved)
                    })
                } else if lost {
                    // The watch's word may be older than this thread's last renewal or
                    // acquisition (each would then count as a loss): renewed if it is still
                    // this node's, acquired again if not.
                    let with_attrs = Lease { attrs: attrs.clone(), ..lease.clone() };
                    match store.renew(&with_attrs, Some(ttl), now) {
                        Err(LeaseError::NotFound(_)) => {
                            acquire(store.as_ref(), &network, &attrs, &lease, ttl, now, random)
                        }
                        other => other.map(|l| (l, false)),
                    }
                } else {
                    match store.renew(&lease, Some(ttl), now) {
                        Err(LeaseError::NotFound(_)) => {
                            acquire(store.as_ref(), &network, &attrs, &lease, ttl, now, random)
                        }
                        other => other.map(|l| (l, false)),
                    }
                };
                let report = match outcome {
                    Ok((held, reacquired)) => {
                        lease = held.clone();
                        lost = false;
                        publish = false;
                        backoff = Duration::from_secs(1);
                        wait = Duration::from_secs(1);
                        Report::Held { lease: held, reacquired }
                    }
                    Err(e) => {
                        wait = backoff;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        Report::Failed(e.to_string())
                    }
                };
                if reports.send(report).is_err() {
                    return;
                }
            }
        })?;
        Ok(Renewer { tx, rx })
    }

    /// The watch shows the lease missing or someone else's: acquire it again.
    pub fn lost(&self) {
        let _ = self.tx.send(Request::Lost);
    }

    /// Write `attrs` over the lease from now on.
    pub fn publish(&self, attrs: LeaseAttrs) {
        let _ = self.tx.send(Request::Publish(attrs));
    }

    /// What the renewer did since the last call.
    pub fn reports(&self) -> Vec<Report> {
        self.rx.try_iter().collect()
    }
}

fn acquire(
    store: &dyn LeaseStore,
    network: &NetworkConfig,
    attrs: &LeaseAttrs,
    lease: &Lease,
    ttl: Duration,
    now: SystemTime,
    random: fn(usize) -> usize,
) -> weft_lease::Result<(Lease, bool)> {
    let mut random = random;
    store.acquire(network, attrs, Some(lease.subnet), Some(ttl), now, &mut random).map(|l| (l, true))
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use weft_lease::file::FileStore;

    use super::*;

    fn next_report(r: &Renewer) -> Report {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(report) = r.reports().into_iter().next() {
                return report;
            }
            assert!(Instant::now() < deadline, "no report");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The loop's "lost" may be older than the renewer's last renewal (after a store outage the
    /// watch catches up late): a lease still this node's is renewed, not counted as lost and
    /// acquired again (each outage counted two losses).
    #[test]
    fn a_loss_that_is_not_one_is_a_renewal() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let network = NetworkConfig::parse(r#"{"Network": "198.19.0.0/16"}"#).unwrap();
        let attrs = LeaseAttrs {
            public_ip: "198.18.0.1".parse().unwrap(),
            public_ipv6: None,
            backend_type: "host-gw".into(),
            backend_data: serde_json::Value::Null,
        };
        let ttl = Duration::from_secs(3600);
        let lease = store.acquire(&network, &attrs, None, Some(ttl), SystemTime::now(), &mut |_| 0).unwrap();
        let renewer = Renewer::start(Box::new(store.clone()), network, attrs, lease.clone(), ttl, |_| 0).unwrap();
        renewer.lost();
        assert!(matches!(next_report(&renewer), Report::Held { reacquired: false, .. }));
        store.delete(&lease.subnet).unwrap();
        renewer.lost();
        assert!(matches!(next_report(&renewer), Report::Held { reacquired: true, .. }));
    }
}
