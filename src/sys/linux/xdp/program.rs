//! The XDP program, assembled at run time for one address and port: a few
//! dozen instructions, with the kernel's verifier as their first test.
//!
//! It redirects a frame to the AF_XDP socket of its receive queue (the slot
//! of `ctx->rx_queue_index` in an `XSKMAP`) only when it is an untagged
//! Ethernet frame to the interface's MAC address, of an IPv4 datagram with no options that is not a
//! fragment, or of an IPv6 datagram with no extension header, carrying UDP
//! to the server's address and port. Everything else, and every frame of a
//! queue with no socket in its slot, passes to the kernel unchanged.
//!
//! Multi-byte fields are loaded in the machine's byte order, so each
//! constant is the network-order bytes read the same way. Addresses are
//! compared 32 bits at a time with `JMP32`: a 64-bit compare would
//! sign-extend the immediate and miss bytes of 0x80 and above.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::RawFd;

use super::bpf::Insn;

// Opcodes (class | size or operation | source).
const LDX_W: u8 = 0x61;
const LDX_H: u8 = 0x69;
const LDX_B: u8 = 0x71;
const MOV64_X: u8 = 0xbf;
const MOV64_K: u8 = 0xb7;
const ADD64_K: u8 = 0x07;
const AND64_K: u8 = 0x57;
const JA: u8 = 0x05;
const JEQ_K: u8 = 0x15;
const JNE_K: u8 = 0x55;
const JGT_X: u8 = 0x2d;
const JNE32_K: u8 = 0x56;
const CALL: u8 = 0x85;
const EXIT: u8 = 0x95;
const LD_IMM64: u8 = 0x18;
/// `ld_imm64`'s source register that makes its immediate a map descriptor.
const PSEUDO_MAP_FD: u8 = 1;

const XDP_PASS: i32 = 2;
const FUNC_REDIRECT_MAP: i32 = 51;

/// The registers used (r1 to r5 are the helper's arguments).
const CTX: u8 = 1;
const R0: u8 = 0;
const R2: u8 = 2;
const R3: u8 = 3;
const R4: u8 = 4;
const R5: u8 = 5;
const SAVED_CTX: u8 = 6;

/// The places jumps go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Label {
    V6,
    Redirect,
    Pass,
}

/// A tiny assembler with forward labels.
#[derive(Default)]
struct Asm {
    insns: Vec<Insn>,
    jumps: Vec<(usize, Label)>,
    labels: Vec<(Label, usize)>,
}

impl Asm {
    fn op(&mut self, code: u8, dst: u8, src: u8, off: i16, imm: i32) {
        self.insns.push(Insn {
            code,
            regs: (src << 4) | (dst & 0x0f),
            off,
            imm,
        });
    }

    fn jump(&mut self, code: u8, dst: u8, src: u8, imm: i32, to: Label) {
        self.jumps.push((self.insns.len(), to));
        self.op(code, dst, src, 0, imm);
    }

    fn label(&mut self, label: Label) {
        self.labels.push((label, self.insns.len()));
    }

    fn map_fd(&mut self, dst: u8, fd: RawFd) {
        self.op(LD_IMM64, dst, PSEUDO_MAP_FD, 0, fd);
        self.op(0, 0, 0, 0, 0);
    }

    /// The instructions, each jump resolved (a jump to a label never
    /// placed goes nowhere the verifier accepts: it refuses the program).
    fn finish(mut self) -> Vec<Insn> {
        for (at, to) in std::mem::take(&mut self.jumps) {
            let target = self
                .labels
                .iter()
                .find(|(label, _)| *label == to)
                .map_or(i64::MAX, |&(_, target)| target as i64);
            let off = i16::try_from(target - at as i64 - 1).unwrap_or(i16::MAX);
            if let Some(insn) = self.insns.get_mut(at) {
                insn.off = off;
            }
        }
        self.insns
    }
}

/// A 16-bit network-order value as the machine loads it.
fn net16(value: u16) -> i32 {
    i32::from(u16::from_ne_bytes(value.to_be_bytes()))
}

/// Four network-order bytes as the machine loads them, as the immediate
/// of a 32-bit compare.
fn net32(bytes: [u8; 4]) -> i32 {
    i32::from_ne_bytes(bytes)
}

/// The program for UDP `port` at `v4` and `v6` (a family without an
/// address is passed to the kernel whole), in frames to `mac` (any, with
/// `None`), redirecting through the `XSKMAP` `map`.
pub(crate) fn udp_redirect(
    map: RawFd,
    port: u16,
    v4: Option<Ipv4Addr>,
    v6: Option<Ipv6Addr>,
    mac: Option<[u8; 6]>,
) -> Vec<Insn> {
    let mut a = Asm::default();
    a.op(MOV64_X, SAVED_CTX, CTX, 0, 0);
    a.op(LDX_W, R2, CTX, 0, 0); // data
    a.op(LDX_W, R3, CTX, 4, 0); // data_end
    a.op(MOV64_X, R4, R2, 0, 0);
    a.op(ADD64_K, R4, 0, 0, 42); // Ethernet 14 + IPv4 20 + UDP 8
    a.jump(JGT_X, R4, R3, 0, Label::Pass);
    if let Some(mac) = mac {
        // Frames for another host (a promiscuous interface, a bridge) and
        // to broadcast or multicast addresses pass.
        a.op(LDX_W, R5, R2, 0, 0);
        a.jump(
            JNE32_K,
            R5,
            0,
            net32([mac[0], mac[1], mac[2], mac[3]]),
            Label::Pass,
        );
        a.op(LDX_H, R5, R2, 4, 0);
        let low = i32::from(u16::from_ne_bytes([mac[4], mac[5]]));
        a.jump(JNE_K, R5, 0, low, Label::Pass);
    }
    a.op(LDX_H, R5, R2, 12, 0); // the Ethernet type
    a.jump(JEQ_K, R5, 0, net16(0x86dd), Label::V6);
    // ARP, VLAN tags (0x8100, 0x88a8) and the rest pass.
    a.jump(JNE_K, R5, 0, net16(0x0800), Label::Pass);
    match v4 {
        Some(v4) => {
            a.op(LDX_B, R5, R2, 14, 0); // version and header length
            a.jump(JNE_K, R5, 0, 0x45, Label::Pass); // options pass
            a.op(LDX_B, R5, R2, 23, 0); // protocol
            a.jump(JNE_K, R5, 0, 17, Label::Pass);
            a.op(LDX_H, R5, R2, 20, 0); // flags and fragment offset
            a.op(AND64_K, R5, 0, 0, net16(0x3fff)); // more fragments, offset
            a.jump(JNE_K, R5, 0, 0, Label::Pass);
            a.op(LDX_W, R5, R2, 30, 0); // destination address
            a.jump(JNE32_K, R5, 0, net32(v4.octets()), Label::Pass);
            a.op(LDX_H, R5, R2, 36, 0); // destination port
            a.jump(JNE_K, R5, 0, net16(port), Label::Pass);
            a.jump(JA, 0, 0, 0, Label::Redirect);
        }
        None => a.jump(JA, 0, 0, 0, Label::Pass),
    }
    a.label(Label::V6);
    match v6 {
        Some(v6) => {
            a.op(MOV64_X, R4, R2, 0, 0);
            a.op(ADD64_K, R4, 0, 0, 62); // Ethernet 14 + IPv6 40 + UDP 8
            a.jump(JGT_X, R4, R3, 0, Label::Pass);
            a.op(LDX_B, R5, R2, 20, 0); // next header: extension headers pass
            a.jump(JNE_K, R5, 0, 17, Label::Pass);
            for (i, word) in v6.octets().chunks_exact(4).enumerate() {
                let word = [word[0], word[1], word[2], word[3]];
                a.op(LDX_W, R5, R2, 38 + 4 * i as i16, 0);
                a.jump(JNE32_K, R5, 0, net32(word), Label::Pass);
            }
            a.op(LDX_H, R5, R2, 56, 0); // destination port
            a.jump(JNE_K, R5, 0, net16(port), Label::Pass);
        }
        None => a.jump(JA, 0, 0, 0, Label::Pass),
    }
    a.label(Label::Redirect);
    a.op(LDX_W, R2, SAVED_CTX, 16, 0); // rx_queue_index
    a.map_fd(CTX, map);
    // The low bits of the flags: what to do when the slot is empty.
    a.op(MOV64_K, R3, 0, 0, XDP_PASS);
    a.op(CALL, 0, 0, 0, FUNC_REDIRECT_MAP);
    a.op(EXIT, 0, 0, 0, 0);
    a.label(Label::Pass);
    a.op(MOV64_K, R0, 0, 0, XDP_PASS);
    a.op(EXIT, 0, 0, 0, 0);
    a.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_jump_lands_inside_the_program() {
        for (v4, v6) in [
            (Some(Ipv4Addr::new(198, 18, 0, 1)), None),
            (None, Some(Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 1))),
            (
                Some(Ipv4Addr::new(255, 255, 255, 254)),
                Some(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0xff00, 1)),
            ),
        ] {
            let insns = udp_redirect(3, 53, v4, v6, Some([0x02, 0xff, 0x80, 0, 0x7f, 0xfe]));
            assert!(insns.len() < 64, "{} instructions", insns.len());
            for (at, insn) in insns.iter().enumerate() {
                let class = insn.code & 0x07;
                let op = insn.code & 0xf0;
                let is_jump = (class == 0x05 || class == 0x06) && op != 0x80 && op != 0x90;
                if is_jump {
                    let to = at as i64 + 1 + i64::from(insn.off);
                    assert!(to > at as i64 && to < insns.len() as i64, "jump at {at}");
                }
            }
            // Both ways out return XDP_PASS or the helper's answer.
            assert_eq!(insns.last().map(|i| i.code), Some(EXIT));
        }
    }

    #[test]
    fn constants_are_in_the_machines_load_order() {
        let port = net16(0x1234);
        assert_eq!(u16::try_from(port).map(u16::to_ne_bytes), Ok([0x12, 0x34]));
        assert_eq!(net32([198, 18, 0, 1]).to_ne_bytes(), [198, 18, 0, 1]);
    }
}
