//! The default seccomp filter: allow everything except what the common
//! container profiles (Docker/podman's default) deny to unprivileged
//! containers. Denied calls fail with EPERM; `clone3` fails with ENOSYS so
//! libc falls back to `clone`, whose flags a filter can inspect.

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
];

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
        assert_eq!(super::filters(false).unwrap().len(), 2);
        assert_eq!(super::filters(true).unwrap().len(), 1);
    }
}
