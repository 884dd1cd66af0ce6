//! `host-local`: addresses from configured ranges, reserved on the node's disk in the reference
//! plugin's format (see [`weft_ipam::store`]).

use std::net::IpAddr;
use std::path::PathBuf;

use serde::Deserialize;
use serde_json::Value;
use weft_cni::args::CmdArgs;
use weft_cni::skel::{parse_plugin_conf, Attachment, Plugin};
use weft_cni::{CniError, CniResult, Dns, ErrorCode, IpConfig, NetConf, Route};
use weft_ipam::range::{canonicalize, RangeConfig};
use weft_ipam::{Allocator, IpamError, RangeSet, Store};

pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/networks";

pub struct HostLocal;

/// The `ipam` section host-local reads.
#[derive(Debug, Deserialize)]
struct IpamConf {
    #[serde(default)]
    ranges: Vec<Vec<RangeConfig>>,
    #[serde(default)]
    routes: Vec<Route>,
    #[serde(rename = "dataDir", default)]
    data_dir: Option<PathBuf>,
    #[serde(rename = "resolvConf", default)]
    resolv_conf: Option<PathBuf>,
    // The legacy single-range form.
    #[serde(default)]
    subnet: Option<String>,
    #[serde(rename = "rangeStart", default)]
    range_start: Option<IpAddr>,
    #[serde(rename = "rangeEnd", default)]
    range_end: Option<IpAddr>,
    #[serde(default)]
    gateway: Option<IpAddr>,
}

#[derive(Debug, Deserialize)]
struct Conf {
    #[serde(default)]
    name: String,
    ipam: Option<IpamConf>,
}

/// host-local's config, checked.
pub(crate) struct Loaded {
    network: String,
    sets: Vec<RangeSet>,
    routes: Vec<Route>,
    data_dir: PathBuf,
    resolv_conf: Option<PathBuf>,
}

pub(crate) fn load(stdin: &[u8]) -> Result<Loaded, CniError> {
    let conf: Conf = parse_plugin_conf(stdin)?;
    let ipam = conf.ipam.ok_or_else(|| CniError::invalid_config("IPAM config missing 'ipam' key"))?;
    let mut ranges = ipam.ranges;
    if let Some(subnet) = ipam.subnet {
        ranges.insert(
            0,
            vec![RangeConfig {
                subnet,
                range_start: ipam.range_start,
                range_end: ipam.range_end,
                gateway: ipam.gateway,
            }],
        );
    }
    if ranges.is_empty() {
        return Err(CniError::invalid_config("no IP ranges specified"));
    }
    let sets = canonicalize(&ranges).map_err(|e| CniError::invalid_config(e.to_string()))?;
    if conf.name.is_empty() || conf.name.contains('/') || conf.name.starts_with('.') {
        return Err(CniError::invalid_config(format!("invalid network name {:?}", conf.name)));
    }
    Ok(Loaded {
        network: conf.name,
        sets,
        routes: ipam.routes,
        data_dir: ipam.data_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
        resolv_conf: ipam.resolv_conf,
    })
}

/// The addresses the runtime asked for: `CNI_ARGS IP=`, `args.cni.ips`, `runtimeConfig.ips`.
pub(crate) fn requested_ips(args: &CmdArgs, stdin: &Value) -> Result<Vec<IpAddr>, CniError> {
    let mut texts: Vec<String> = Vec::new();
    if let Some(ip) = args.arg("IP") {
        texts.extend(ip.split(',').map(String::from));
    }
    for source in [&stdin["args"]["cni"]["ips"], &stdin["runtimeConfig"]["ips"]] {
        texts.extend(source.as_array().into_iter().flatten().filter_map(Value::as_str).map(String::from));
    }
    let mut ips = Vec::new();
    for text in texts.iter().map(|t| t.trim()).filter(|t| !t.is_empty()) {
        let ip_part = text.split('/').next().unwrap_or(text);
        let ip: IpAddr =
            ip_part.parse().map_err(|_| CniError::invalid_config(format!("invalid requested IP address {text:?}")))?;
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    Ok(ips)
}

fn ipam_error(e: IpamError) -> CniError {
    match e {
        IpamError::Io { .. } => CniError::io(e.to_string()),
        other => CniError::internal(other.to_string()),
    }
}

/// Marks the store clean. A failure only means the next call walks the directory once: the
/// call's own outcome stands.
fn commit(store: Store) {
    if let Err(e) = store.commit() {
        eprintln!("host-local: {e}; the next call checks the store");
    }
}

fn open_store(loaded: &Loaded) -> Result<Store, CniError> {
    Store::open(&loaded.data_dir, &loaded.network).map_err(ipam_error)
}

/// The `resolvConf` file as a DNS result.
fn read_resolv_conf(path: &std::path::Path) -> Result<Dns, CniError> {
    let text = std::fs::read_to_string(path).map_err(|e| CniError::io(format!("reading {}: {e}", path.display())))?;
    let mut dns = Dns::default();
    for line in text.lines().map(str::trim).filter(|l| !l.starts_with('#') && !l.starts_with(';')) {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => dns.nameservers.extend(words.next().map(String::from)),
            Some("domain") => dns.domain = words.next().unwrap_or_default().to_string(),
            Some("search") => dns.search = words.map(String::from).collect(),
            Some("options") => dns.options.extend(words.map(String::from)),
            _ => {}
        }
    }
    Ok(dns)
}

/// ADD: reserve one address per range set.
pub fn add(args: &CmdArgs) -> Result<CniResult, CniError> {
    // The attachment's index entry is named `<containerID>@<ifname>`: a file name, 255 bytes.
    if args.container_id.len() + 1 + args.ifname.len() > 255 {
        return Err(CniError::new(
            weft_cni::ErrorCode::InvalidEnvironment,
            format!("containerID too long for host-local: at most {} characters", 254 - args.ifname.len()),
        ));
    }
    let loaded = load(&args.stdin)?;
    let stdin: Value = serde_json::from_slice(&args.stdin).unwrap_or_default();
    let requested = requested_ips(args, &stdin)?;
    let dns = loaded.resolv_conf.as_deref().map(read_resolv_conf).transpose()?.unwrap_or_default();
    let mut store = open_store(&loaded)?;
    let allocated = Allocator::new(&mut store, &loaded.sets).allocate(&args.container_id, &args.ifname, &requested);
    // A refused or exhausted allocation undid itself: the store is consistent. After an I/O
    // failure it may not be: left unmarked, the next call repairs it.
    if !matches!(allocated, Err(IpamError::Io { .. })) {
        commit(store);
    }
    let allocations = allocated.map_err(ipam_error)?;
    Ok(CniResult {
        cni_version: String::new(),
        interfaces: Vec::new(),
        ips: allocations
            .into_iter()
            .map(|a| IpConfig { interface: None, address: a.address, gateway: Some(a.gateway) })
            .collect(),
        routes: loaded.routes,
        dns,
    })
}

/// DEL: release what the attachment holds (the prevResult's addresses are used as hints).
pub fn del(args: &CmdArgs, conf: &NetConf) -> Result<(), CniError> {
    let loaded = load(&args.stdin)?;
    let hints: Vec<IpAddr> = crate::common::prev_result(conf)
        .ok()
        .flatten()
        .map(|r| r.ips.iter().map(|ip| ip.address.addr()).collect())
        .unwrap_or_default();
    let mut store = open_store(&loaded)?;
    Allocator::new(&mut store, &loaded.sets).release(&args.container_id, &args.ifname, &hints).map_err(ipam_error)?;
    commit(store);
    Ok(())
}

/// CHECK: the attachment still holds an address.
pub fn check(args: &CmdArgs) -> Result<(), CniError> {
    let loaded = load(&args.stdin)?;
    let mut store = open_store(&loaded)?;
    let held = store.held(&args.container_id, &args.ifname).map_err(ipam_error)?;
    commit(store);
    if held.is_empty() {
        return Err(CniError::internal(format!(
            "host-local: Failed to find address added by container {}",
            args.container_id
        )));
    }
    Ok(())
}

/// GC: release every reservation whose attachment is not in `valid`.
pub fn gc(args: &CmdArgs, valid: &[Attachment]) -> Result<(), CniError> {
    let loaded = load(&args.stdin)?;
    let mut store = open_store(&loaded)?;
    let is_valid = |c: &str, i: &str| valid.iter().any(|a| a.container_id == c && a.ifname == i);
    for (ip, c, i) in store.reservations().map_err(ipam_error)? {
        if !is_valid(&c, &i) {
            store.release_if_owned(&c, &i, ip).map_err(ipam_error)?;
        }
    }
    for (c, i) in store.entries() {
        if !is_valid(&c, &i) {
            store.close_entry(&c, &i, &[]).map_err(ipam_error)?;
        }
    }
    commit(store);
    Ok(())
}

impl Plugin for HostLocal {
    fn name(&self) -> &'static str {
        "host-local"
    }

    fn uses_netns(&self) -> bool {
        false
    }

    fn add(&self, args: &CmdArgs, _conf: &NetConf) -> Result<CniResult, CniError> {
        add(args)
    }

    fn del(&self, args: &CmdArgs, conf: &NetConf) -> Result<(), CniError> {
        del(args, conf)
    }

    fn check(&self, args: &CmdArgs, _conf: &NetConf) -> Result<(), CniError> {
        check(args)
    }

    fn status(&self, args: &CmdArgs, _conf: &NetConf) -> Result<(), CniError> {
        let loaded = load(&args.stdin)?;
        open_store(&loaded).map(commit).map_err(|e| CniError::new(ErrorCode::NotAvailable, e.msg))
    }

    fn gc(&self, args: &CmdArgs, _conf: &NetConf, valid: &[Attachment]) -> Result<(), CniError> {
        gc(args, valid)
    }
}
