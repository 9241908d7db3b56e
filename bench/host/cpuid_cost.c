/* cpuid_cost: what one CPUID instruction costs on this machine (make
 * bench-cpu prints it). glibc's start runs a few dozen of them in every
 * exec; in a VM each one traps to the hypervisor (bench/README "CPUID"). */
#include <cpuid.h>
#include <stdio.h>
#include <time.h>

int main(void)
{
    enum { N = 20000 };
    unsigned a = 0, b = 0, c = 0, d = 0, sink = 0;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (unsigned i = 0; i < N; i++) {
        /* The AMD cache topology leaf glibc's handle_amd walks. */
        __cpuid_count(0x8000001D, i & 3, a, b, c, d);
        sink ^= a ^ b ^ c ^ d;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double ns = (double)(t1.tv_sec - t0.tv_sec) * 1e9 + (double)(t1.tv_nsec - t0.tv_nsec);
    printf("one CPUID: %.2f us (%d in a loop)%s\n", ns / 1e3 / N, N, sink == 1 ? " " : "");
    return 0;
}
