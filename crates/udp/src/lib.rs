//! The `udp` backend's datapath (flannel's TUN mode): pods' packets read from a TUN device go,
//! each whole, as the payload of a UDP datagram to the node whose subnet holds the destination;
//! what arrives is written to the TUN only when it comes from a current peer's address, from
//! inside that peer's subnet, for this node's subnet. Every other datagram is dropped and
//! counted by reason. [`packet`] is the framing, [`table`] the forwarding table, [`forwarder`]
//! the process that moves the packets (it outlives the agent: see docs/adr/0003).

pub mod forwarder;
pub mod offload;
pub mod packet;
pub mod sys;
pub mod table;
