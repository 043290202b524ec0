//! The AF_XDP engine (feature `xdp`, Linux): datagrams for the server's
//! address and port are taken from the NIC's receive queues before the
//! kernel's UDP stack sees them, and answered in place.
//!
//! This module holds what needs no privilege: the frames ([`frame`]). The
//! system calls (the BPF program, its link, the AF_XDP rings) are in the
//! platform module, `crate::sys`.

// The engine that uses it lands next; until then only its tests do.
#![allow(dead_code)]

pub(crate) mod frame;
