//! The only module with `unsafe` and raw syscalls.
//!
//! Everything here is a thin, documented wrapper that returns
//! [`std::io::Result`]; callers attach the path and the step to errors.

pub(crate) mod tree;
pub(crate) mod walls;

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

fn cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// Lists the extended attribute names of `path` without following a final symlink.
///
/// File systems without xattr support give an empty list.
pub fn llistxattr(path: &Path) -> io::Result<Vec<Vec<u8>>> {
    let c = cstring(path)?;
    let mut buf: Vec<u8> = vec![0; 1024];
    loop {
        // SAFETY: `c` is a valid NUL-terminated string and `buf` is a writable buffer of
        // exactly `buf.len()` bytes; the kernel writes at most that many.
        let n = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            buf.truncate(n as usize);
            break;
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::ERANGE) => {
                // SAFETY: as above, a size query with a NULL buffer writes nothing.
                let need = unsafe { libc::llistxattr(c.as_ptr(), std::ptr::null_mut(), 0) };
                if need < 0 {
                    return Err(io::Error::last_os_error());
                }
                buf.resize(need as usize + 1, 0);
            }
            Some(libc::ENOTSUP) => return Ok(Vec::new()),
            _ => return Err(err),
        }
    }
    Ok(buf
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(<[u8]>::to_vec)
        .collect())
}

/// Reads one extended attribute of `path` without following a final symlink.
pub fn lgetxattr(path: &Path, name: &[u8]) -> io::Result<Vec<u8>> {
    let c = cstring(path)?;
    let n = CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "xattr name contains NUL"))?;
    let mut buf: Vec<u8> = vec![0; 256];
    loop {
        // SAFETY: `c` and `n` are valid NUL-terminated strings; `buf` is writable for
        // `buf.len()` bytes and the kernel writes at most that many.
        let r =
            unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if r >= 0 {
            buf.truncate(r as usize);
            return Ok(buf);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::ERANGE) {
            return Err(err);
        }
        // SAFETY: a size query with a NULL buffer writes nothing.
        let need = unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), std::ptr::null_mut(), 0) };
        if need < 0 {
            return Err(io::Error::last_os_error());
        }
        buf.resize(need as usize + 1, 0);
    }
}

/// Splits a `st_rdev` into (major, minor) the way glibc does.
pub fn dev_major_minor(rdev: u64) -> (u32, u32) {
    (libc::major(rdev), libc::minor(rdev))
}

/// fork(2) straight into new namespaces: clone(2) with `flags` (CLONE_NEW*)
/// and no new stack, so the child continues from here as after fork. With
/// `CLONE_NEWPID` the child is PID 1 of the new pid namespace. This saves
/// the extra process that `unshare` + `fork` needs (bubblewrap starts its
/// sandbox the same way).
///
/// The child's libc still records the parent's thread id, so it must not
/// use calls that rely on it (raise, abort, pthread_kill); kiln's init
/// and its command exit with `_exit` or exec.
pub fn clone_fork(flags: rustix::thread::UnshareFlags) -> io::Result<i32> {
    let flags = libc::c_ulong::from(flags.bits()) | libc::SIGCHLD as libc::c_ulong;
    // SAFETY: clone with a null stack is fork with namespace flags: the
    // child gets a copy of this address space and returns here. Every
    // caller is single-threaded (checked with `single_threaded`), so no
    // lock is held by a thread missing in the child; the remaining
    // arguments (parent/child tid pointers, tls) are unused and zero.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            flags,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    if pid < 0 {
        Err(io::Error::last_os_error())
    } else {
        i32::try_from(pid).map_err(|_| io::Error::other("clone returned a bad pid"))
    }
}

/// Drops every capability not in `keep` (a bit mask) from the bounding set
/// (`PR_CAPBSET_DROP` for each capability number the kernel knows).
pub fn drop_bounding_set(keep: u64) -> io::Result<()> {
    for cap in 0..64 {
        if keep & (1u64 << cap) != 0 {
            continue;
        }
        // SAFETY: prctl(PR_CAPBSET_DROP, cap) takes integers only.
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if r != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINVAL) {
                break; // past the last capability this kernel has
            }
            return Err(e);
        }
    }
    Ok(())
}

/// The signal set kiln's sandbox processes forward or wait for.
fn sigset(signals: &[i32]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initializes it fully.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, exclusively borrowed sigset_t.
    unsafe { libc::sigemptyset(&mut set) };
    for s in signals {
        // SAFETY: as above; invalid signal numbers only make sigaddset fail.
        unsafe { libc::sigaddset(&mut set, *s) };
    }
    set
}

/// Blocks (`block = true`) or unblocks `signals` for the calling thread.
pub fn sigmask(signals: &[i32], block: bool) -> io::Result<()> {
    let set = sigset(signals);
    let how = if block {
        libc::SIG_BLOCK
    } else {
        libc::SIG_UNBLOCK
    };
    // SAFETY: `set` is initialized; a NULL old-set pointer is allowed.
    let r = unsafe { libc::pthread_sigmask(how, &set, std::ptr::null_mut()) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(())
}

/// Unblocks every signal (a freshly exec'd helper may inherit a mask).
pub fn unblock_all_signals() -> io::Result<()> {
    // SAFETY: sigset_t is plain data; sigfillset initializes it fully.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, exclusively borrowed sigset_t.
    unsafe { libc::sigfillset(&mut set) };
    // SAFETY: `set` is initialized; a NULL old-set pointer is allowed.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(())
}

/// Resets every signal's disposition to the default. Ignored signals
/// survive exec, and Rust ignores SIGPIPE: without this a command in the
/// sandbox would see `find / | head -1` fail with "Broken pipe".
pub fn default_signal_dispositions() {
    /// The kernel's `struct sigaction` on x86_64 and aarch64 (handler,
    /// flags, restorer, mask): the raw syscall also reaches the real-time
    /// signals glibc keeps to itself (32, 33), which libc's signal()
    /// refuses. Other architectures order the fields differently (mips,
    /// sparc, alpha) or have no restorer: they must add their layout here.
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    compile_error!("default_signal_dispositions: add this architecture's kernel struct sigaction");
    #[repr(C)]
    struct KernelSigaction {
        handler: usize,
        flags: u64,
        restorer: usize,
        mask: u64,
    }
    let dfl = KernelSigaction {
        handler: libc::SIG_DFL,
        flags: 0,
        restorer: 0,
        mask: 0,
    };
    for sig in 1..=64 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: rt_sigaction reads `dfl`, a valid kernel sigaction that
        // outlives the call, and writes nothing (null old action); the
        // size is that of the kernel's 64-bit signal mask.
        unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                &dfl as *const KernelSigaction,
                std::ptr::null_mut::<KernelSigaction>(),
                8usize,
            )
        };
    }
}

/// Commits every file system's buffers to disk (`sync(2)`).
pub fn sync_all() {
    rustix::fs::sync();
}

/// Waits for one of `signals` (which must be blocked); returns its number.
pub fn sigwait(signals: &[i32]) -> io::Result<i32> {
    let set = sigset(signals);
    loop {
        // SAFETY: `set` is initialized; a NULL siginfo pointer is allowed.
        let r = unsafe { libc::sigwaitinfo(&set, std::ptr::null_mut()) };
        if r >= 0 {
            return Ok(r);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// A signalfd for `signals` (which must be blocked), non-blocking, close-on-exec.
pub fn signalfd(signals: &[i32]) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let set = sigset(signals);
    // SAFETY: `set` is initialized; -1 asks for a new descriptor.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: signalfd returned a fresh descriptor that nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Reads one pending signal number from a signalfd, if any.
pub fn read_signalfd(fd: &std::os::fd::OwnedFd) -> Option<i32> {
    use std::os::fd::AsRawFd;
    // SAFETY: signalfd_siginfo is plain data.
    let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::signalfd_siginfo>();
    // SAFETY: `info` is a writable buffer of exactly `size` bytes.
    let n = unsafe {
        libc::read(
            fd.as_raw_fd(),
            (&mut info as *mut libc::signalfd_siginfo).cast(),
            size,
        )
    };
    (n == size as isize).then_some(info.ssi_signo as i32)
}

/// Brings the loopback interface of the current network namespace up.
pub fn loopback_up() -> io::Result<()> {
    interface_up("lo", None)
}

/// An IPv4 socket for interface and route ioctls, closed on drop.
fn inet_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An IPv4 socket address as the interface and route ioctls take it.
fn sockaddr_v4(addr: [u8; 4]) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size (16 bytes) and
    // sockaddr is plain data, valid for any bytes.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// Brings the network interface `name` up in the current network
/// namespace, first giving it the IPv4 address `addr` with a netmask of
/// `prefix` bits when one is given.
pub fn interface_up(name: &str, addr: Option<([u8; 4], u8)>) -> io::Result<()> {
    if name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    let fd = inet_socket()?;
    // SAFETY: ifreq is plain data; zero is a valid initial value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (i, b) in name.bytes().enumerate() {
        req.ifr_name[i] = b as libc::c_char;
    }
    let ioctl = |op: libc::Ioctl, req: &mut libc::ifreq| {
        // SAFETY: `req` is a valid ifreq naming the interface, with the
        // union member `op` reads or writes set.
        if unsafe { libc::ioctl(fd.as_raw_fd(), op, req as *mut libc::ifreq) } < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    if let Some((ip, prefix)) = addr {
        req.ifr_ifru.ifru_addr = sockaddr_v4(ip);
        ioctl(libc::SIOCSIFADDR, &mut req)?;
        let mask = u32::MAX
            .checked_shl(32 - u32::from(prefix.min(32)))
            .unwrap_or(0);
        req.ifr_ifru.ifru_netmask = sockaddr_v4(mask.to_be_bytes());
        ioctl(libc::SIOCSIFNETMASK, &mut req)?;
    }
    ioctl(libc::SIOCGIFFLAGS, &mut req)?;
    // SAFETY: SIOCGIFFLAGS initialized the flags member of the union.
    unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    ioctl(libc::SIOCSIFFLAGS, &mut req)
}

/// Adds the IPv4 default route through `gateway` in the current network
/// namespace.
pub fn default_route(gateway: [u8; 4]) -> io::Result<()> {
    let fd = inet_socket()?;
    // SAFETY: rtentry is plain data; zero is a valid initial value.
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = sockaddr_v4([0; 4]);
    rt.rt_genmask = sockaddr_v4([0; 4]);
    rt.rt_gateway = sockaddr_v4(gateway);
    rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    // SAFETY: `rt` is a valid rtentry for SIOCADDRT.
    if unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::SIOCADDRT,
            &mut rt as *mut libc::rtentry,
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `execve(2)`; returns only on failure.
pub fn execve(path: &CString, argv: &[CString], envp: &[CString]) -> io::Error {
    let mut a: Vec<*const libc::c_char> = argv.iter().map(|s| s.as_ptr()).collect();
    a.push(std::ptr::null());
    let mut e: Vec<*const libc::c_char> = envp.iter().map(|s| s.as_ptr()).collect();
    e.push(std::ptr::null());
    // SAFETY: every pointer refers to a NUL-terminated string that outlives
    // the call, and both arrays are NULL-terminated.
    unsafe { libc::execve(path.as_ptr(), a.as_ptr(), e.as_ptr()) };
    io::Error::last_os_error()
}

/// `_exit(2)`: leaves without running destructors or atexit handlers (for a
/// forked child that must not flush its parent's buffers).
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit never returns and has no preconditions.
    unsafe { libc::_exit(code) }
}

/// Arranges for a spawned child to get SIGKILL when this thread dies.
pub fn pre_exec_pdeathsig(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs between fork and exec and only makes the
    // async-signal-safe prctl(2) call, allocating nothing.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Arranges for a spawned child to enter `root` (chroot), change to
/// `workdir` there, start a session, and become `ids` (uid, gid; no
/// supplementary groups) before it executes: the VM guest agent's way to
/// start the command. With `controlling_tty` its stdin (a pty's slave)
/// becomes the new session's controlling terminal. The program is looked
/// up on the command's `PATH` inside `root`, since that happens after
/// these steps.
pub fn pre_exec_enter_root(
    cmd: &mut std::process::Command,
    root: &'static std::ffi::CStr,
    workdir: std::ffi::CString,
    ids: (u32, u32),
    controlling_tty: bool,
) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs between fork and exec and makes system calls
    // only, allocating nothing (its strings are made before the fork); fd 0
    // is the child's stdin, open for the call that borrows it.
    unsafe {
        cmd.pre_exec(move || {
            rustix::process::chroot(root)?;
            rustix::process::chdir(workdir.as_c_str())?;
            rustix::process::setsid()?;
            // stdin (a pty's slave) becomes the new session's terminal.
            if controlling_tty {
                rustix::process::ioctl_tiocsctty(std::os::fd::BorrowedFd::borrow_raw(0))?;
            }
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(ids.1) != 0
                || libc::setuid(ids.0) != 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// `unshare(2)` of namespaces for the calling (single-threaded) process.
pub fn unshare(flags: rustix::thread::UnshareFlags) -> io::Result<()> {
    // SAFETY: rustix marks unshare unsafe because CLONE_FILES/CLONE_FS could
    // break other threads' assumptions about shared fd tables; kiln's helper
    // is single-threaded and only unshares namespaces.
    unsafe { rustix::thread::unshare_unsafe(flags) }.map_err(Into::into)
}

/// Keeps permitted capabilities across a setuid away from 0 (`PR_SET_KEEPCAPS`).
pub fn set_keepcaps() -> io::Result<()> {
    // SAFETY: prctl(PR_SET_KEEPCAPS, 1) takes integers only.
    if unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1 as libc::c_ulong, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Raises capability `cap` in the ambient set (it must be permitted and inheritable).
pub fn raise_ambient(cap: u32) -> io::Result<()> {
    // SAFETY: prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap) takes integers only.
    let r = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
            cap as libc::c_ulong,
            0,
            0,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `kill(-1, SIGKILL)`: from a pid namespace's init, every other process in
/// the namespace. Errors (nothing left to kill) are irrelevant.
pub fn kill_all() {
    // SAFETY: kill(2) takes integers only and touches no memory of ours.
    unsafe { libc::kill(-1, libc::SIGKILL) };
}

/// The login name of `uid`, if any: from /etc/passwd, else through NSS
/// (as newuidmap looks it up; kiln is linked statically, so NSS modules
/// other than files load only where the host's glibc matches).
pub fn user_name(uid: u32) -> Option<String> {
    std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|p| passwd_name(&p, uid))
        .or_else(|| nss_user_name(uid))
}

/// The first name with `uid` in a passwd(5) file.
fn passwd_name(passwd: &str, uid: u32) -> Option<String> {
    passwd.lines().find_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        let id: u32 = f.nth(1)?.parse().ok()?;
        (id == uid && !name.is_empty()).then(|| name.to_string())
    })
}

fn nss_user_name(uid: u32) -> Option<String> {
    let mut buf = vec![0 as libc::c_char; 16384];
    // SAFETY: all-zero is a valid `passwd` (null pointers and zero ids); it
    // is only read after getpwuid_r filled it.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call and `buf.len()` is the
    // real size of `buf`; getpwuid_r writes only within them.
    let rc = unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result) };
    if rc != 0 || result.is_null() || pwd.pw_name.is_null() {
        return None;
    }
    // SAFETY: on success pw_name points to a NUL-terminated string inside
    // `buf`, which is still alive.
    let name = unsafe { std::ffi::CStr::from_ptr(pwd.pw_name) };
    name.to_str().ok().map(str::to_string)
}

/// Whether this process has exactly one thread (so fork without exec is safe).
pub fn single_threaded() -> bool {
    // One read into a page-sized buffer: /proc/self/stat fits, and its
    // 20th field is the thread count. The command name (field 2) is in
    // parentheses and may hold spaces, so fields are counted after the
    // last ')'.
    let mut buf = [0u8; 4096];
    let Ok(n) = std::fs::File::open("/proc/self/stat").and_then(|mut f| {
        use std::io::Read;
        f.read(&mut buf)
    }) else {
        return false;
    };
    stat_threads(&String::from_utf8_lossy(&buf[..n])) == Some(1)
}

/// The thread count (field 20) of a `/proc/PID/stat` line.
fn stat_threads(stat: &str) -> Option<u32> {
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(17)?.parse().ok()
}

/// `dup2(fd, target)`: makes `target` (e.g. 0, 1, 2) a copy of `fd`,
/// without close-on-exec.
pub fn dup_onto(fd: std::os::fd::BorrowedFd<'_>, target: i32) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: dup2 only manipulates the fd table; `fd` is open for the
    // duration of the call, and replacing `target` is the caller's intent.
    let r = unsafe { libc::dup2(fd.as_raw_fd(), target) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets `attrs` (`MOUNT_ATTR_RDONLY`, `_NOSUID`, `_NODEV`, ...) on the
/// mount at `path` and every mount below it (`mount_setattr(AT_RECURSIVE)`,
/// Linux >= 5.12). Unlike a `MS_REMOUNT|MS_BIND` remount it reaches
/// submounts (a recursive bind of /sys brings /sys/fs/cgroup along), and it
/// only sets flags, so flags the user namespace locked are left alone.
pub fn set_mount_attrs_recursive(path: &Path, attrs: u64) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let attr = libc::mount_attr {
        attr_set: attrs,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: `c` is a NUL-terminated path and `attr` a fully initialized
    // mount_attr whose size is passed along; the kernel only reads both.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::AT_RECURSIVE,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// [`set_mount_attrs_recursive`] with read-only, nosuid and nodev.
pub fn make_readonly_recursive(path: &Path) -> io::Result<()> {
    set_mount_attrs_recursive(
        path,
        libc::MOUNT_ATTR_RDONLY | libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV,
    )
}

/// Closes every descriptor from 3 up (`close_range(2)`) but `keep`: the
/// sandbox's init keeps nothing kiln or its caller had open, so no
/// descriptor of it leads outside the sandbox's root (`keep` is its
/// warnings pipe to kiln, closed once the root is built).
pub fn close_from_3_but(keep: Option<i32>) -> io::Result<()> {
    let ranges: Vec<(u32, u32)> = match keep.and_then(|k| u32::try_from(k).ok()) {
        Some(k) if k >= 3 => vec![(3, k - 1), (k + 1, u32::MAX)],
        _ => vec![(3, u32::MAX)],
    };
    for (first, last) in ranges.into_iter().filter(|(f, l)| f <= l) {
        // SAFETY: close_range only closes descriptors; the callers (init,
        // right after it starts) own every descriptor of their process and
        // use none of the closed ones afterwards.
        let r = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0u32) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Writes all of `data` to descriptor number `fd`, one this process got by
/// number (across a clone or an exec); EBADF if it is not open.
pub fn write_raw_fd(fd: i32, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        // SAFETY: write(2) reads `data.len()` bytes from a live slice; an
        // fd that is not open fails with EBADF and touches nothing.
        let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        data = &data[n as usize..];
    }
    Ok(())
}

/// Closes descriptor number `fd` (one this process got by number).
pub fn close_raw_fd(fd: i32) {
    // SAFETY: close(2) of a descriptor no Rust object owns (it came by
    // number); a closed one fails with EBADF.
    unsafe { libc::close(fd) };
}

/// The start and end addresses of this process's argument and
/// environment strings (`/proc/self/stat` fields 48-51).
fn arg_env_area() -> io::Result<(u64, u64, u64, u64)> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    // Fields after the command name, which may hold spaces.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| io::Error::other("bad /proc/self/stat"))?;
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(45) // field 3 is the first after ')': 48 - 3 = 45
        .take(4)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    match f.as_slice() {
        [a, b, c, d] if a < b && b <= c && c <= d => Ok((*a, *b, *c, *d)),
        _ => Err(io::Error::other("no argument area in /proc/self/stat")),
    }
}

/// Overwrites this process's command line with `name` and its
/// environment with zeros, as `/proc/PID/cmdline` and `/proc/PID/environ`
/// show them: the sandbox's init runs inside the sandbox, and kiln's
/// command line and environment (store paths, the CI job's secrets) must
/// not be readable there. Nothing may read the environment afterwards.
pub fn scrub_process_strings(name: &str) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let (arg_start, arg_end, env_start, env_end) = arg_env_area()?;
    // Through /proc/self/mem rather than raw pointers: the strings are
    // libc's (argv/environ), never Rust values, and a write past what the
    // kernel reports cannot happen.
    let mem = std::fs::OpenOptions::new()
        .write(true)
        .open("/proc/self/mem")?;
    let mut args = vec![0u8; usize::try_from(arg_end - arg_start).unwrap_or(0)];
    let n = name.len().min(args.len().saturating_sub(1));
    args[..n].copy_from_slice(&name.as_bytes()[..n]);
    mem.write_all_at(&args, arg_start)?;
    let env = vec![0u8; usize::try_from(env_end - env_start).unwrap_or(0)];
    mem.write_all_at(&env, env_start)
}

/// Takes ownership of descriptor `fd`, which kiln handed to this exec'd
/// helper (it must be open).
pub fn take_fd(fd: i32) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: F_GETFD only reads the descriptor's flags.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor is open (checked above) and was passed to this
    // process by kiln for it alone: nothing else here owns or closes it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Makes a spawned child find `fds[i]` as descriptor `3 + i` (without
/// close-on-exec), e.g. the pipes kiln shares with its exec'd helper.
pub fn pre_exec_pass_fds(
    cmd: &mut std::process::Command,
    fds: &[&std::os::fd::OwnedFd],
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    // Copies at 10 and above first, so no source is a target of another.
    let mut high = Vec::new();
    for fd in fds {
        high.push(rustix::io::fcntl_dupfd_cloexec(fd, 10)?);
    }
    let raw: Vec<i32> = high.iter().map(|f| f.as_raw_fd()).collect();
    // SAFETY: the closure runs between fork and exec and only makes the
    // async-signal-safe dup2(2) calls, allocating nothing; `raw` was
    // built before the fork and `high` keeps the descriptors open until
    // `cmd` is dropped.
    unsafe {
        cmd.pre_exec(move || {
            let _keep = &high;
            for (i, fd) in raw.iter().enumerate() {
                if libc::dup2(*fd, 3 + i as i32) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    Ok(())
}

/// Marks every descriptor from 3 up close-on-exec, so nothing kiln (or its
/// embedder, or whoever started it) holds reaches the sandboxed command.
pub fn cloexec_from_3() -> io::Result<()> {
    // SAFETY: close_range only changes flags in the fd table; with
    // CLOSE_RANGE_CLOEXEC it closes nothing now.
    let r = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Which of `signals` the calling thread has blocked now.
pub fn blocked_of(signals: &[i32]) -> io::Result<Vec<i32>> {
    // SAFETY: sigset_t is plain data; it is filled by pthread_sigmask below.
    let mut cur: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: a NULL new-set pointer only queries; `cur` is writable.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut cur) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(signals
        .iter()
        .copied()
        // SAFETY: `cur` is initialized; sigismember only reads it.
        .filter(|s| unsafe { libc::sigismember(&cur, *s) } == 1)
        .collect())
}

/// `name` in PATH (or /usr/bin, /usr/sbin).
/// Set by `helper::dispatch`: this program routes kiln's re-exec entry
/// points, so its own binary can serve as the sandbox helper and the VM
/// guest agent even when it is not named `kiln`.
static DISPATCHES: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Records that this program called `helper::dispatch`.
pub(crate) fn mark_dispatcher() {
    DISPATCHES.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// The binary kiln re-executes for its entry points: `explicit`, else this
/// executable when it is `kiln` or called `helper::dispatch`, else
/// `$KILN_HELPER`, else `kiln` from PATH.
pub(crate) fn helper_exe(explicit: Option<&std::path::Path>) -> std::path::PathBuf {
    if let Some(p) = explicit {
        return p.to_path_buf();
    }
    if let Ok(exe) = std::env::current_exe() {
        let dispatches = DISPATCHES.load(std::sync::atomic::Ordering::Relaxed);
        if dispatches || exe.file_name().is_some_and(|n| n == "kiln") {
            return exe;
        }
    }
    if let Some(h) = std::env::var_os("KILN_HELPER") {
        return h.into();
    }
    find_tool("kiln").unwrap_or_else(|| "kiln".into())
}

pub(crate) fn find_tool(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .chain([
            std::path::PathBuf::from("/usr/bin"),
            std::path::PathBuf::from("/usr/sbin"),
        ])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_threads_counts_after_the_command_name() {
        // A command name may hold spaces and parentheses.
        let line = "4242 (a) b (c) S 1 4242 4242 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 3 0 99 1 1";
        assert_eq!(stat_threads(line), Some(3));
        assert_eq!(stat_threads("garbage"), None);
    }

    #[test]
    fn passwd_names_by_uid() {
        let p =
            "root:x:0:0:root:/root:/bin/bash\n# comment\nbad\nci:x:1000:1000::/home/ci:/bin/sh\n";
        assert_eq!(passwd_name(p, 1000).as_deref(), Some("ci"));
        assert_eq!(passwd_name(p, 0).as_deref(), Some("root"));
        assert_eq!(passwd_name(p, 7), None);
    }

    #[test]
    fn single_threaded_sees_other_threads() {
        // The test harness runs this on a thread of its own, beside main.
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || rx.recv());
        assert!(!single_threaded());
        drop(tx);
        let _ = t.join();
        let me = std::fs::read_to_string("/proc/self/stat").expect("read /proc/self/stat");
        assert!(stat_threads(&me).is_some_and(|n| n >= 1));
    }
}
