//! The default seccomp filter: allow everything except what the common
//! container profiles (Docker/podman's default) deny to unprivileged
//! containers, plus the new mount API calls that change existing mounts
//! (`mount_setattr`, `fspick`, `open_tree_attr`) and io_uring (whose
//! operations bypass this filter; Docker and containerd block it since
//! 2023). Denied calls fail with EPERM; `clone3` fails with ENOSYS so libc
//! falls back to `clone`, whose flags a filter can inspect. On x86_64 every
//! x32-ABI call (`nr | 0x40000000`, which carries the x86_64 audit arch
//! and so would slip past rules written for x86_64 numbers) fails with
//! EPERM, as in runc's and Docker's profiles.

use seccompiler::sock_filter;

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Syscalls denied outright.
const DENIED: &[i64] = &[
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_userfaultfd,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_settimeofday,
    libc::SYS_adjtimex,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_reboot,
    libc::SYS_acct,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_lookup_dcookie,
    libc::SYS_quotactl,
    libc::SYS_syslog,
    libc::SYS_iopl,
    libc::SYS_ioperm,
    libc::SYS_vhangup,
    libc::SYS_uselib,
    libc::SYS_fsopen,
    libc::SYS_fsmount,
    libc::SYS_fsconfig,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    libc::SYS_mount_setattr,
    libc::SYS_fspick,
    SYS_OPEN_TREE_ATTR,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
];

/// `open_tree_attr(2)` (Linux 6.15), not in libc yet; system calls from
/// 424 up have one number on every architecture.
const SYS_OPEN_TREE_ATTR: i64 = 467;

/// The x32 system-call bit on x86_64.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

/// Denied unless nested user namespaces are allowed.
const NESTED_USERNS: &[i64] = &[libc::SYS_unshare, libc::SYS_setns];

fn arch() -> Result<TargetArch, String> {
    match std::env::consts::ARCH {
        "x86_64" => Ok(TargetArch::x86_64),
        "aarch64" => Ok(TargetArch::aarch64),
        "riscv64" => Ok(TargetArch::riscv64),
        other => Err(format!("no seccomp filter for architecture {other}")),
    }
}

/// Builds the filters (applied in order).
pub(crate) fn filters(allow_userns: bool) -> Result<Vec<BpfProgram>, String> {
    let arch = arch()?;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        DENIED.iter().map(|s| (*s, Vec::new())).collect();
    if !allow_userns {
        for s in NESTED_USERNS {
            rules.insert(*s, Vec::new());
        }
        // clone(CLONE_NEWUSER, ...): flags are the first argument on x86_64 and aarch64.
        let cond = SeccompCondition::new(
            0,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(libc::CLONE_NEWUSER as u64),
            libc::CLONE_NEWUSER as u64,
        )
        .map_err(|e| e.to_string())?;
        rules.insert(
            libc::SYS_clone,
            vec![SeccompRule::new(vec![cond]).map_err(|e| e.to_string())?],
        );
    }
    // Terminal injection and console ioctls (TIOCSTI pushes input into a
    // terminal; TIOCLINUX can too on a VT).
    let mut tty_rules = Vec::new();
    for cmd in [libc::TIOCSTI, libc::TIOCLINUX] {
        let cond = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, cmd)
            .map_err(|e| e.to_string())?;
        tty_rules.push(SeccompRule::new(vec![cond]).map_err(|e| e.to_string())?);
    }
    rules.insert(libc::SYS_ioctl, tty_rules);
    let deny = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(|e| e.to_string())?;
    let mut out: Vec<BpfProgram> = vec![deny
        .try_into()
        .map_err(|e: seccompiler::BackendError| e.to_string())?];
    if arch == TargetArch::x86_64 {
        out.push(deny_x32());
    }
    if !allow_userns {
        let clone3: BTreeMap<i64, Vec<SeccompRule>> =
            [(libc::SYS_clone3, Vec::new())].into_iter().collect();
        let f = SeccompFilter::new(
            clone3,
            SeccompAction::Allow,
            SeccompAction::Errno(libc::ENOSYS as u32),
            arch,
        )
        .map_err(|e| e.to_string())?;
        out.push(
            f.try_into()
                .map_err(|e: seccompiler::BackendError| e.to_string())?,
        );
    }
    Ok(out)
}

/// A filter that fails every x32 call with EPERM and allows the rest (the
/// other filters judge those): on an x86_64 audit arch, `nr >= 0x40000000`
/// is an x32 call.
fn deny_x32() -> BpfProgram {
    const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const JGE_K: u16 = 0x35; // BPF_JMP | BPF_JGE | BPF_K
    const RET_K: u16 = 0x06; // BPF_RET | BPF_K
    const AUDIT_ARCH_X86_64: u32 = 62 | 0x8000_0000 | 0x4000_0000;
    let ins = |code, jt, jf, k| sock_filter { code, jt, jf, k };
    vec![
        ins(LD_W_ABS, 0, 0, 4), // seccomp_data.arch
        ins(JEQ_K, 0, 3, AUDIT_ARCH_X86_64),
        ins(LD_W_ABS, 0, 0, 0), // seccomp_data.nr
        ins(JGE_K, 0, 1, X32_SYSCALL_BIT),
        ins(RET_K, 0, 0, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32),
        ins(RET_K, 0, 0, libc::SECCOMP_RET_ALLOW),
    ]
}

/// Installs the filters on the calling thread (no_new_privs must be set).
pub(crate) fn apply(progs: &[BpfProgram]) -> Result<(), String> {
    for p in progs {
        seccompiler::apply_filter(p).map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn filters_compile() {
        let x32 = usize::from(cfg!(target_arch = "x86_64"));
        assert_eq!(super::filters(false).unwrap().len(), 2 + x32);
        assert_eq!(super::filters(true).unwrap().len(), 1 + x32);
    }
}
