/* notify.c - sd_notify(3) over $NOTIFY_SOCKET without libsystemd
 * (READY=1, STOPPING=1, WATCHDOG=1 at half of WATCHDOG_USEC), and the test
 * delay, which sleeps in slices so the watchdog keeps ticking. */
#include "internal.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>


static int g_notify_fd = -1;
static struct sockaddr_un g_notify_addr;
static socklen_t g_notify_len;
static long long g_watchdog_ms, g_watchdog_next;

void notify_init(void)
{
    const char *s = getenv("NOTIFY_SOCKET");
    if (!s || (s[0] != '/' && s[0] != '@'))
        return;
    size_t n = strlen(s);
    if (n < 2 || n >= sizeof g_notify_addr.sun_path) {
        fprintf(stderr, "%s: NOTIFY_SOCKET too long, ignored\n", worker_name());
        return;
    }
    g_notify_addr.sun_family = AF_UNIX;
    memcpy(g_notify_addr.sun_path, s, n);
    if (s[0] == '@')
        g_notify_addr.sun_path[0] = '\0';
    g_notify_len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n +
                               (s[0] == '/'));
    g_notify_fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (g_notify_fd < 0)
        perror("notify socket");
}

void notify(const char *msg)
{
    if (g_notify_fd < 0)
        return;
    ssize_t r;
    do {
        r = sendto(g_notify_fd, msg, strlen(msg), MSG_NOSIGNAL | MSG_DONTWAIT,
                   (struct sockaddr *)&g_notify_addr, g_notify_len);
    } while (r < 0 && errno == EINTR);
    /* Never block the worker on a full receiver queue: drop instead. */
    if (r < 0 && errno != EAGAIN)
        fprintf(stderr, "%s: sd_notify: %s\n", worker_name(), strerror(errno));
}

void watchdog_init(void)
{
    const char *us = getenv("WATCHDOG_USEC"), *pid = getenv("WATCHDOG_PID");
    if (!us || (pid && strtol(pid, NULL, 10) != (long)getpid()))
        return;
    unsigned long long v = strtoull(us, NULL, 10);
    if (v == 0)
        return;
    g_watchdog_ms = (long long)(v / 2000);
    if (g_watchdog_ms < 1)
        g_watchdog_ms = 1;
    g_watchdog_next = now_ms();
}

void watchdog_tick(void)
{
    if (g_watchdog_ms == 0 || now_ms() < g_watchdog_next)
        return;
    notify("WATCHDOG=1");
    g_watchdog_next = now_ms() + g_watchdog_ms;
}

long long watchdog_next(void) { return g_watchdog_ms ? g_watchdog_next : 0; }

void test_delay(unsigned long ms)
{
    long long end = now_ms() + (long long)ms;
    for (long long left; (left = end - now_ms()) > 0;) {
        if (g_watchdog_ms && left > g_watchdog_ms)
            left = g_watchdog_ms;
        struct timespec ts = {left / 1000, (left % 1000) * 1000000L};
        nanosleep(&ts, NULL);
        watchdog_tick();
    }
}

