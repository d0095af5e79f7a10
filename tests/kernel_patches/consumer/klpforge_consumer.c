// SPDX-License-Identifier: GPL-2.0
/*
 * klpforge test: an ordinary module that uses klpforge_answer(), a function that only the live patch
 * 07-export-new-function.patch adds and exports. It loads only after that live patch.
 */
#include <linux/module.h>
#include <linux/kernel.h>

int klpforge_answer(int x);

static int __init klpforge_consumer_init(void)
{
	pr_info("klpforge-consumer: answer(7)=%d\n", klpforge_answer(7));
	return 0;
}

static void __exit klpforge_consumer_exit(void)
{
}

module_init(klpforge_consumer_init);
module_exit(klpforge_consumer_exit);
MODULE_LICENSE("GPL");
