/* klpforge demo: a tiny "kernel object". The fix changes clamp_len(), a static helper that GCC inlines
 * into both of its callers, so the live patch must replace the callers, not clamp_len itself. */
#include <stddef.h>

extern int printk(const char *fmt, ...);

static inline __attribute__((always_inline)) size_t clamp_len(size_t len)
{
	return len > 2048 ? 2048 : len;	/* CVE fix: a smaller bound */
}

size_t demo_read(size_t len)
{
	return clamp_len(len);
}

size_t demo_write(size_t len)
{
	return clamp_len(len) / 2;
}

const char *demo_state_name(int state)
{
	switch (state) {
	case 0: return "idle";
	case 1: return "running";
	case 2: return "sleeping";
	case 3: return "stopped";
	case 4: return "zombie";
	case 5: return "dead";
	case 6: return "parked";	/* new state */
	default: return "unknown";
	}
}

int demo_report(int state)
{
	return printk("state %s\n", demo_state_name(state));
}
