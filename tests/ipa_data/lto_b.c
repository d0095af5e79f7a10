/* LTO: main calls a_util from lto_a.c; the link-time inliner puts it into main. */
int a_util(int x);

static int helper(int x)
{
	return x - 3;
}

int main(int argc, char **argv)
{
	(void)argv;
	return a_util(argc) + helper(argc);
}
