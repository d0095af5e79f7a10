/* SPDX-License-Identifier: GPL-2.0 */
/*
 * klpforge_sympos.h: tell `klpforge convert` which of several same-named local symbols of the running
 * kernel a hand-written live patch means (the kernel's sympos: the 1-based rank among same-named
 * symbols, in address order for vmlinux, symbol-table order for a module; see kernel/livepatch/core.c).
 *
 *	#include "klpforge_sympos.h"
 *	int type_show(struct device *dev, struct device_attribute *attr, char *buf);
 *	KLP_SYMPOS(vmlinux, type_show, 3);
 *
 * The marker is a string in section .klpforge.sympos ("OBJ:NAME,POS"); convert reads it and removes the
 * section. `klpforge convert --sympos OBJ:NAME,POS` does the same from the command line.
 */
#ifndef KLPFORGE_SYMPOS_H
#define KLPFORGE_SYMPOS_H

#define KLP_SYMPOS(obj, name, pos) \
	static const char __klpforge_sympos_##obj##_##name[] \
	__attribute__((__used__, __section__(".klpforge.sympos"), __aligned__(1))) = #obj ":" #name "," #pos

#endif
