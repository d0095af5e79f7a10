/* Identical code folding: s_b becomes an alias of s_a, with no dump record. */
int seed;

static __attribute__((noinline)) int s_a(int x)
{
	return (x * 13) ^ seed;
}

static __attribute__((noinline)) int s_b(int x)
{
	return (x * 13) ^ seed;
}

int use_a(int x) { return s_a(x) + 1; }
int use_b(int x) { return s_b(x) + 2; }
