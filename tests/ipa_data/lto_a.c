/* LTO: a_helper (static) and a_util (global) get inlined into main in lto_b.c at link time. */
int a_state;

static int a_helper(int x)
{
	return x * 5 + a_state;
}

int a_util(int x)
{
	return a_helper(x) + 1;
}
