//! weft's BGP speaker. Sans-IO at the core: [`packet`] turns bytes into messages and back (no
//! sockets, no clocks); [`neighbor`] is one session's state machine, taking events and
//! returning actions; [`rib`] keeps the paths, picks the best and says what goes out to whom.
//! [`daemon`] is the thin I/O layer that moves bytes and runs timers (tokio, one task owning the
//! speaker).

pub mod daemon;
pub mod neighbor;
pub mod packet;
pub mod rib;
pub mod speaker;
