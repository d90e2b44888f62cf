/* The first instant of mae-pretrain. Loading LibTorch and ITK takes a few tenths of a second before
 * any code of the program runs, so a Ctrl-C then would kill it by the signal. This small program
 * starts in about a millisecond, blocks SIGINT and SIGTERM, and executes the real program
 * (MAE3D_PROGRAM beside it, or in ../libexec/mae3d/) in the same process: a signal that arrives
 * while the libraries load waits, and is handled as soon as the program has installed its handlers
 * and unblocks them. Same process id, arguments and environment. */
#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#ifndef MAE3D_PROGRAM
#error "MAE3D_PROGRAM names the program to execute"
#endif

int main(int argc, char** argv) {
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  sigprocmask(SIG_BLOCK, &stop_signals, NULL);

  char self[PATH_MAX];
  const ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
  if (n <= 0) {
    fprintf(stderr, "%s: error: cannot find where this program is (/proc/self/exe: %s)\n", argv[0], strerror(errno));
    return 1;
  }
  self[n] = '\0';
  char* slash = strrchr(self, '/');
  if (slash) *slash = '\0';

  const char* const layouts[] = {"%s/" MAE3D_PROGRAM, "%s/../libexec/mae3d/" MAE3D_PROGRAM};
  char target[PATH_MAX + 64];
  int err = ENOENT;
  (void)argc;
  for (size_t i = 0; i < sizeof layouts / sizeof layouts[0]; ++i) {
    snprintf(target, sizeof target, layouts[i], self);
    execv(target, argv);
    err = errno;
    if (err != ENOENT) break;
  }
  fprintf(stderr, "%s: error: cannot start %s: %s\n", argv[0], target, strerror(err));
  return 1;
}
