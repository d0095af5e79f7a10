// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * klpforge test: a live patch written by hand in the style of the kernel's
 * samples/livepatch/livepatch-sample.c, except that the new cmdline_proc_show() uses what no module
 * may link against: version_proc_show(), a static function of fs/proc/version.c, and
 * saved_command_line, a global of init/main.c that is not exported. `klpforge convert` turns both
 * references into klp relocations. type_show (seven static functions of that name in the test
 * kernel) is only referenced, with its position given by KLP_SYMPOS.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/livepatch.h>
#include <linux/seq_file.h>
#include <linux/device.h>
#include "klpforge_sympos.h"

int version_proc_show(struct seq_file *m, void *v);	/* static in fs/proc/version.c */
ssize_t type_show(struct device *dev, struct device_attribute *attr, char *buf);
#ifndef KLPFORGE_NO_SYMPOS
KLP_SYMPOS(vmlinux, type_show, 2);
#endif

static int livepatch_cmdline_proc_show(struct seq_file *m, void *v)
{
	seq_printf(m, "klpforge-convert: %s | ", saved_command_line);
	return version_proc_show(m, v);
}

static struct klp_func funcs[] = {
	{
		.old_name = "cmdline_proc_show",
		.new_func = livepatch_cmdline_proc_show,
	}, { }
};

static struct klp_object objs[] = {
	{
		/* name being NULL means vmlinux */
		.funcs = funcs,
	}, { }
};

static struct klp_patch patch = {
	.mod = THIS_MODULE,
	.objs = objs,
};

static int livepatch_init(void)
{
	int ret = klp_enable_patch(&patch);

	/* klp relocations are written by klp_enable_patch(): use them after it */
	if (!ret)
		pr_info("klpforge-convert: %pS\n", type_show);
	return ret;
}

static void livepatch_exit(void)
{
}

module_init(livepatch_init);
module_exit(livepatch_exit);
MODULE_LICENSE("GPL");
MODULE_INFO(livepatch, "Y");
