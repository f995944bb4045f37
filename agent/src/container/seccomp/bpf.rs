//! Classic BPF for a resolved filter.
//!
//! Layout: load the architecture; per audit architecture in the filter a compare and a
//! long jump to its section; otherwise the bad-arch action. Without X32 the x86_64
//! section first gives numbers at or above the x32 bit the bad-arch action (except -1,
//! as libseccomp); with X32 the x32 rules (numbers with the bit) share the section. A
//! section: a binary search over the numbers of the calls with rules, whose leaves are runs
//! of compares jumping to a return per action or to a call's block of argument checks
//! (ending in the default action); then the default action.

use oci_spec::runtime::LinuxSeccompOperator as Op;

use super::{
    Abi, AbiRules, Cond, Filter, Insn, Rule, SeccompError, AUDIT_ARCH_I386, AUDIT_ARCH_X86_64, RET_KILL_THREAD,
    X32_SYSCALL_BIT,
};

pub(crate) const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
pub(crate) const JA: u16 = (libc::BPF_JMP | libc::BPF_JA) as u16;
pub(crate) const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
pub(crate) const JGT_K: u16 = (libc::BPF_JMP | libc::BPF_JGT | libc::BPF_K) as u16;
pub(crate) const JGE_K: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
pub(crate) const JSET_K: u16 = (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16;
pub(crate) const AND_K: u16 = (libc::BPF_ALU | libc::BPF_AND | libc::BPF_K) as u16;
pub(crate) const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;

/// Offsets in `struct seccomp_data`.
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
const OFF_ARGS: u32 = 16;
pub(crate) const MAX_INSNS: usize = 4096;
/// The longest short jump (BPF jump offsets are 8 bits).
const RUN: usize = 255;

fn stmt(code: u16, k: u32) -> Insn {
    Insn { code, jt: 0, jf: 0, k }
}

fn jump(code: u16, k: u32, jt: usize, jf: usize) -> Result<Insn, SeccompError> {
    let off = |n: usize| u8::try_from(n).map_err(|_| SeccompError::JumpTooFar);
    Ok(Insn { code, jt: off(jt)?, jf: off(jf)?, k })
}

pub(crate) fn emit(filter: &Filter) -> Result<Vec<Insn>, SeccompError> {
    let section = |abi: Abi| filter.abis.iter().find(|a| a.abi == abi);
    let x86_64 = section(Abi::X86_64).expect("resolve always adds x86_64");
    let mut native = vec![stmt(LD_W_ABS, OFF_NR)];
    match section(Abi::X32) {
        // Both ABIs share AUDIT_ARCH_X86_64; x32 numbers carry the bit, so one section
        // holds the rules of both, as libseccomp merges them.
        Some(x32) => native.append(&mut section_body(&[x86_64, x32], filter.default)?),
        None => {
            // x32 calls get the bad-arch action; nr -1 (a tracer's skipped call) does not.
            native.extend([
                jump(JGE_K, X32_SYSCALL_BIT, 0, 2)?,
                jump(JEQ_K, u32::MAX, 1, 0)?,
                stmt(RET_K, RET_KILL_THREAD),
            ]);
            native.append(&mut section_body(&[x86_64], filter.default)?);
        }
    }
    let mut sections = vec![(AUDIT_ARCH_X86_64, native)];
    if let Some(i386) = section(Abi::I386) {
        let mut body = vec![stmt(LD_W_ABS, OFF_NR)];
        body.append(&mut section_body(&[i386], filter.default)?);
        sections.push((AUDIT_ARCH_I386, body));
    }
    // Dispatch: per section a compare and a long jump; the jumps' targets follow the
    // bad-arch return in section order.
    let dispatch_len = 1 + 2 * sections.len() + 1;
    let mut prog = vec![stmt(LD_W_ABS, OFF_ARCH)];
    let mut start = dispatch_len;
    for (i, (arch, body)) in sections.iter().enumerate() {
        let ja_at = 1 + 2 * i + 1;
        prog.push(jump(JEQ_K, *arch, 0, 1)?);
        prog.push(stmt(JA, (start - ja_at - 1) as u32));
        start += body.len();
    }
    prog.push(stmt(RET_K, RET_KILL_THREAD));
    for (_, mut body) in sections {
        prog.append(&mut body);
    }
    if prog.len() > MAX_INSNS {
        return Err(SeccompError::TooLong(prog.len()));
    }
    Ok(prog)
}

/// The rules of one or more ABIs of one audit architecture, with the system call number
/// in the accumulator on entry; every path returns.
fn section_body(parts: &[&AbiRules], default: u32) -> Result<Vec<Insn>, SeccompError> {
    let mut calls = Vec::new();
    for rules in parts {
        for (&nr, call_rules) in &rules.calls {
            let call = match call_rules.as_slice() {
                [only] if only.conds.is_empty() => Call::Ret(only.ret),
                _ => {
                    let mut block = Vec::new();
                    for rule in call_rules {
                        block.append(&mut rule_block(rule, rules.abi.is_32bit())?);
                    }
                    block.push(stmt(RET_K, default));
                    Call::Block(block)
                }
            };
            calls.push((nr, call));
        }
    }
    calls.sort_by_key(|(nr, _)| *nr);
    let out = tree(&calls, default)?;
    if out.len() > MAX_INSNS {
        return Err(SeccompError::TooLong(out.len()));
    }
    Ok(out)
}

/// What a call with rules gets: one action, or a block that checks its arguments (and
/// ends in the default action).
enum Call {
    Ret(u32),
    Block(Vec<Insn>),
}

/// Calls per leaf of the search tree: a leaf is a run of compares.
const LEAF: usize = 16;

/// A binary search over the calls (sorted by number), so a call costs a few compares
/// rather than a scan (runc asks libseccomp for the same, its binary-tree optimization).
/// Every path returns: a number without a call gets the default action.
fn tree(calls: &[(u32, Call)], default: u32) -> Result<Vec<Insn>, SeccompError> {
    if calls.len() <= LEAF {
        if let Some(leaf) = leaf(calls, default) {
            return Ok(leaf);
        }
        if let [(nr, call)] = calls {
            return Ok(match call {
                Call::Ret(ret) => vec![jump(JEQ_K, *nr, 0, 1)?, stmt(RET_K, *ret), stmt(RET_K, default)],
                // A block too long for a short jump: compare, then return on a miss.
                Call::Block(block) => {
                    let mut out = vec![jump(JEQ_K, *nr, 1, 0)?, stmt(RET_K, default)];
                    out.extend_from_slice(block);
                    out
                }
            });
        }
    }
    let mid = calls.len() / 2;
    let (left, right) = (tree(&calls[..mid], default)?, tree(&calls[mid..], default)?);
    // At or above the middle number: the right half; else the left half.
    let mut out = if left.len() <= RUN {
        vec![jump(JGE_K, calls[mid].0, left.len(), 0)?]
    } else {
        vec![jump(JGE_K, calls[mid].0, 0, 1)?, stmt(JA, left.len() as u32)]
    };
    out.extend(left);
    out.extend(right);
    Ok(out)
}

/// A run of compares, each jumping to its call's return or block after the run, where a
/// miss returns the default action. None when an offset does not fit a short jump.
fn leaf(calls: &[(u32, Call)], default: u32) -> Option<Vec<Insn>> {
    // The targets after the run: one return per action, one block per conditional call.
    let mut targets: Vec<Insn> = vec![stmt(RET_K, default)];
    let mut rets: Vec<(u32, usize)> = vec![(default, 0)];
    let mut offsets = Vec::with_capacity(calls.len());
    for (_, call) in calls {
        let at = match call {
            Call::Ret(ret) => match rets.iter().find(|(r, _)| r == ret) {
                Some(&(_, at)) => at,
                None => {
                    rets.push((*ret, targets.len()));
                    targets.push(stmt(RET_K, *ret));
                    targets.len() - 1
                }
            },
            Call::Block(block) => {
                targets.extend_from_slice(block);
                targets.len() - block.len()
            }
        };
        offsets.push(at);
    }
    let mut out = Vec::with_capacity(calls.len() + targets.len());
    for (i, ((nr, _), at)) in calls.iter().zip(offsets).enumerate() {
        // Past the remaining compares, then to the target (the first one: the default).
        out.push(jump(JEQ_K, *nr, calls.len() - 1 - i + at, 0).ok()?);
    }
    out.extend(targets);
    Some(out)
}

/// A jump target while a rule's block is assembled.
#[derive(Clone, Copy)]
enum Target {
    /// The next instruction.
    Next,
    /// The end of the current argument condition (it holds).
    Pass,
    /// The end of the rule block (the rule does not match): the next rule.
    Fail,
}

enum Item {
    Stmt(Insn),
    Jump {
        code: u16,
        k: u32,
        jt: Target,
        jf: Target,
    },
    /// Marks the end of an argument condition (resolves `Pass`).
    CondEnd,
}

/// The instructions that check one condition. On i386 only the low halves count.
fn cond_items(cond: &Cond, is_32bit: bool) -> Vec<Item> {
    use Target::*;
    let lo_off = OFF_ARGS + 8 * cond.index;
    let hi_off = lo_off + 4;
    let ld = |off| Item::Stmt(stmt(LD_W_ABS, off));
    let j = |code, k, jt, jf| Item::Jump { code, k, jt, jf };
    let (v_hi, v_lo) = ((cond.value >> 32) as u32, cond.value as u32);
    let mut items = Vec::new();
    // The high half decides unless equal (masked: must match); then the low half.
    if !is_32bit {
        items.push(ld(hi_off));
        items.extend(match cond.op {
            Op::ScmpCmpEq => vec![j(JEQ_K, v_hi, Next, Fail)],
            Op::ScmpCmpNe => vec![j(JEQ_K, v_hi, Next, Pass)],
            Op::ScmpCmpGt | Op::ScmpCmpGe => vec![j(JGT_K, v_hi, Pass, Next), j(JEQ_K, v_hi, Next, Fail)],
            Op::ScmpCmpLt | Op::ScmpCmpLe => vec![j(JGE_K, v_hi, Next, Pass), j(JEQ_K, v_hi, Next, Fail)],
            Op::ScmpCmpMaskedEq => {
                vec![Item::Stmt(stmt(AND_K, v_hi)), j(JEQ_K, (cond.value_two >> 32) as u32, Next, Fail)]
            }
        });
    }
    items.push(ld(lo_off));
    items.extend(match cond.op {
        Op::ScmpCmpEq => vec![j(JEQ_K, v_lo, Pass, Fail)],
        Op::ScmpCmpNe => vec![j(JEQ_K, v_lo, Fail, Pass)],
        Op::ScmpCmpGt => vec![j(JGT_K, v_lo, Pass, Fail)],
        Op::ScmpCmpGe => vec![j(JGE_K, v_lo, Pass, Fail)],
        Op::ScmpCmpLt => vec![j(JGE_K, v_lo, Fail, Pass)],
        Op::ScmpCmpLe => vec![j(JGT_K, v_lo, Fail, Pass)],
        Op::ScmpCmpMaskedEq => vec![Item::Stmt(stmt(AND_K, v_lo)), j(JEQ_K, cond.value_two as u32, Pass, Fail)],
    });
    items.push(Item::CondEnd);
    items
}

/// One rule of a call: its conditions, then its action; a failing condition jumps past
/// the action (to the next rule, or the call's default).
fn rule_block(rule: &Rule, is_32bit: bool) -> Result<Vec<Insn>, SeccompError> {
    let mut items: Vec<Item> = rule.conds.iter().flat_map(|c| cond_items(c, is_32bit)).collect();
    items.push(Item::Stmt(stmt(RET_K, rule.ret)));
    // Instruction index of each item, and of each condition's end.
    let mut index = Vec::with_capacity(items.len());
    let mut cond_ends = Vec::new();
    let mut n = 0usize;
    for item in &items {
        index.push(n);
        match item {
            Item::CondEnd => cond_ends.push(n),
            _ => n += 1,
        }
    }
    let fail = n;
    let mut out = Vec::with_capacity(n);
    let mut cond = 0;
    for (i, item) in items.iter().enumerate() {
        match item {
            Item::Stmt(insn) => out.push(*insn),
            Item::CondEnd => cond += 1,
            Item::Jump { code, k, jt, jf } => {
                let at = index[i];
                let resolve = |t: Target| -> Result<usize, SeccompError> {
                    let to = match t {
                        Target::Next => at + 1,
                        Target::Pass => *cond_ends.get(cond).ok_or(SeccompError::JumpTooFar)?,
                        Target::Fail => fail,
                    };
                    Ok(to - at - 1)
                };
                out.push(jump(*code, *k, resolve(*jt)?, resolve(*jf)?)?);
            }
        }
    }
    Ok(out)
}
