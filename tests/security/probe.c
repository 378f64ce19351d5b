/* Escape probes run inside kiln sandboxes by tests/security.rs.
 *
 *   probe CALL [ARGS...]
 *
 * Each makes one system call (or a short fixed sequence) and prints
 * "CALL: ok" or "CALL: ERRNAME (message)"; the exit status is 0 when the
 * call succeeded and 1 when it failed, so a test asserts on what happened.
 * Built statically (`cc -static`) so it runs in any image.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/mount.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/syscall.h>
#include <termios.h>
#include <unistd.h>

#ifndef SYS_mount_setattr
#define SYS_mount_setattr 442
#endif
#ifndef SYS_fspick
#define SYS_fspick 433
#endif
#ifndef SYS_open_tree
#define SYS_open_tree 428
#endif
#define SYS_open_tree_attr_ 467
#ifndef SYS_io_uring_setup
#define SYS_io_uring_setup 425
#endif
#ifndef FSPICK_CLOEXEC
#define FSPICK_CLOEXEC 1
#endif
#ifndef OPEN_TREE_CLONE
#define OPEN_TREE_CLONE 1
#endif

static int report(const char *what, long r) {
    if (r >= 0) {
        printf("%s: ok\n", what);
        return 0;
    }
    int e = errno;
    printf("%s: %s (%s)\n", what, strerrorname_np(e) ? strerrorname_np(e) : "?", strerror(e));
    return 1;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: probe CALL [ARGS...]\n");
        return 2;
    }
    const char *call = argv[1];
    const char *path = argc > 2 ? argv[2] : "/";
    if (!strcmp(call, "mount_setattr")) {
        /* Clear read-only, nosuid and nodev on PATH (recursively). */
        struct mount_attr a = {0};
        a.attr_clr = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV;
        return report(call, syscall(SYS_mount_setattr, AT_FDCWD, path, AT_RECURSIVE, &a, sizeof a));
    }
    if (!strcmp(call, "fspick")) {
        return report(call, syscall(SYS_fspick, AT_FDCWD, path, FSPICK_CLOEXEC));
    }
    if (!strcmp(call, "open_tree")) {
        return report(call, syscall(SYS_open_tree, AT_FDCWD, path, OPEN_TREE_CLONE));
    }
    if (!strcmp(call, "open_tree_attr")) {
        struct mount_attr a = {0};
        a.attr_clr = MOUNT_ATTR_RDONLY;
        return report(call, syscall(SYS_open_tree_attr_, AT_FDCWD, path, OPEN_TREE_CLONE, &a, sizeof a));
    }
    if (!strcmp(call, "remount_rw")) {
        /* Remount PATH read-write in place, then in a mount namespace of
         * our own (whose copies of the sandbox's mounts must be locked). */
        int r = report("remount_rw", mount(NULL, path, NULL, MS_REMOUNT | MS_BIND, NULL));
        if (r == 0)
            return 0;
        if (report("unshare_mount_ns", unshare(CLONE_NEWNS)) != 0)
            return 1;
        return report("remount_rw_in_own_ns", mount(NULL, path, NULL, MS_REMOUNT | MS_BIND, NULL));
    }
    if (!strcmp(call, "io_uring_setup")) {
        char params[120] = {0}; /* struct io_uring_params */
        return report(call, syscall(SYS_io_uring_setup, 1, params));
    }
    if (!strcmp(call, "x32")) {
        /* An x32-ABI call: getpid (39) with the x32 bit. */
        return report(call, syscall(0x40000000 | 39));
    }
    if (!strcmp(call, "write")) {
        return report(call, open(path, O_WRONLY));
    }
    if (!strcmp(call, "read")) {
        int fd = open(path, O_RDONLY);
        if (fd < 0)
            return report(call, fd);
        char b[16];
        return report(call, read(fd, b, sizeof b));
    }
    if (!strcmp(call, "tcsetattr")) {
        /* Reconfigure the terminal on descriptor N (default 1). */
        int fd = argc > 2 ? atoi(argv[2]) : 1;
        struct termios t;
        if (report("tcgetattr", tcgetattr(fd, &t)) != 0)
            return 1;
        return report(call, tcsetattr(fd, TCSANOW, &t));
    }
    if (!strcmp(call, "sys")) {
        /* syscall(NR, ARGS...) with integer arguments (strtol base 0). */
        long a[6] = {0};
        for (int i = 3; i < argc && i < 9; i++)
            a[i - 3] = strtol(argv[i], NULL, 0);
        return report(call, syscall(strtol(path, NULL, 0), a[0], a[1], a[2], a[3], a[4], a[5]));
    }
    fprintf(stderr, "probe: unknown call %s\n", call);
    return 2;
}
