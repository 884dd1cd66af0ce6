//! weft's BGP speaker. Sans-IO at the core: [`packet`] turns bytes into messages and back (no
//! sockets, no clocks); [`neighbor`] is one session's state machine, taking events and
//! returning actions; the RIBs (next) do the same with routes. The I/O layer that moves bytes
//! and runs timers stays thin.

pub mod neighbor;
pub mod packet;
