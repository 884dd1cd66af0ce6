//! weft's BGP speaker. Sans-IO at the core: [`packet`] turns bytes into messages and back (no
//! sockets, no clocks); the FSM and the RIBs (next) take messages and events and return actions.
//! The I/O layer that moves bytes and runs timers stays thin.

pub mod packet;
