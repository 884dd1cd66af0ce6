//! `/healthz`, `/readyz` and Prometheus `/metrics`, served by hyper on a thread of its own (one
//! small tokio runtime): every connection is a task, so an idle or half-written one never holds
//! up a probe, and one that sends no complete request within [`HEADER_TIMEOUT`] is closed.
//!
//! Ready means the node can carry pods: its lease is held, its dataplane was programmed without
//! error and its store answers. `/readyz` says which of these is missing.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
pub use hyper::StatusCode;
use hyper::{Request, Response};

/// How long a client may take to send its request line and headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// What the agent reports; updated by the loop, read by the listener.
#[derive(Debug, Clone)]
pub struct Status {
    /// The lease is held, the rules and the subnet file are in place (set once at start).
    pub started: bool,
    /// The last attempt to program the dataplane (VTEP, peers, rules) succeeded.
    pub dataplane_up: bool,
    /// The last call to the store succeeded.
    pub store_up: bool,
    pub lease: Option<String>,
    pub peers: usize,
    pub leases: usize,
    pub reconciles: u64,
    pub reconcile_errors: u64,
    pub store_errors: u64,
    pub reconcile_seconds_sum: f64,
    pub last_event_to_kernel_seconds: f64,
    pub vtep_recreated: u64,
    pub lease_reacquired: u64,
    /// Store entries that could not be read as leases (skipped).
    pub damaged_leases: usize,
    /// The control socket of the backend's userspace forwarder (`udp`), whose counters
    /// /metrics shows too.
    pub forwarder: Option<std::path::PathBuf>,
    /// That forwarder does not answer (asked when a probe comes).
    pub forwarder_down: bool,
    /// Routed mode: the blocks this node holds, and its BGP speaker's status.
    pub blocks: usize,
    pub bgp: Option<serde_json::Value>,
}

impl Default for Status {
    fn default() -> Self {
        Status {
            started: false,
            dataplane_up: true,
            store_up: true,
            lease: None,
            peers: 0,
            leases: 0,
            reconciles: 0,
            reconcile_errors: 0,
            store_errors: 0,
            reconcile_seconds_sum: 0.0,
            last_event_to_kernel_seconds: 0.0,
            vtep_recreated: 0,
            lease_reacquired: 0,
            damaged_leases: 0,
            forwarder: None,
            forwarder_down: false,
            blocks: 0,
            bgp: None,
        }
    }
}

impl Status {
    /// Ready, or what is missing.
    pub fn readiness(&self) -> Result<(), String> {
        let mut missing = Vec::new();
        if !self.started {
            missing.push("the lease, rules and subnet file are not in place yet");
        }
        if !self.dataplane_up {
            missing.push("the dataplane could not be programmed (see the log)");
        }
        if !self.store_up {
            missing.push("the lease store does not answer");
        }
        if self.forwarder_down {
            missing.push("the udp forwarder does not answer");
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(missing.join("; "))
        }
    }

    pub fn metrics(&self) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"));
        };
        let gauge = |b: bool| u8::from(b).to_string();
        metric("weft_ready", "gauge", "1 when the node can carry pods (see /readyz).", gauge(self.readiness().is_ok()));
        metric(
            "weft_dataplane_up",
            "gauge",
            "1 when the dataplane was last programmed without error.",
            gauge(self.dataplane_up),
        );
        metric("weft_store_up", "gauge", "1 when the lease store last answered.", gauge(self.store_up));
        metric(
            "weft_store_errors_total",
            "counter",
            "Calls to the lease store that failed.",
            self.store_errors.to_string(),
        );
        metric("weft_leases", "gauge", "Leases in the store.", self.leases.to_string());
        metric(
            "weft_leases_damaged",
            "gauge",
            "Store entries that cannot be read as leases (skipped; see the log).",
            self.damaged_leases.to_string(),
        );
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

/// The udp forwarder's counters (its status, or none when it does not answer) in Prometheus'
/// text format: packets and bytes each way, drops by reason.
pub fn forwarder_metrics(status: Option<&serde_json::Value>) -> String {
    let mut out = String::new();
    out.push_str(
        "# HELP weft_udp_forwarder_up 1 when the udp forwarder answers.\n# TYPE weft_udp_forwarder_up gauge\n",
    );
    out.push_str(&format!("weft_udp_forwarder_up {}\n", u8::from(status.is_some())));
    let Some(status) = status else { return out };
    let c = &status["counters"];
    for unit in ["packets", "bytes"] {
        let name = format!("weft_udp_{unit}_total");
        out.push_str(&format!("# HELP {name} {unit} through the udp forwarder, by where they came from and went.\n"));
        out.push_str(&format!("# TYPE {name} counter\n"));
        for (direction, key) in
            [("tun_in", "tun_rx"), ("udp_out", "udp_tx"), ("udp_in", "udp_rx"), ("tun_out", "tun_tx")]
        {
            out.push_str(&format!("{name}{{direction=\"{direction}\"}} {}\n", c[format!("{key}_{unit}")]));
        }
    }
    out.push_str("# HELP weft_udp_dropped_total Packets the forwarder dropped, by reason.\n# TYPE weft_udp_dropped_total counter\n");
    for (reason, n) in c["drops"].as_object().into_iter().flatten() {
        out.push_str(&format!("weft_udp_dropped_total{{reason=\"{reason}\"}} {n}\n"));
    }
    out.push_str(
        "# HELP weft_udp_icmp_sent_total ICMP net unreachable sent to pods.\n# TYPE weft_udp_icmp_sent_total counter\n",
    );
    out.push_str(&format!("weft_udp_icmp_sent_total {}\n", c["icmp_sent"]));
    out.push_str(
        "# HELP weft_udp_kernel_segmentation 1 when large TCP packets go to the kernel to be cut.\n# TYPE weft_udp_kernel_segmentation gauge\n",
    );
    out.push_str(&format!("weft_udp_kernel_segmentation {}\n", u8::from(status["kernel_cut"]["device"].is_string())));
    out.push_str(
        "# HELP weft_udp_kernel_cut_total Large TCP packets handed to the kernel to cut.\n# TYPE weft_udp_kernel_cut_total counter\n",
    );
    out.push_str(&format!("weft_udp_kernel_cut_total {}\n", c["kernel_cut"]));
    out.push_str(
        "# HELP weft_udp_whole_received_total Datagrams that came uncut from a peer's kernel, written whole.\n# TYPE weft_udp_whole_received_total counter\n",
    );
    out.push_str(&format!("weft_udp_whole_received_total {}\n", c["whole_received"]));
    let taking = status["kernel_cut"]["peers"].as_object().map_or(0, |p| p.values().filter(|v| **v == true).count());
    out.push_str(
        "# HELP weft_udp_kernel_cut_peers Peers that answered the probe: they get what the kernel cuts.\n# TYPE weft_udp_kernel_cut_peers gauge\n",
    );
    out.push_str(&format!("weft_udp_kernel_cut_peers {taking}\n"));
    out.push_str(
        "# HELP weft_udp_probes_total Probes for kernel-cut sends: sent, answered; peers' probes answered, withheld (over the limit).\n# TYPE weft_udp_probes_total counter\n",
    );
    for (what, key) in [
        ("sent", "probes_sent"),
        ("answered", "probes_answered"),
        ("answers_sent", "probe_answers_sent"),
        ("answers_withheld", "probe_answers_withheld"),
    ] {
        out.push_str(&format!("weft_udp_probes_total{{what=\"{what}\"}} {}\n", c[key].as_u64().unwrap_or(0)));
    }
    out
}

/// The status JSON as Prometheus metrics: the table's, and one series per neighbour.
pub fn bgp_metrics(v: &serde_json::Value) -> String {
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, samples: Vec<(String, String)>| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n"));
        for (labels, value) in samples {
            out.push_str(&format!("{name}{labels} {value}\n"));
        }
    };
    gauge(
        "weft_bgp_routes",
        "Prefixes with a best path (own and learned).",
        vec![(String::new(), v["routes"].to_string())],
    );
    gauge(
        "weft_bgp_routes_installed",
        "Learned best routes (what goes into the kernel with --install).",
        vec![(String::new(), v["installed"].to_string())],
    );
    let neighbors = v["neighbors"].as_array().cloned().unwrap_or_default();
    let per_neighbor = |value: &dyn Fn(&serde_json::Value) -> String| -> Vec<(String, String)> {
        neighbors
            .iter()
            .map(|n| {
                let labels = format!("{{neighbor=\"{}\",as=\"{}\"}}", n["address"].as_str().unwrap_or("?"), n["as"]);
                (labels, value(n))
            })
            .collect()
    };
    gauge(
        "weft_bgp_session_established",
        "1 when the session is Established.",
        per_neighbor(&|n| u8::from(n["state"] == "Established").to_string()),
    );
    gauge(
        "weft_bgp_session_uptime_seconds",
        "How long the session has been Established.",
        per_neighbor(&|n| n["uptime_seconds"].to_string()),
    );
    for (key, help) in [
        ("prefixes_received", "Prefixes the neighbour announces."),
        ("prefixes_accepted", "Of those, the ones the import policy accepted."),
        ("prefixes_advertised", "Prefixes sent to the neighbour."),
    ] {
        gauge(&format!("weft_bgp_{key}"), help, per_neighbor(&|n| n[key].to_string()));
    }
    out
}

/// The answer to one request.
pub fn respond(path: &str, status: &Status) -> (StatusCode, String) {
    // A userspace forwarder is asked at each probe: the node carries no pod traffic without it.
    let forwarder = status.forwarder.as_ref().filter(|_| path != "/healthz").map(|s| crate::tun::status(s));
    let status = &Status { forwarder_down: forwarder.as_ref().is_some_and(Option::is_none), ..status.clone() };
    match path {
        "/healthz" => (StatusCode::OK, "ok\n".into()),
        "/readyz" => match status.readiness() {
            Ok(()) => (StatusCode::OK, "ready\n".into()),
            Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
        },
        "/metrics" => {
            let mut text = status.metrics();
            if let Some(answer) = &forwarder {
                text.push_str(&forwarder_metrics(answer.as_ref()));
            }
            if let Some(bgp) = &status.bgp {
                text.push_str(&format!(
                    "# HELP weft_blocks IPAM blocks this node holds.\n# TYPE weft_blocks gauge\nweft_blocks {}\n",
                    status.blocks
                ));
                text.push_str(&bgp_metrics(bgp));
            }
            (StatusCode::OK, text)
        }
        _ => (StatusCode::NOT_FOUND, "not found: try /healthz, /readyz or /metrics\n".into()),
    }
}

/// What answers a request: the status code and the body for a path.
pub type Responder = Arc<dyn Fn(&str) -> (StatusCode, String) + Send + Sync>;

async fn handle(
    req: Request<hyper::body::Incoming>,
    responder: Responder,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_string();
    // A responder may wait (on another process); it does so off the accepting thread.
    let (code, body) = tokio::task::spawn_blocking(move || responder(&path))
        .await
        .unwrap_or_else(|_| (StatusCode::INTERNAL_SERVER_ERROR, "the responder failed\n".into()));
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = code;
    if let Ok(value) = "text/plain; version=0.0.4".parse() {
        response.headers_mut().insert(hyper::header::CONTENT_TYPE, value);
    }
    Ok(response)
}

/// Serves the agent's endpoints on `addr` from a background thread; returns the bound address.
pub fn serve(addr: SocketAddr, status: Arc<Mutex<Status>>) -> std::io::Result<SocketAddr> {
    serve_with(
        addr,
        Arc::new(move |path| {
            let snapshot = status.lock().map(|s| s.clone()).unwrap_or_else(|e| e.into_inner().clone());
            respond(path, &snapshot)
        }),
    )
}

/// Serves what `responder` says on `addr` from a background thread; returns the bound address.
pub fn serve_with(addr: SocketAddr, responder: Responder) -> std::io::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let bound = listener.local_addr()?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build()?;
    std::thread::Builder::new().name("weft-http".into()).spawn(move || {
        runtime.block_on(async move {
            let Ok(listener) = tokio::net::TcpListener::from_std(listener) else { return };
            loop {
                let stream = match listener.accept().await {
                    Ok((stream, _)) => stream,
                    // Out of descriptors, most likely: not a reason to spin.
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let responder = responder.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| handle(req, responder.clone()));
                    let connection = hyper::server::conn::http1::Builder::new()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(HEADER_TIMEOUT)
                        .keep_alive(false)
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                    let _ = connection.await;
                });
            }
        });
    })?;
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_names_what_is_missing() {
        let mut s = Status { started: true, ..Status::default() };
        assert_eq!(respond("/readyz", &s).0, StatusCode::OK);
        s.dataplane_up = false;
        s.store_up = false;
        let (code, body) = respond("/readyz", &s);
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("dataplane") && body.contains("store"), "{body}");
        let metrics = s.metrics();
        assert!(metrics.contains("weft_ready 0") && metrics.contains("weft_store_up 0"), "{metrics}");
        assert_eq!(respond("/healthz", &s).0, StatusCode::OK);
        assert_eq!(respond("/nope", &s).0, StatusCode::NOT_FOUND);
    }

    #[test]
    fn a_forwarder_that_does_not_answer_makes_the_node_not_ready() {
        let status = Status {
            started: true,
            forwarder: Some(std::env::temp_dir().join("weft-no-such-forwarder.sock")),
            ..Status::default()
        };
        let (code, body) = respond("/readyz", &status);
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("udp forwarder"), "{body}");
        let (_, metrics) = respond("/metrics", &status);
        assert!(metrics.contains("weft_ready 0") && metrics.contains("weft_udp_forwarder_up 0"), "{metrics}");
        assert_eq!(respond("/healthz", &status).0, StatusCode::OK);
    }

    #[test]
    fn forwarder_counters_as_metrics() {
        assert_eq!(forwarder_metrics(None).lines().last(), Some("weft_udp_forwarder_up 0"));
        let status = serde_json::json!({"counters": {"tun_rx_packets": 5, "tun_rx_bytes": 500, "udp_tx_packets": 4,
            "udp_tx_bytes": 400, "udp_rx_packets": 3, "udp_rx_bytes": 300, "tun_tx_packets": 2, "tun_tx_bytes": 200,
            "icmp_sent": 1, "kernel_cut": 9, "whole_received": 8, "probe_answers_withheld": 6, "drops": {"unknown_source": 7, "malformed": 0}},
            "kernel_cut": {"device": "weft-udp-tx", "peers": {"198.18.0.3": true, "198.18.0.4": false}}});
        let m = forwarder_metrics(Some(&status));
        for line in [
            "weft_udp_forwarder_up 1",
            "weft_udp_packets_total{direction=\"udp_out\"} 4",
            "weft_udp_bytes_total{direction=\"tun_in\"} 500",
            "weft_udp_bytes_total{direction=\"tun_out\"} 200",
            "weft_udp_dropped_total{reason=\"unknown_source\"} 7",
            "weft_udp_icmp_sent_total 1",
            "weft_udp_kernel_segmentation 1",
            "weft_udp_kernel_cut_total 9",
            "weft_udp_whole_received_total 8",
            "weft_udp_kernel_cut_peers 1",
            "weft_udp_probes_total{what=\"answers_withheld\"} 6",
        ] {
            assert!(m.lines().any(|l| l == line), "{line} not in\n{m}");
        }
    }

    #[test]
    fn an_idle_connection_does_not_hold_up_a_probe() {
        use std::io::{Read, Write};
        let status = Arc::new(Mutex::new(Status { started: true, ..Status::default() }));
        let addr = serve("127.0.0.1:0".parse().unwrap(), status).unwrap();
        // One connection that says nothing, one that sends half a request line.
        let _idle = std::net::TcpStream::connect(addr).unwrap();
        let mut half = std::net::TcpStream::connect(addr).unwrap();
        half.write_all(b"GET /hea").unwrap();
        let started = std::time::Instant::now();
        let mut probe = std::net::TcpStream::connect(addr).unwrap();
        probe.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        probe.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut reply = String::new();
        probe.read_to_string(&mut reply).unwrap();
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        assert!(started.elapsed() < Duration::from_secs(2), "the probe waited {:?}", started.elapsed());
    }
}
