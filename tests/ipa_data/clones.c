/* IPA transforms: partial inlining (.part), IPA-CP (.constprop), IPA-SRA (.isra), hot/cold split (.cold). */
#include <stddef.h>

extern void log_event(const char *msg, int v);
extern void report(const char *msg, int v) __attribute__((cold));
int counter;

/* ipa-split: the cheap test is inlined into users, the slow rest becomes slow_path.part.0 */
int slow_path(int *p)
{
	if (__builtin_expect(p == NULL, 1))
		return 0;
	for (int i = 0; i < 100; i++) {
		log_event("slow", p[i]);
		counter += p[i] * i;
	}
	log_event("slow done", counter);
	return counter;
}

int user1(int *p)
{
	return slow_path(p) + 1;
}

/* IPA-CP: every caller passes the same factor */
static __attribute__((noinline)) int scale(int v, int factor)
{
	int r = 0;
	for (int i = 0; i < v; i++)
		r += (i * factor) ^ counter;
	log_event("scale", r);
	return r;
}

int use_scale1(int v) { return scale(v, 7); }
int use_scale2(int v) { return scale(v + 1, 7); }

/* IPA-SRA: only one field of the struct is used */
struct big { int a, b, c, d[16]; };

static __attribute__((noinline)) int get_sum(struct big *b)
{
	int s = 0;
	for (int i = 0; i < b->a; i++)
		s += i * counter;
	log_event("sum", s);
	return s;
}

int use_sum1(struct big *b, int k) { return get_sum(b) + k; }
int use_sum2(struct big *b, int k) { return get_sum(b) * k; }

/* hot/cold partitioning: the unlikely branch goes to process.cold */
int process(int *p, int n)
{
	int s = 0;
	for (int i = 0; i < n; i++) {
		if (__builtin_expect(p[i] < 0, 0)) {
			report("negative", p[i]);
			report("index", i);
			counter++;
		}
		s += p[i];
	}
	return s;
}
