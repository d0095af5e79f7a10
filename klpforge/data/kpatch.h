/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * kpatch.h -- the part of the old kpatch core API that patches use: shadow variables named by a
 * string, kpatch_shadow_alloc/get/free, mapped by klpforge onto the kernel's klp_shadow_* API
 * (include/linux/livepatch.h, Documentation/livepatch/shadow-vars.rst, Linux 6.1), whose variables
 * are named by an unsigned long.  The string is hashed (64-bit FNV-1a) into that id.
 *
 * Differences from the kpatch core: the data is zeroed; allocating a variable that already exists
 * for the object replaces it (the kpatch core kept both and returned the newer one).
 */
#ifndef KLPFORGE_KPATCH_H
#define KLPFORGE_KPATCH_H

#ifdef __XEN__
#error "kpatch.h is for Linux live patches; a Xen payload uses klpforge's xen-livepatch-hooks.h (KLP_XEN_LOAD_HOOK and the other hooks): docs/xen.md"
#else /* the rest only for Linux: nothing more is compiled for Xen, so the line above is the only error */

#include <linux/types.h>
#include <linux/livepatch.h>
#include "kpatch-macros.h"

static inline unsigned long kpatch_shadow_id(const char *var)
{
	u64 h = 0xcbf29ce484222325ULL;

	while (*var) {
		h ^= (unsigned char)*var++;
		h *= 0x100000001b3ULL;
	}
	return (unsigned long)h;
}

static inline void *kpatch_shadow_alloc(void *obj, char *var, size_t size, gfp_t gfp)
{
	klp_shadow_free(obj, kpatch_shadow_id(var), NULL);
	return klp_shadow_alloc(obj, kpatch_shadow_id(var), size, gfp, NULL, NULL);
}

static inline void *kpatch_shadow_get(void *obj, char *var)
{
	return klp_shadow_get(obj, kpatch_shadow_id(var));
}

static inline void kpatch_shadow_free(void *obj, char *var)
{
	klp_shadow_free(obj, kpatch_shadow_id(var), NULL);
}

#endif /* !__XEN__ */
#endif /* KLPFORGE_KPATCH_H */
