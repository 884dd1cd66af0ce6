//! The thin executor: carries out the core's kernel actions through [`Kernel`], an interface a
//! test replaces with a fake ([`NetlinkKernel`] is the real one). Desired state names devices;
//! they are resolved to indexes here, just before planning, and a reconcile reads only what its
//! owner holds.

use std::collections::HashMap;
use std::path::PathBuf;

use ipnet::Ipv4Net;
use weft_dataplane::error::ignore_not_found;
use weft_dataplane::{Netlink, RouteSpec};
use weft_netconf::SubnetEnv;

use crate::core::{Action, Done};
use crate::model::{plan, plan_change, DeviceSpec, Fdb, Neighbour, Op, Owner, Resolved, Route, Tunnel};
use crate::{firewall, kernel, tun, vtep, AgentError, Result};

/// A link, as the agent needs to know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkInfo {
    pub index: u32,
    pub mtu: u32,
}

/// What the agent does to the node.
pub trait Kernel {
    /// The link named `name`, if there is one.
    fn link(&mut self, name: &str) -> Result<Option<LinkInfo>>;
    /// The index of the link named `name`; it may be remembered until [`Kernel::forget_links`].
    fn index(&mut self, name: &str) -> Result<Option<u32>> {
        Ok(self.link(name)?.map(|l| l.index))
    }
    /// Links were deleted or made again: remembered indexes are forgotten.
    fn forget_links(&mut self) {}
    /// Makes the device as specified (made again when it differs); true when it was made.
    fn ensure_device(&mut self, spec: &DeviceSpec) -> Result<bool>;
    /// Removes weft's backend devices (`weft.<VNI>`, `weft-udp`) but `keep`; the names removed.
    fn remove_stale_devices(&mut self, keep: Option<&str>) -> Result<Vec<String>>;
    /// What the kernel holds of `owner`: its routes, and the permanent neighbours and remote
    /// FDB entries of `devices`.
    fn read(&mut self, owner: &Owner, devices: &[u32]) -> Result<Resolved>;
    /// One change, as `owner`'s; whether it changed the kernel (a route another owner holds is
    /// left alone: no change).
    fn apply(&mut self, owner: &Owner, op: &Op) -> Result<bool>;
    /// Makes the masquerade and forward rules exactly these.
    fn firewall(&mut self, network: &Ipv4Net, masquerade: bool, tunnel_port: Option<u16>) -> Result<()>;
    /// Writes the subnet file unless it already says this.
    fn write_subnet_file(&mut self, env: &SubnetEnv) -> Result<()>;
}

/// Carries out `actions` in order (those for the kernel); the first failure stops the rest.
pub fn execute(kernel: &mut dyn Kernel, actions: &[Action]) -> Result<Done> {
    let mut done = Done::default();
    // Names resolved once per batch (a device made in it is looked up after).
    let mut names: HashMap<String, u32> = HashMap::new();
    let mut resolve = |kernel: &mut dyn Kernel, name: &String| -> Result<u32> {
        if let Some(index) = names.get(name) {
            return Ok(*index);
        }
        let index = kernel.index(name)?.ok_or_else(|| AgentError::Config(format!("the device {name} is missing")))?;
        names.insert(name.clone(), index);
        Ok(index)
    };
    for action in actions {
        match action {
            Action::EnsureDevice(spec) => done.device_created |= kernel.ensure_device(spec)?,
            Action::RemoveStaleDevices { keep } => {
                for name in kernel.remove_stale_devices(keep.as_deref())? {
                    tracing::info!("removed {name}, a device of another backend or VNI");
                }
            }
            Action::Firewall { network, masquerade, tunnel_port } => {
                kernel.firewall(network, *masquerade, *tunnel_port)?
            }
            Action::Reconcile { owner, desired, devices } => {
                let desired = desired.resolve(|d| resolve(kernel, d))?;
                let devices = devices.iter().map(|d| resolve(kernel, d)).collect::<Result<Vec<u32>>>()?;
                let current = kernel.read(owner, &devices)?;
                apply_all(kernel, owner, plan(&current, &desired), &mut done)?;
            }
            Action::Change { owner, old, new } => {
                // What was programmed on a device that is gone went with it.
                let old = old.resolve(|d| resolve(kernel, d))?;
                let new = new.resolve(|d| resolve(kernel, d))?;
                apply_all(kernel, owner, plan_change(&old, &new), &mut done)?;
            }
            Action::WriteSubnetFile(env) => kernel.write_subnet_file(env)?,
            Action::LeaseLost | Action::RenewClaim => {}
        }
    }
    Ok(done)
}

/// Applies every operation, also past one the kernel refuses (one bad object must not hold up
/// every other peer's); the first failure is returned once all were tried. Only what changed
/// the kernel is counted.
fn apply_all(kernel: &mut dyn Kernel, owner: &Owner, ops: Vec<Op>, done: &mut Done) -> Result<()> {
    let mut first = None;
    for op in ops {
        match kernel.apply(owner, &op) {
            Ok(false) => {}
            Ok(true) if op.is_removal() => done.removed += 1,
            Ok(true) => done.added += 1,
            Err(e) => {
                first.get_or_insert(e);
            }
        }
    }
    first.map_or(Ok(()), Err)
}

/// The real kernel, through netlink and nftables.
pub struct NetlinkKernel {
    nl: Netlink,
    subnet_file: PathBuf,
    /// Link indexes by name, as last looked up (one lookup less per lease event).
    indexes: HashMap<String, u32>,
    /// Destinations whose route another owner holds (said once each).
    foreign: std::collections::HashSet<ipnet::IpNet>,
    /// The TUN devices made (by index) and how their forwarders are reached.
    tuns: HashMap<u32, tun::TunConfig>,
}

impl NetlinkKernel {
    pub fn new(nl: Netlink, subnet_file: PathBuf) -> NetlinkKernel {
        NetlinkKernel { nl, subnet_file, indexes: HashMap::new(), foreign: Default::default(), tuns: HashMap::new() }
    }

    fn route_spec(owner: &Owner, r: &Route<u32>) -> RouteSpec {
        let mut spec = RouteSpec::new(r.dst).protocol(owner.protocol);
        spec.table = owner.table;
        if let Some(via) = r.via {
            spec = spec.via(via);
        }
        if r.dev != 0 {
            spec = spec.dev(r.dev);
        }
        if r.onlink {
            spec = spec.onlink();
        }
        spec
    }
}

/// Whether `name` is one of the names weft's backends give their devices.
pub fn is_backend_device(name: &str) -> bool {
    name == crate::backend::UDP_DEVICE
        || name.strip_prefix("weft.").is_some_and(|vni| !vni.is_empty() && vni.bytes().all(|b| b.is_ascii_digit()))
}

fn mac6(mac: &[u8]) -> [u8; 6] {
    // Another length cannot be what weft wants: all zeros, so it is replaced or removed.
    <[u8; 6]>::try_from(mac).unwrap_or_default()
}

impl Kernel for NetlinkKernel {
    fn link(&mut self, name: &str) -> Result<Option<LinkInfo>> {
        Ok(self
            .nl
            .link_by_name(name)
            .map_err(kernel(format!("reading the link {name}")))?
            .map(|l| LinkInfo { index: l.index, mtu: l.mtu }))
    }

    fn index(&mut self, name: &str) -> Result<Option<u32>> {
        if let Some(index) = self.indexes.get(name) {
            return Ok(Some(*index));
        }
        let index = self.link(name)?.map(|l| l.index);
        if let Some(index) = index {
            self.indexes.insert(name.to_string(), index);
        }
        Ok(index)
    }

    fn forget_links(&mut self) {
        self.indexes.clear();
    }

    fn ensure_device(&mut self, spec: &DeviceSpec) -> Result<bool> {
        self.indexes.remove(spec.name());
        match spec {
            DeviceSpec::Vxlan { name, vni, port, local, uplink, mtu, mac, address } => {
                let uplink = self
                    .link(uplink)?
                    .ok_or_else(|| AgentError::Config(format!("the uplink {uplink} is missing")))?
                    .index;
                let cfg = vtep::VtepConfig {
                    name,
                    vni: *vni,
                    port: *port,
                    local: *local,
                    uplink,
                    mtu: *mtu,
                    mac: *mac,
                    address: *address,
                };
                Ok(vtep::ensure(&mut self.nl, &cfg)?.1)
            }
            DeviceSpec::Tun { name, mtu, address, subnet, network, port, socket, kernel_segmentation } => {
                let cfg = tun::TunConfig {
                    name: name.clone(),
                    mtu: *mtu,
                    address: *address,
                    subnet: *subnet,
                    network: *network,
                    port: *port,
                    socket: socket.clone(),
                    kernel_segmentation: *kernel_segmentation,
                };
                let (index, created) = tun::ensure_device(&mut self.nl, &cfg)?;
                tun::ensure_forwarder(&cfg)?;
                self.tuns.insert(index, cfg);
                Ok(created)
            }
        }
    }

    fn remove_stale_devices(&mut self, keep: Option<&str>) -> Result<Vec<String>> {
        let links = self.nl.links().map_err(kernel("listing links"))?;
        let mut removed = Vec::new();
        for link in links.into_iter().filter(|l| is_backend_device(&l.name) && Some(l.name.as_str()) != keep) {
            // A udp forwarder on it ends when its device goes.
            ignore_not_found(self.nl.delete_link(link.index)).map_err(kernel(format!("removing {}", link.name)))?;
            self.indexes.remove(&link.name);
            self.tuns.remove(&link.index);
            removed.push(link.name);
        }
        Ok(removed)
    }

    fn read(&mut self, owner: &Owner, devices: &[u32]) -> Result<Resolved> {
        let routes = self
            .nl
            .routes()
            .map_err(kernel("listing routes"))?
            .into_iter()
            .filter(|r| r.protocol == owner.protocol && r.table == owner.table)
            .map(|r| Route { dst: r.dst, via: r.gateway, dev: r.oif.unwrap_or(0), onlink: r.onlink, mtu: r.mtu })
            .collect();
        let mut state = Resolved { routes, ..Resolved::default() };
        for &dev in devices {
            let neighbours = self.nl.neighbours(Some(dev)).map_err(kernel("listing neighbours"))?;
            state.neighbours.extend(neighbours.into_iter().filter(|n| n.permanent).map(|n| Neighbour {
                dev,
                ip: n.ip,
                mac: mac6(&n.mac),
            }));
            let fdb = self.nl.fdb(dev).map_err(kernel("listing fdb"))?;
            state.fdb.extend(fdb.into_iter().filter_map(|e| Some(Fdb { dev, mac: mac6(&e.mac), dst: e.dst? })));
            if let Some(cfg) = self.tuns.get(&dev) {
                let entries = tun::entries(&cfg.socket);
                state.tunnel.extend(entries.into_iter().map(|(subnet, ip)| Tunnel { dev, subnet, ip }));
            }
        }
        Ok(state)
    }

    fn apply(&mut self, owner: &Owner, op: &Op) -> Result<bool> {
        let nl = &mut self.nl;
        let changed = match op {
            Op::DelRoute(r) => ignore_not_found(nl.delete_route(&Self::route_spec(owner, r)))
                .map_err(kernel(format!("removing route {}", r.dst))),
            Op::DelFdb(e) => ignore_not_found(nl.delete_fdb(e.dev, &e.mac, Some(e.dst)))
                .map_err(kernel(format!("removing the fdb entry for {}", e.dst))),
            Op::DelNeighbour(n) => ignore_not_found(nl.delete_neighbour(n.dev, n.ip))
                .map_err(kernel(format!("removing neighbour {}", n.ip))),
            Op::PutNeighbour(n) => {
                nl.replace_neighbour(n.dev, n.ip, &n.mac).map_err(kernel(format!("adding neighbour {}", n.ip)))
            }
            Op::PutFdb(e) => nl
                .replace_fdb(e.dev, &e.mac, Some(e.dst))
                .map_err(kernel(format!("adding the fdb entry for {}", e.dst))),
            Op::PutRoute(r) => match nl.put_owned_route(&Self::route_spec(owner, r)) {
                Ok(None) => {
                    self.foreign.remove(&r.dst);
                    Ok(())
                }
                Ok(Some(protocol)) => {
                    if self.foreign.insert(r.dst) {
                        tracing::warn!(
                            "the route to {} belongs to another producer (protocol {protocol}); the {} leave it alone",
                            r.dst,
                            owner.name
                        );
                    }
                    return Ok(false);
                }
                Err(e) => Err(kernel(format!("adding route {}", r.dst))(e)),
            },
            Op::PutTunnel(t) | Op::DelTunnel(t) => {
                let cfg = self.tuns.get(&t.dev).ok_or_else(|| {
                    AgentError::Config(format!("no forwarder known for device {} (peer {})", t.dev, t.subnet))
                })?;
                // The TUN gone (or made again under another index) since the batch began: no
                // forwarder can serve it; the next full pass makes it again.
                if weft_udp::sys::if_index(&cfg.name) != Some(t.dev) {
                    let name = cfg.name.clone();
                    self.tuns.remove(&t.dev);
                    self.indexes.remove(&name);
                    return Err(AgentError::Config(format!("{name} is gone; it is made again")));
                }
                let ip = matches!(op, Op::PutTunnel(_)).then_some(t.ip);
                return tun::change(cfg, t.subnet, ip).map(|()| true);
            }
        };
        changed.map(|()| true)
    }

    fn firewall(&mut self, network: &Ipv4Net, masquerade: bool, tunnel_port: Option<u16>) -> Result<()> {
        firewall::apply(network, masquerade, tunnel_port)
    }

    fn write_subnet_file(&mut self, env: &SubnetEnv) -> Result<()> {
        if SubnetEnv::read(&self.subnet_file).ok().as_ref() != Some(env) {
            env.write(&self.subnet_file)?;
        }
        Ok(())
    }
}
