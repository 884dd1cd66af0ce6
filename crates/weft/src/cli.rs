//! The command-line interface (`weft --help`).

use std::path::PathBuf;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

/// weft — a container network fabric for Kubernetes-style clusters.
///
/// One binary holds everything. Installed under a CNI plugin's name (bridge, host-local, portmap,
/// loopback, ptp, routed) it is that plugin, taking the same JSON as the reference plugins. Called by a
/// container runtime as `weft` (CNI_COMMAND set) it is the meta plugin that gives pods an address
/// in the node's leased subnet. Run by hand it is this command-line tool.
#[derive(Parser)]
#[command(name = "weft", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Manage weft's CNI plugins.
    #[command(subcommand)]
    Cni(CniCommand),
    /// Run one CNI plugin explicitly (as if invoked under its name): `weft plugin bridge`.
    Plugin {
        /// The plugin type: bridge, host-local, portmap, loopback, ptp, routed or weft.
        name: String,
    },
    /// Show weft's plugins giving two containers a network, in namespaces made for the demo
    /// and removed afterwards. Needs root.
    Demo,
    /// Run the node agent (flanneld's job): lease this node's pod subnet, program the VXLAN or
    /// host-gw dataplane toward every peer, write the subnet file, keep the masquerade and
    /// forward rules. Runs until stopped; never flushes the dataplane.
    Agent(AgentArgs),
    /// A whole cluster on this machine: nodes and pods as network namespaces, real agents and
    /// plugins. Needs root; nothing touches the machine's own network.
    #[command(subcommand)]
    Lab(LabCommand),
    /// weft's BGP speaker: run it as a daemon of its own (what routed mode will embed), or ask
    /// a running one about its neighbours.
    #[command(subcommand)]
    Bgp(BgpCommand),
    /// The udp backend's forwarder: started (detached) by the agent for its TUN device, not by
    /// hand. It moves packets between the TUN and UDP, checks what arrives against its peer
    /// table, and keeps going while the agent is away; it ends when its device goes.
    #[command(hide = true)]
    UdpForwarder(UdpForwarderArgs),
}

#[derive(clap::Args)]
struct UdpForwarderArgs {
    /// The TUN device (made by the agent).
    #[arg(long)]
    device: String,
    /// The UDP port of every node's forwarder.
    #[arg(long, default_value_t = 8285)]
    port: u16,
    /// This node's subnet: what arrives must be for it.
    #[arg(long)]
    subnet: Option<ipnet::Ipv4Net>,
    /// The cluster network.
    #[arg(long)]
    network: Option<ipnet::Ipv4Net>,
    /// The control socket the agent talks to.
    #[arg(long)]
    socket: PathBuf,
    /// Large TCP packets go to the kernel to be cut into datagrams (through a TAP device
    /// beside the TUN) where it can; false: the forwarder cuts them.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    kernel_segmentation: bool,
}

#[derive(Subcommand)]
enum BgpCommand {
    /// Run the speaker until SIGTERM or SIGINT (then its installed routes are removed).
    /// Example: `weft bgp run --local-as 64512 --router-id 198.18.0.1 --neighbor 198.18.0.2,64513
    /// --announce 198.19.1.0/24 --install`.
    Run(Box<crate::bgp::RunArgs>),
    /// Each neighbour's address, AS, state (Idle, Connect, Active, OpenSent, OpenConfirm,
    /// Established), uptime and prefixes received, accepted and advertised.
    Status(crate::bgp::StatusArgs),
}

#[derive(clap::Args)]
struct AgentArgs {
    /// The embedded lease store: a directory shared by every agent on this machine. Ignored
    /// with --etcd-endpoints.
    #[arg(long, default_value = "/var/lib/weft/store")]
    store: PathBuf,
    /// etcd v3 endpoints (comma-separated, e.g. http://10.0.0.1:2379): leases in flannel's
    /// layout, shared with flannel nodes.
    #[arg(long, value_delimiter = ',')]
    etcd_endpoints: Vec<String>,
    /// The etcd key prefix (flannel's default).
    #[arg(long, default_value = weft_lease::etcd::DEFAULT_PREFIX)]
    etcd_prefix: String,
    /// net-conf.json (flannel's format); without it, the config stored in the store is used.
    #[arg(long)]
    net_conf: Option<PathBuf>,
    /// The uplink peers are reached through (default: the interface of the default route).
    #[arg(long)]
    iface: Option<String>,
    /// The address peers reach this node at (default: the uplink's first IPv4 address).
    #[arg(long)]
    public_ip: Option<std::net::Ipv4Addr>,
    /// Where the subnet file is written for the `weft` CNI plugin.
    #[arg(long, default_value = "/run/weft/subnet.env")]
    subnet_file: PathBuf,
    /// Where the agent keeps its own state (the VTEP MAC, stable across restarts).
    #[arg(long, default_value = "/var/lib/weft")]
    state_dir: PathBuf,
    /// Masquerade pod traffic leaving the cluster network (then the bridge plugin does not).
    #[arg(long)]
    ip_masq: bool,
    /// How long a lease lives unless renewed (renewed an hour, or half the TTL, before): 10s to
    /// 87600h.
    #[arg(long, default_value = "24h", value_parser = parse_lease_ttl)]
    lease_ttl: std::time::Duration,
    /// How often everything is checked and reprogrammed even without events: 1s to 24h.
    #[arg(long, default_value = "10s", value_parser = parse_resync)]
    resync: std::time::Duration,
    /// Serve /healthz, /readyz and /metrics on this address (e.g. 127.0.0.1:9901).
    #[arg(long)]
    health: Option<std::net::SocketAddr>,
    /// This node's name, as the bgp backend's RouteReflectors and Peers name nodes (default:
    /// the host name).
    #[arg(long)]
    node_name: Option<String>,
}

#[derive(Subcommand)]
enum LabCommand {
    /// Bring a lab up. Run again on a lab that is up, it starts what died (etcd, the
    /// supervisor) keeping every address; with options that differ from the lab's it says what
    /// differs and changes nothing (unless --recreate). Interrupted (Ctrl-C, SIGTERM) or failing
    /// half-way, it removes what it made.
    Up(crate::lab::UpOptions),
    /// Remove every namespace, process and file of a lab, from whatever state it is in (a lab
    /// that is not there is fine).
    Down {
        #[arg(long, default_value = "weft", value_parser = crate::lab::validate_name)]
        name: String,
    },
    /// Connect pods to each other over TCP (all pairs, or a sample) and report every pair that
    /// fails.
    Check(crate::lab::CheckOptions),
    /// Print a node's lease, routes, FDB and neighbours, or the lab as JSON.
    Show {
        /// Only this node (node1, node2, ...).
        node: Option<String>,
        #[arg(long, default_value = "weft", value_parser = crate::lab::validate_name)]
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Run the lab's agents and restart them when they die (started by `up`).
    #[command(hide = true)]
    Supervise {
        #[arg(long, value_parser = crate::lab::validate_name)]
        name: String,
    },
}

/// `file`, `etcd` or `etcd=http://HOST:PORT`.
pub(crate) fn parse_store(text: &str) -> Result<String, String> {
    match text.split_once('=') {
        None if text == "file" || text == "etcd" => Ok(text.to_string()),
        Some(("etcd", url)) if url.starts_with("http://") && url.trim_start_matches("http://").contains(':') => {
            Ok(text.to_string())
        }
        _ => Err(format!("{text:?}: use file, etcd or etcd=http://HOST:PORT")),
    }
}

/// `500ms`, `10s`, `5m`, `24h`.
pub(crate) fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().map_err(|_| format!("{text:?}: expected a number with a unit, e.g. 10s"))?;
    let scale = match unit {
        "ms" => return Ok(std::time::Duration::from_millis(n)),
        "s" | "" => 1,
        "m" => 60,
        "h" => 3600,
        other => return Err(format!("unknown unit {other:?}: use ms, s, m or h")),
    };
    n.checked_mul(scale).map(std::time::Duration::from_secs).ok_or_else(|| format!("{text:?} is too long"))
}

/// A duration between `min` and `max`.
fn parse_bounded(text: &str, min: u64, max: u64, what: &str) -> Result<std::time::Duration, String> {
    let d = parse_duration(text)?;
    if d < std::time::Duration::from_secs(min) || d > std::time::Duration::from_secs(max) {
        return Err(format!("{text:?}: {what} must be between {min}s and {}h", max / 3600));
    }
    Ok(d)
}

/// A lease TTL: at least 10 s (renewal runs every second), at most ten years.
pub(crate) fn parse_lease_ttl(text: &str) -> Result<std::time::Duration, String> {
    parse_bounded(text, 10, 87_600 * 3600, "a lease TTL")
}

/// The resync period: at least a second (the loop would do nothing else), at most a day.
fn parse_resync(text: &str) -> Result<std::time::Duration, String> {
    parse_bounded(text, 1, 24 * 3600, "the resync period")
}

#[derive(Subcommand)]
enum CniCommand {
    /// Lay weft's plugins down in DIR (e.g. /opt/cni/bin): the weft binary and one symlink per
    /// plugin name. Refuses to replace a file that is not weft's unless --force.
    Install {
        /// The directory a container runtime looks for plugins in (its CNI_PATH).
        #[arg(long, default_value = "/opt/cni/bin")]
        dir: PathBuf,
        /// Replace existing files even when they are not weft's (another vendor's plugins).
        #[arg(long)]
        force: bool,
    },
    /// List the plugin types weft provides.
    List,
    /// Delete the veths retired by plugins' DELs in this namespace (started by the plugins
    /// themselves; one at a time per namespace).
    #[command(hide = true)]
    Reap,
}

/// The options of `weft lab up` given on the command line (not defaults).
fn explicit_up_options(matches: &clap::ArgMatches) -> Vec<String> {
    let Some(up) = matches.subcommand_matches("lab").and_then(|m| m.subcommand_matches("up")) else {
        return Vec::new();
    };
    up.ids()
        .filter(|id| up.value_source(id.as_str()) == Some(clap::parser::ValueSource::CommandLine))
        .map(|id| id.to_string())
        .collect()
}

pub fn main() -> i32 {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let outcome = match cli.command {
        Command::Cni(CniCommand::Install { dir, force }) => crate::install::install(&dir, force),
        Command::Cni(CniCommand::List) => {
            for name in weft_plugins::PLUGIN_NAMES {
                outln!("{name}");
            }
            Ok(())
        }
        Command::Cni(CniCommand::Reap) => {
            weft_plugins::teardown::reap().map_err(|e| anyhow::anyhow!("reaping retired veths: {e}"))
        }
        Command::Plugin { name } => match weft_plugins::by_name(&name) {
            Some(plugin) => return crate::run_plugin(plugin.as_ref()),
            None => Err(anyhow::anyhow!(
                "unknown plugin {name:?}; weft provides: {}",
                weft_plugins::PLUGIN_NAMES.join(", ")
            )),
        },
        Command::Demo => crate::demo::run(),
        Command::Agent(a) => {
            weft_agent::log::init();
            weft_agent::agent::run(weft_agent::agent::AgentConfig {
                store: if a.etcd_endpoints.is_empty() {
                    weft_agent::agent::StoreConfig::File(a.store)
                } else {
                    weft_agent::agent::StoreConfig::Etcd { endpoints: a.etcd_endpoints, prefix: a.etcd_prefix }
                },
                net_conf: a.net_conf,
                iface: a.iface,
                public_ip: a.public_ip,
                subnet_file: a.subnet_file,
                state_dir: a.state_dir,
                ip_masq: a.ip_masq,
                lease_ttl: a.lease_ttl,
                resync: a.resync,
                health: a.health,
                node_name: a.node_name,
            })
            .map_err(|e| anyhow::anyhow!("agent: {e}"))
        }
        Command::Lab(LabCommand::Up(opts)) => crate::lab::up(&opts, &explicit_up_options(&matches)),
        Command::Lab(LabCommand::Down { name }) => crate::lab::down(&name),
        Command::Lab(LabCommand::Check(opts)) => crate::lab::check(&opts),
        Command::Lab(LabCommand::Show { node, name, json }) => crate::lab::show(&name, node.as_deref(), json),
        Command::Lab(LabCommand::Supervise { name }) => crate::lab::supervise(&name),
        Command::Bgp(BgpCommand::Run(args)) => {
            weft_agent::log::init();
            crate::bgp::run(*args)
        }
        Command::Bgp(BgpCommand::Status(args)) => crate::bgp::status(args),
        Command::UdpForwarder(a) => {
            weft_agent::log::init();
            weft_udp::forwarder::run(weft_udp::forwarder::Config {
                device: a.device,
                port: a.port,
                subnet: a.subnet,
                network: a.network,
                socket: a.socket,
                kernel_segmentation: a.kernel_segmentation,
            })
            .map_err(|e| anyhow::anyhow!("udp forwarder: {e}"))
        }
    };
    match outcome {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("weft: {e:#}");
            1
        }
    }
}
