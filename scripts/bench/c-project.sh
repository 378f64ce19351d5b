#!/usr/bin/env bash
# Writes the benchmarks' C project into DIR: 300 small files and a Makefile
# that builds them into lib.a (`make -j2`; `make clean`).
#   scripts/bench/c-project.sh DIR
set -euo pipefail
proj=${1:?usage: c-project.sh DIR}
mkdir -p "$proj"
for i in $(seq 1 300); do
  printf '#include <stdio.h>\n#include <string.h>\nint f%d(const char *s){int n=0;for(int i=0;s[i];i++)n+=s[i]*%d;return n+(int)strlen(s);}\n' "$i" "$i" >"$proj/f$i.c"
done
printf 'SRCS := $(wildcard *.c)\nOBJS := $(SRCS:.c=.o)\nlib.a: $(OBJS)\n\tar rcs $@ $^\n%%.o: %%.c\n\t$(CC) -O2 -c $< -o $@\nclean:\n\trm -f *.o lib.a\n' >"$proj/Makefile"
