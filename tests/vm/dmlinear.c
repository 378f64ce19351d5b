/* A linear device-mapper target from raw DM ioctls (busybox has no
 * dmsetup), for tests/vm_run.rs to run inside a kiln VM guest:
 *
 *   dmlinear create NAME DEVICE SECTORS   prints the new device, dm-N
 *   dmlinear remove NAME
 */
#include <fcntl.h>
#include <linux/dm-ioctl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/sysmacros.h>
#include <unistd.h>

static char buf[16384];

static struct dm_ioctl *start(const char *name) {
  struct dm_ioctl *io = (struct dm_ioctl *)buf;
  memset(buf, 0, sizeof buf);
  io->version[0] = DM_VERSION_MAJOR;
  io->version[1] = 0;
  io->version[2] = 0;
  io->data_size = sizeof buf;
  io->data_start = sizeof *io;
  strncpy(io->name, name, sizeof io->name - 1);
  return io;
}

static void call(int fd, unsigned long op, const char *what) {
  if (ioctl(fd, op, buf) != 0) {
    perror(what);
    exit(1);
  }
}

int main(int argc, char **argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: dmlinear create NAME DEVICE SECTORS | remove NAME\n");
    return 2;
  }
  int fd = open("/dev/mapper/control", O_RDWR);
  if (fd < 0) {
    perror("open /dev/mapper/control");
    return 1;
  }
  const char *name = argv[2];
  if (strcmp(argv[1], "remove") == 0) {
    start(name);
    call(fd, DM_DEV_REMOVE, "DM_DEV_REMOVE");
    return 0;
  }
  if (strcmp(argv[1], "create") != 0 || argc != 5) {
    fprintf(stderr, "usage: dmlinear create NAME DEVICE SECTORS\n");
    return 2;
  }
  start(name);
  call(fd, DM_DEV_CREATE, "DM_DEV_CREATE");
  struct dm_ioctl *io = start(name);
  struct dm_target_spec *t = (struct dm_target_spec *)(buf + sizeof *io);
  t->sector_start = 0;
  t->length = strtoull(argv[4], NULL, 10);
  strcpy(t->target_type, "linear");
  char *params = (char *)(t + 1);
  snprintf(params, 256, "%s 0", argv[3]);
  size_t used = sizeof *io + sizeof *t + strlen(params) + 1;
  used = (used + 7) & ~(size_t)7;
  t->next = 0;
  io->target_count = 1;
  io->data_start = sizeof *io;
  call(fd, DM_TABLE_LOAD, "DM_TABLE_LOAD");
  io = start(name);
  call(fd, DM_DEV_SUSPEND, "DM_DEV_SUSPEND (resume)");
  printf("dm-%u\n", minor(io->dev));
  return 0;
}
