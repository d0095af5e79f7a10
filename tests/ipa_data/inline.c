/* Inlining and nested inlining: leaf -> mid -> top_a/top_b, helper -> caller_a/caller_b. */
int sink;

static int leaf(int x)
{
	return x * 3 + sink;
}

static int mid(int x)
{
	return leaf(x) + leaf(x + 1);
}

int top_a(int x)
{
	return mid(x) - 1;
}

int top_b(int x)
{
	return mid(x * 2) + 7;
}

static int helper(int v)
{
	return v ^ 0x55;
}

int caller_a(int v)
{
	return helper(v) + 1;
}

int caller_b(int v)
{
	return helper(v) + 2;
}

int lonely(int v)
{
	return v + sink;
}
