//! A netlink watch on links (`ip monitor link`): the kernel tells us when a link is deleted or
//! changed, so the agent notices its VTEP gone or its uplink's MTU changed without asking.

use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_route::link::LinkAttribute;
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use crate::error::{DataplaneError, Result};

/// Subscribed to link notifications of the calling thread's namespace; never blocks.
pub struct LinkMonitor {
    socket: Socket,
    /// The link whose MTU is followed (by name: one deleted and made again is still followed),
    /// and the MTU it last announced (untaken).
    followed: Option<String>,
    mtu: Option<u32>,
}

impl LinkMonitor {
    pub fn new() -> Result<LinkMonitor> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(DataplaneError::Socket)?;
        socket.bind(&SocketAddr::new(0, libc::RTMGRP_LINK as u32)).map_err(DataplaneError::Socket)?;
        socket.set_non_blocking(true).map_err(DataplaneError::Socket)?;
        Ok(LinkMonitor { socket, followed: None, mtu: None })
    }

    /// Follows the MTU of the link named `name` (the agent's uplink).
    pub fn follow_mtu(&mut self, name: &str) {
        self.followed = Some(name.to_string());
    }

    /// The MTU the followed link announced last since the last call (drain with
    /// [`LinkMonitor::deleted`] first); `None` when it announced none.
    pub fn take_mtu(&mut self) -> Option<u32> {
        self.mtu.take()
    }

    /// The names of links deleted since the last call. An overrun (too many notifications)
    /// is reported as `None`: the caller then checks what it cares about directly.
    pub fn deleted(&mut self) -> Option<Vec<String>> {
        let mut names = Vec::new();
        loop {
            let data = match self.socket.recv_from_full() {
                Ok((data, _)) => data,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Some(names),
                Err(_) => return None, // ENOBUFS: notifications were lost
            };
            let mut offset = 0;
            while offset < data.len() {
                let Ok(msg) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[offset..]) else { break };
                let len = msg.header.length as usize;
                match msg.payload {
                    NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(link)) => {
                        names.extend(link.attributes.iter().find_map(|a| match a {
                            LinkAttribute::IfName(n) => Some(n.clone()),
                            _ => None,
                        }));
                    }
                    NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => {
                        let named = link.attributes.iter().any(|a| match a {
                            LinkAttribute::IfName(n) => Some(n) == self.followed.as_ref(),
                            _ => false,
                        });
                        if named {
                            self.mtu = link.attributes.iter().find_map(|a| match a {
                                LinkAttribute::Mtu(m) => Some(*m),
                                _ => None,
                            });
                        }
                    }
                    _ => {}
                }
                if len == 0 {
                    break;
                }
                offset += len;
            }
        }
    }
}
