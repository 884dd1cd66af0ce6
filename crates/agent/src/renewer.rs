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
                let outcome = if lost || publish {
                    acquire(store.as_ref(), &network, &attrs, &lease, ttl, now, random).map(|(l, _)| {
                        let moved = l.subnet != lease.subnet;
                        (l, lost || moved)
                    })
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
