//! `/healthz`, `/readyz` and Prometheus `/metrics` on a small HTTP/1.0 listener (a thread, no
//! framework: three fixed pages).

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};

/// What the agent reports; updated by the loop, read by the listener.
#[derive(Debug, Default, Clone)]
pub struct Status {
    pub ready: bool,
    pub lease: Option<String>,
    pub peers: usize,
    pub leases: usize,
    pub reconciles: u64,
    pub reconcile_errors: u64,
    pub reconcile_seconds_sum: f64,
    pub last_event_to_kernel_seconds: f64,
    pub vtep_recreated: u64,
    pub lease_reacquired: u64,
}

impl Status {
    fn metrics(&self) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"));
        };
        metric(
            "weft_ready",
            "gauge",
            "1 once the rules and the subnet file are in place.",
            u8::from(self.ready).to_string(),
        );
        metric("weft_leases", "gauge", "Leases in the store.", self.leases.to_string());
        metric("weft_peers", "gauge", "Peers programmed in the dataplane.", self.peers.to_string());
        metric("weft_reconciles_total", "counter", "Reconciles run.", self.reconciles.to_string());
        metric("weft_reconcile_errors_total", "counter", "Reconciles that failed.", self.reconcile_errors.to_string());
        metric(
            "weft_reconcile_seconds_sum",
            "counter",
            "Time spent reconciling.",
            format!("{:.6}", self.reconcile_seconds_sum),
        );
        metric(
            "weft_event_to_kernel_seconds",
            "gauge",
            "From the last lease event seen to its kernel objects in place.",
            format!("{:.6}", self.last_event_to_kernel_seconds),
        );
        metric(
            "weft_vtep_recreated_total",
            "counter",
            "Times the VTEP was found missing and recreated.",
            self.vtep_recreated.to_string(),
        );
        metric(
            "weft_lease_reacquired_total",
            "counter",
            "Times the own lease was lost and acquired again.",
            self.lease_reacquired.to_string(),
        );
        out
    }
}

/// Serves the endpoints on `addr` from a background thread; returns the bound address.
pub fn serve(addr: SocketAddr, status: Arc<Mutex<Status>>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let bound = listener.local_addr()?;
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let mut reader = BufReader::new(&conn);
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
            let snapshot = status.lock().map(|s| s.clone()).unwrap_or_default();
            let (code, body) = match path.as_str() {
                "/healthz" => (200, "ok\n".to_string()),
                "/readyz" if snapshot.ready => (200, "ready\n".to_string()),
                "/readyz" => (503, "not ready\n".to_string()),
                "/metrics" => (200, snapshot.metrics()),
                _ => (404, "not found\n".to_string()),
            };
            let reason = match code {
                200 => "OK",
                503 => "Service Unavailable",
                _ => "Not Found",
            };
            let mut conn = &conn;
            let _ = write!(
                conn,
                "HTTP/1.0 {code} {reason}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
        }
    });
    Ok(bound)
}
